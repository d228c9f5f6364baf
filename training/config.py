"""Training parameters: every one of the paper's, plus the model and data set-up, as one frozen
dataclass with its presets. No torch here, so `mr2ct train` refuses a parameter out of range, an
unknown preset or a mistyped --data before it imports torch (a fraction of a second)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from synthesis.card import TEST_TIME_AUGMENTATIONS

LOSS_NAMES = (
    "ABA_reconstruction_loss",
    "BAB_reconstruction_loss",
    "DA_loss",
    "DB_loss",
    "D_loss",
    "G_AB_adversarial_loss",
    "G_BA_adversarial_loss",
    "G_loss",
    "reconstruction_loss",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every training parameter of the paper, plus the model and data set-up."""

    lambda_ABA: float = 10.0
    lambda_BAB: float = 10.0
    lr_D: float = 2e-4
    lr_G: float = 2e-4
    generator_iterations: int = 1
    discriminator_iterations: int = 1
    synthetic_pool_size: int = 50
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 4
    epochs: int = 10
    steps_per_epoch: int = 50
    cycle_loss: str = "mae"  # or "mse"
    adversarial_loss: str = "lsgan"  # "bce" (the paper), "lsgan" (Zhu et al.), "wgan-gp"
    gradient_penalty: float = 10.0  # wgan-gp only
    identity_weight: float = 0.0  # x lambda; 0 disables (MR and CT contrasts differ too much for it)
    structure_weight: float = 0.0  # MIND structure loss between each image and its translation (Yang et al. 2018); 0 disables
    lr_decay_start: int | None = None  # epoch after which learning rates fall linearly to 0
    ema_decay: float = 0.0  # export an exponential moving average of the MR->CT generator's weights (e.g. 0.995); 0: the last weights
    generator: str = "resnet"  # or "unet", or "fcn" (the paper's fully convolutional layer recipe)
    discriminator: str = "patch"  # PatchGAN (Zhu et al.) or "paper" (Conv k4 s2, BatchNorm, LeakyReLU 0.2)
    ngf: int = 16
    n_blocks: int = 6
    ndf: int = 32
    d_layers: int = 3  # strided layers of the discriminator: 3 = the 70x70 PatchGAN, 4 sees 142x142
    checkpoint_every: int = 5  # epochs; 0: only at the end and on Ctrl-C
    image_size: int = 128
    crop_size: int | None = None  # train on random crops of this size (fully convolutional), full slices at inference
    pixel_spacing_mm: float = 2.0
    hu_range: tuple[float, float] = (-1024.0, 2048.0)
    subjects_per_pool: int = 40
    slices_per_subject: int = 24
    seed: int = 0
    max_minutes: float | None = None
    data: str | None = None  # a dataset cache from `mr2ct pull`; None: generated phantoms
    init_from: str | None = None  # fine-tune: start from a run folder / checkpoint.pt (all four networks) or a model file (G_AB)
    precision: str = "fp32"  # or "bf16": forward passes under bf16 autocast (GPUs, CPUs with AMX/AVX-512 bf16)
    test_time_augmentation: str = "none"  # written into the exported card: the views of each slice inference averages over

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "steps_per_epoch", "generator_iterations", "discriminator_iterations", "ngf", "ndf",
                     "subjects_per_pool", "slices_per_subject"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # a learning rate of 0 holds a network where it is (a fine-tune that trains only the others)
        for name in ("lambda_ABA", "lambda_BAB", "identity_weight", "gradient_penalty", "synthetic_pool_size", "n_blocks", "checkpoint_every",
                     "lr_G", "lr_D"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.pixel_spacing_mm > 0:
            raise ValueError(f"pixel_spacing_mm must be > 0, got {self.pixel_spacing_mm}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.cycle_loss not in ("mae", "mse"):
            raise ValueError(f"cycle_loss must be 'mae' or 'mse', got {self.cycle_loss!r}")
        if self.adversarial_loss not in ("lsgan", "bce", "wgan-gp"):
            raise ValueError(f"adversarial_loss must be 'lsgan', 'bce' or 'wgan-gp', got {self.adversarial_loss!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.generator not in ("resnet", "unet", "fcn"):
            raise ValueError(f"generator must be 'resnet', 'unet' or 'fcn', got {self.generator!r}")
        if self.discriminator not in ("patch", "paper"):
            raise ValueError(f"discriminator must be 'patch' or 'paper', got {self.discriminator!r}")
        if self.lr_decay_start is not None and not 0 <= self.lr_decay_start < self.epochs:
            raise ValueError(f"lr_decay_start must be in [0, epochs), got {self.lr_decay_start}")
        if not 1 <= self.d_layers <= 6:
            raise ValueError(f"d_layers must be between 1 and 6, got {self.d_layers}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
            raise ValueError(f"test_time_augmentation must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, got {self.test_time_augmentation!r}")
        if self.structure_weight < 0:
            raise ValueError(f"structure_weight must be >= 0, got {self.structure_weight}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {self.image_size}")
        if self.crop_size is not None and (self.crop_size % 4 or not 16 <= self.crop_size <= self.image_size):
            raise ValueError(f"crop_size must be a multiple of 4 between 16 and image_size, got {self.crop_size}")
        # the discriminator's last layers need a few pixels left after its d_layers halvings
        smallest = 3 * 2**self.d_layers if self.discriminator == "patch" else 2 ** (self.d_layers + 1)
        trained = self.crop_size or self.image_size
        if trained < smallest:
            raise ValueError(f"{'crop_size' if self.crop_size else 'image_size'} {trained} is too small for a {self.discriminator} "
                             f"discriminator of d_layers {self.d_layers}: at least {smallest} (or fewer d_layers)")


PRESETS: dict[str, TrainConfig] = {
    # Minutes on a laptop CPU; what the tests use, and the first stage of training/recipes/phantom_1mm.sh.
    "quick": TrainConfig(),
    # The seed paper: 64x64 images, batch 128, its FCN discriminator with BCE, MAE cycle loss.
    "paper": TrainConfig(
        image_size=64, pixel_spacing_mm=4.0, batch_size=128, adversarial_loss="bce", discriminator="paper",
        ngf=32, n_blocks=9, ndf=64, lr_D=2e-4, lr_G=2e-4, epochs=200, steps_per_epoch=100,
    ),
    # Zhu et al. 2017 reference set-up: ResNet-9, 70x70 PatchGAN, LSGAN, lambda 10, pool 50, linear decay.
    "zhu2017": TrainConfig(
        ngf=64, n_blocks=9, ndf=64, batch_size=1, image_size=256, pixel_spacing_mm=1.0, epochs=200,
        lr_decay_start=100, steps_per_epoch=1000,
    ),
}


def config_from(preset: str, overrides: dict[str, Any]) -> TrainConfig:
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}") from None
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
