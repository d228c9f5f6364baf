"""A CycleGAN trainer (A = MR, B = CT) with the paper's parameters as one frozen dataclass (training.config).

Unpaired pools (generated phantoms or a cache from ``mr2ct pull``), generator and
discriminator updates with an image pool, adversarial loss BCE (the paper), least squares
(Zhu et al.) or Wasserstein with gradient penalty (the paper's future work), optional
identity loss and linear learning-rate decay; per-epoch losses named as in the paper's
Table 2 (CSV), figures, checkpoints with exact resume (models, optimisers, pools, RNGs),
Ctrl-C saves a checkpoint. Under ``torchrun`` it trains with DistributedDataParallel
(gloo on CPU, NCCL on GPU); rank 0 writes the files.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from synthesis.contrast import parts_named
from synthesis.infer import native_bf16
from synthesis.model_file import save_model
from synthesis.networks import PatchDiscriminator, ResnetGenerator
from synthesis.normalize import hu_to_unit, mr_to_unit
from synthesis.progress import progress_bar
from training import phantoms
from training.config import LOSS_NAMES, PRESETS, TrainConfig, config_from  # noqa: F401  (where callers have always found them)
from training.interrupts import uninterrupted

log = logging.getLogger(__name__)


class ImagePool:
    """History of generated images shown to the discriminator (Shrivastava et al.)."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.images: list[torch.Tensor] = []

    def state(self) -> dict[str, Any]:
        return {"images": [i.cpu() for i in self.images], "rng": self.rng.getstate()}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.images = [i.to(device) for i in state["images"]]
        self.rng.setstate(state["rng"])

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for image in batch.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                idx = self.rng.randrange(self.size)
                out.append(self.images[idx].clone())
                self.images[idx] = image
            else:
                out.append(image)
        return torch.cat(out, 0)


def make_pools(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unpaired MR and CT slice pools from disjoint phantom subjects, each in [-1, 1]."""
    grid = phantoms.axial_grid(cfg.slices_per_subject, cfg.image_size, cfg.pixel_spacing_mm, 150.0 / cfg.slices_per_subject)
    mr_slices, ct_slices = [], []
    for i in progress_bar(range(cfg.subjects_per_pool), desc="phantoms"):
        mr_seed, ct_seed = cfg.seed * 100_000 + 2 * i, cfg.seed * 100_000 + 2 * i + 1
        mr_labels = phantoms.head_labels(mr_seed, grid)
        mr_slices.append(mr_to_unit(phantoms.render_mr(mr_labels, grid, mr_seed)))
        ct_labels = phantoms.head_labels(ct_seed, grid)
        ct_slices.append(hu_to_unit(phantoms.render_ct(ct_labels, grid, ct_seed), cfg.hu_range))
    return np.concatenate(mr_slices)[:, None], np.concatenate(ct_slices)[:, None]


# card key -> (the pulled manifest's key for it, what training.phantoms' heads are: T1-weighted,
# unenhanced, fat bright, heads)
MR_LEARNED = {"mr_contrasts": ("contrast", "T1"), "mr_contrast_agents": ("contrast_agent", "WITHOUT"),
              "mr_fat_suppression": ("fat_suppression", "WITHOUT"), "mr_body_parts": ("body_part", "HEAD")}


def mr_learned(cfg: TrainConfig) -> dict[str, list[str]]:
    """What the MR the generator learns from is, for the card: its contrasts (``mr_contrasts``),
    whether it was enhanced (``mr_contrast_agents``) or fat-suppressed (``mr_fat_suppression``), WITH
    and/or WITHOUT, and its anatomy (``mr_body_parts``, BodyPartExamined), which `mr2ct config check`
    holds the node's select_acquisition_contrasts, select_contrast_agent, select_fat_suppression and
    select_body_parts to. The phantoms' (T1, WITHOUT, WITHOUT, HEAD), or what a pulled cache's train
    split records, its manifest read once (UNKNOWN for series cached before a key was recorded:
    contrast, agent and fat suppression 2026-12-05, body part 2026-12-06)."""
    if not cfg.data:
        return {card_key: [phantoms] for card_key, (_, phantoms) in MR_LEARNED.items()}
    from training.pacs_pull import DatasetCache

    mr = [e for e in DatasetCache(Path(str(cfg.data))).entries() if e["modality"] == "MR" and e["split"] == "train"]
    learned = {card_key: sorted({str(e.get(key, "UNKNOWN")) for e in mr}) for card_key, (key, _) in MR_LEARNED.items()}
    # a series whose instances named several body parts (HEAD\\NECK, synthesis.contrast.with_other_part) taught each of them
    learned["mr_body_parts"] = sorted({p for told in learned["mr_body_parts"] for p in parts_named(told)})
    return learned


def pools_from_cache(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train-split MR and CT slices of a pulled cache, resampled to the training grid."""
    import torch.nn.functional as F

    from training.pacs_pull import DatasetCache

    try:
        cache = DatasetCache.existing(Path(str(cfg.data)))
    except FileNotFoundError as exc:
        raise ValueError(f"--data: {exc}") from exc
    pools = []
    for modality in ("MR", "CT"):
        slices = []
        for entry, data in cache.pool(modality, "train"):
            images = torch.from_numpy(data.astype(np.float32))[:, None]
            if modality == "CT":
                images = torch.from_numpy(hu_to_unit(images.numpy(), cfg.hu_range))
            rows, cols = data.shape[1:]
            size = (max(4, round(rows * entry["pixel_spacing"][0] / cfg.pixel_spacing_mm)), max(4, round(cols * entry["pixel_spacing"][1] / cfg.pixel_spacing_mm)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
            canvas = torch.full((images.shape[0], 1, cfg.image_size, cfg.image_size), -1.0)
            r0, c0 = max(0, (size[0] - cfg.image_size) // 2), max(0, (size[1] - cfg.image_size) // 2)
            crop = images[..., r0 : r0 + cfg.image_size, c0 : c0 + cfg.image_size]
            pr, pc = (cfg.image_size - crop.shape[-2]) // 2, (cfg.image_size - crop.shape[-1]) // 2
            canvas[..., pr : pr + crop.shape[-2], pc : pc + crop.shape[-1]] = crop
            slices.append(canvas.numpy())
        if not slices:
            raise ValueError(f"the cache {cfg.data} holds no {modality} series in its train split; run `mr2ct pull` first")
        pools.append(np.concatenate(slices).astype(np.float32))
    return pools[0], pools[1]


def mind(images: torch.Tensor, floor: float = 0.03) -> torch.Tensor:
    """Modality independent neighbourhood descriptor (Heinrich et al. 2012), 2D: for each pixel,
    exp(-D/V) of the 3x3-patch squared distances D to its four neighbours, V their mean (at least
    ``floor``, in units of the [-1, 1] images squared: above MR background noise, so flat regions
    read alike in both images). Depends on where the edges are, not on which side is bright."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    h, w = images.shape[-2:]
    distances = torch.cat([
        F.avg_pool2d((images - padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]) ** 2, 3, stride=1, padding=1, count_include_pad=False)
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
    ], dim=1)
    variance = distances.mean(dim=1, keepdim=True).clamp(min=floor)
    return torch.exp(-distances / variance)


def mind_loss(source: torch.Tensor, translated: torch.Tensor) -> torch.Tensor:
    """The structure loss of a structure-constrained CycleGAN (Yang et al. 2018): L1 between the
    MIND descriptors of an image and of its translation."""
    return (mind(source.float()) - mind(translated.float())).abs().mean()


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when run under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = d(mixed)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run; rank 0 saved its checkpoint (``args[0]``) for --resume. An exception,
    not a return value: until 2026-12-06 the command told an interruption from a finished run by the
    files in the folder, and a second torchrun rank that finished while rank 0 was between writing
    the checkpoint and the model file took the run for interrupted (exit 130)."""


def train(cfg: TrainConfig, out_dir: Path, command: str, device: str = "auto", resume: bool = False,
          on_epoch: Callable[[int, dict[str, float], float], None] | None = None,
          learned_from: list[str] | None = None) -> dict[str, Any] | None:
    """Train and write ``out_dir``: model file + card, losses.csv/png, samples.png, config.json,
    checkpoint.pt. Returns the card (None on ranks other than 0); TrainingInterrupted after Ctrl-C,
    once the checkpoint is saved.
    ``on_epoch(epoch, mean losses, seconds so far)`` is called on rank 0 after each epoch is in losses.csv.
    ``learned_from``: ``learned_from_caches(cfg, out_dir, resume)`` where the caller has it already
    (`mr2ct train` records it before training: each reading loads the checkpoint it starts from)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from synthesis.networks import PaperDiscriminator

    rank, world = _distributed()
    is_main = rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if cfg.precision == "bf16" and is_main and not native_bf16(dev):
        log.warning("precision=bf16 on a device without native bf16 (%s): it is emulated, far slower than fp32 "
                    "(64x for a 3x3 convolution on a 2-core AVX2 CPU); --precision fp32 is the fast choice here", dev)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np_rng = np.random.default_rng(cfg.seed if world == 1 else [cfg.seed, rank])  # a batch stream per rank
    mr_pool, ct_pool = pools_from_cache(cfg) if cfg.data else make_pools(cfg)

    def make_discriminator() -> nn.Module:
        kind = PaperDiscriminator if cfg.discriminator == "paper" else PatchDiscriminator
        return kind(ndf=cfg.ndf, n_layers=cfg.d_layers).to(dev)

    g_ab, g_ba, d_a, d_b = _generator(cfg, dev), _generator(cfg, dev), make_discriminator(), make_discriminator()
    nets = {"g_ab": g_ab, "g_ba": g_ba, "d_a": d_a, "d_b": d_b}
    opt_g = torch.optim.Adam(list(g_ab.parameters()) + list(g_ba.parameters()), lr=cfg.lr_G, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=cfg.lr_D, betas=(cfg.beta1, cfg.beta2))

    def lr_factor(epoch_index: int) -> float:  # epoch_index counts from 0
        if cfg.lr_decay_start is None:
            return 1.0
        return 1.0 - max(0, epoch_index + 1 - cfg.lr_decay_start) / float(cfg.epochs - cfg.lr_decay_start + 1)

    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_factor)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_factor)
    cyc: nn.Module = nn.L1Loss() if cfg.cycle_loss == "mae" else nn.MSELoss()
    pool_a, pool_b = ImagePool(cfg.synthetic_pool_size, random.Random(cfg.seed)), ImagePool(cfg.synthetic_pool_size, random.Random(cfg.seed + 1))
    history: list[dict[str, float]] = []
    start_epoch = 1
    checkpoint_path = out_dir / "checkpoint.pt"

    def save_checkpoint(epoch: int) -> None:
        if not is_main:
            return
        state = {
            "epoch": epoch, "config": asdict(cfg), "history": history,
            "nets": {k: v.state_dict() for k, v in nets.items()},
            **({"ema_g_ab": ema.state_dict()} if ema is not None else {}),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
            "pool_a": pool_a.state(), "pool_b": pool_b.state(), "np_rng": np_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "learned_from_caches": learned_from,
        }
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint_path)

    if learned_from is None:  # before a checkpoint of this run replaces the one resumed
        learned_from = learned_from_caches(cfg, out_dir, resume)
    init_source = initialize_from(cfg.init_from, nets, dev) if cfg.init_from and not resume else None
    # GAN weights wander from step to step; an average over the last few hundred steps is a steadier
    # generator (Yazici et al. 2019). Only the exported MR->CT generator is averaged.
    ema = copy.deepcopy(g_ab).requires_grad_(False) if cfg.ema_decay > 0 else None

    @torch.no_grad()
    def update_ema() -> None:
        if ema is None:
            return
        for averaged, current in zip(ema.parameters(), g_ab.parameters()):
            averaged.lerp_(current, 1.0 - cfg.ema_decay)
        for averaged, current in zip(ema.buffers(), g_ab.buffers()):
            averaged.copy_(current)

    if resume:
        if not checkpoint_path.exists():
            raise ValueError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location=dev, weights_only=True)
        extendable = {"epochs", "max_minutes", "checkpoint_every", "init_from", "test_time_augmentation"}  # extended on resume; init_from: weights come from the checkpoint
        changed = sorted(k for k in state["config"] if k not in extendable and state["config"][k] != asdict(cfg).get(k))
        if changed:
            raise ValueError(f"--resume: the checkpoint was made with other parameters ({', '.join(changed)})")
        for k, v in nets.items():
            v.load_state_dict(state["nets"][k])
        if ema is not None:
            ema.load_state_dict(state.get("ema_g_ab", state["nets"]["g_ab"]))
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched_g.load_state_dict(state["sched_g"])
        sched_d.load_state_dict(state["sched_d"])
        pool_a.load(state["pool_a"], dev)
        pool_b.load(state["pool_b"], dev)
        np_rng.bit_generator.state = state["np_rng"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1

    if world > 1:
        g_ab_t, g_ba_t, d_a_t, d_b_t = (DDP(n) for n in (g_ab, g_ba, d_a, d_b))
    else:
        g_ab_t, g_ba_t, d_a_t, d_b_t = g_ab, g_ba, d_a, d_b

    def batch(pool: np.ndarray) -> torch.Tensor:
        idx = np_rng.integers(0, len(pool), cfg.batch_size)
        images = pool[idx].copy()
        if cfg.crop_size is not None and cfg.crop_size < images.shape[-1]:
            r0, c0 = np_rng.integers(0, images.shape[-2] - cfg.crop_size + 1), np_rng.integers(0, images.shape[-1] - cfg.crop_size + 1)
            images = images[..., r0 : r0 + cfg.crop_size, c0 : c0 + cfg.crop_size].copy()
        flip = np_rng.random(cfg.batch_size) < 0.5
        images[flip] = images[flip][..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(images)).to(dev)

    def autocast() -> torch.autocast:
        """Forward passes in bf16 when asked; losses and optimiser state stay fp32 (no scaler needed)."""
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    wgan = cfg.adversarial_loss == "wgan-gp"
    adv = nn.MSELoss() if cfg.adversarial_loss == "lsgan" else nn.BCEWithLogitsLoss()

    def g_adv(pred: torch.Tensor) -> torch.Tensor:
        return -pred.mean() if wgan else adv(pred, torch.ones_like(pred))

    def d_loss(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if wgan:
            return d(fake).float().mean() - d(real).float().mean() + cfg.gradient_penalty * _gradient_penalty(d, real, fake)
        pr, pf = d(real).float(), d(fake).float()
        return 0.5 * (adv(pr, torch.ones_like(pr)) + adv(pf, torch.zeros_like(pf)))

    started = time.monotonic()
    stopped_early = False
    fresh = not resume or not (out_dir / "losses.csv").exists()
    csv_file = open(out_dir / "losses.csv", "w" if fresh else "a", newline="") if is_main else None
    writer = csv.DictWriter(csv_file, fieldnames=["epoch", *LOSS_NAMES, "seconds"]) if csv_file else None
    if writer and fresh:
        writer.writeheader()
    epoch = completed = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            sums = dict.fromkeys(LOSS_NAMES, 0.0)
            bar = progress_bar(range(cfg.steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", show=None if is_main else False)
            for _ in bar:
                real_a, real_b = batch(mr_pool), batch(ct_pool)
                for _ in range(cfg.generator_iterations):
                    with autocast():
                        fake_b, fake_a = g_ab_t(real_a), g_ba_t(real_b)
                        rec_a, rec_b = g_ba_t(fake_b), g_ab_t(fake_a)
                        loss_aba, loss_bab = cyc(rec_a.float(), real_a), cyc(rec_b.float(), real_b)
                        adv_ab, adv_ba = g_adv(d_b_t(fake_b).float()), g_adv(d_a_t(fake_a).float())
                        loss_g = adv_ab + adv_ba + cfg.lambda_ABA * loss_aba + cfg.lambda_BAB * loss_bab
                        if cfg.structure_weight > 0:  # edges stay where they are: no shifted or swapped layers
                            loss_g = loss_g + cfg.structure_weight * (mind_loss(real_a, fake_b) + mind_loss(real_b, fake_a))
                        if cfg.identity_weight > 0:
                            loss_g = loss_g + cfg.identity_weight * (
                                cfg.lambda_ABA * cyc(g_ba_t(real_a).float(), real_a) + cfg.lambda_BAB * cyc(g_ab_t(real_b).float(), real_b))
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    update_ema()
                for _ in range(cfg.discriminator_iterations):
                    pa, pb = pool_a.query(fake_a.float()), pool_b.query(fake_b.float())
                    with autocast():
                        loss_da = d_loss(d_a_t, real_a, pa.detach())
                        loss_db = d_loss(d_b_t, real_b, pb.detach())
                    opt_d.zero_grad(set_to_none=True)
                    (loss_da + loss_db).backward()
                    opt_d.step()
                step = {
                    "ABA_reconstruction_loss": loss_aba.item(),
                    "BAB_reconstruction_loss": loss_bab.item(),
                    "DA_loss": loss_da.item(),
                    "DB_loss": loss_db.item(),
                    "D_loss": loss_da.item() + loss_db.item(),
                    "G_AB_adversarial_loss": adv_ab.item(),
                    "G_BA_adversarial_loss": adv_ba.item(),
                    "G_loss": loss_g.item(),
                    "reconstruction_loss": loss_aba.item() + loss_bab.item(),
                }
                for k, v in step.items():
                    sums[k] += v
                bar.set_postfix(G=f"{step['G_loss']:.3f}", D=f"{step['D_loss']:.3f}", rec=f"{step['reconstruction_loss']:.3f}")
            sched_g.step()
            sched_d.step()
            row = {k: v / cfg.steps_per_epoch for k, v in sums.items()}
            with uninterrupted():  # the epoch is in the history, losses.csv, the database and the checkpoint's count, or in none
                history.append(row)
                if writer and csv_file:
                    writer.writerow({"epoch": epoch, **{k: f"{v:.6f}" for k, v in row.items()}, "seconds": f"{time.monotonic() - started:.1f}"})
                    csv_file.flush()
                if is_main:
                    log.info("epoch=%d G_loss=%.4f D_loss=%.4f reconstruction_loss=%.4f", epoch, row["G_loss"], row["D_loss"], row["reconstruction_loss"])
                    if on_epoch is not None:
                        on_epoch(epoch, row, time.monotonic() - started)
                completed = epoch
            if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
                save_checkpoint(epoch)
            if cfg.max_minutes is not None and time.monotonic() - started > cfg.max_minutes * 60:
                stopped_early = epoch < cfg.epochs
                break
    except KeyboardInterrupt:
        save_checkpoint(completed)  # keeps the interrupted epoch's updates; --resume repeats that epoch
        if csv_file:
            csv_file.close()
        log.warning("interrupted: checkpoint saved in %s; continue with --resume", checkpoint_path)
        raise TrainingInterrupted(checkpoint_path) from None
    if csv_file:
        csv_file.close()
    save_checkpoint(epoch)
    if world > 1:  # each rank records a digest of its weights: DDP keeps them identical
        import hashlib

        digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in g_ab.state_dict().values())).hexdigest()
        (out_dir / f"rank{rank}-weights.sha256").write_text(digest + "\n")
        import torch.distributed as dist

        # Every collective is done (what rank 0 does next runs on the unwrapped networks): the group
        # ends here, as torch asks, not in the destructors of a process that mr2ct leaves without them.
        dist.destroy_process_group()
    if not is_main:
        return None

    exported = ema if ema is not None else g_ab
    _figures(out_dir, exported, g_ba, mr_pool, ct_pool, cfg)
    config = asdict(cfg)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    metrics: dict[str, Any] = {}
    if cfg.image_size >= 64:  # a quick held-out score in the card; `mr2ct evaluate` gives the full one
        from synthesis.model_file import LoadedModel
        from training.evaluate import evaluate

        exported.eval()
        probe = {"sha256": "", "architecture": cfg.generator, "pixel_spacing_mm": cfg.pixel_spacing_mm,
                 "normalization": {"method": "percentile", "low": 0.5, "high": 99.5}, "hu_range": list(cfg.hu_range),
                 "test_time_augmentation": cfg.test_time_augmentation}
        metrics = evaluate(LoadedModel(exported.cpu(), probe, out_dir), subjects=2, slices=8).card_metrics(cfg.test_time_augmentation, 8)
    card = {
        "name": out_dir.name,
        "architecture": cfg.generator,
        "parameters": (
            {"in_channels": 1, "out_channels": 1, "ngf": cfg.ngf, "n_blocks": cfg.n_blocks}
            if cfg.generator == "resnet" else {"in_channels": 1, "out_channels": 1, "ngf": cfg.ngf}
        ),
        "direction": "MR->CT",
        "pixel_spacing_mm": cfg.pixel_spacing_mm,
        "input_size": cfg.image_size,
        "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
        "n4_bias_correction": False,
        "test_time_augmentation": cfg.test_time_augmentation,
        "hu_range": list(cfg.hu_range),
        **mr_learned(cfg),
        "training": {
            "command": command,
            "seed": cfg.seed,
            "config": config,
            "data": (
                {"cache": str(cfg.data), "mr_slices": int(len(mr_pool)), "ct_slices": int(len(ct_pool)),
                 "manifest_sha256": _manifest_digest(Path(str(cfg.data)))}
                if cfg.data else {"generator": "training.phantoms", "generator_version": phantoms.GENERATOR_VERSION}
            ),
            **({"initialized_from": init_source} if init_source else {}),
            "learned_from_caches": learned_from,
            "exported_weights": f"exponential moving average, decay {cfg.ema_decay}" if ema is not None else "last step",
            "epochs_completed": len(history),
            "world_size": world,
            "stopped_early": stopped_early,
            "seconds": round(time.monotonic() - started, 1),
            "torch": torch.__version__,
            "final_losses": history[-1] if history else {},
        },
        "metrics": metrics,
    }
    return save_model(out_dir / "model.safetensors", exported.cpu(), card)


def _generator(cfg: TrainConfig, device: torch.device) -> nn.Module:
    from synthesis.networks import FcnGenerator, UnetGenerator

    if cfg.generator == "unet":
        return UnetGenerator(ngf=cfg.ngf).to(device)
    if cfg.generator == "fcn":
        return FcnGenerator(ngf=cfg.ngf).to(device)
    return ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks).to(device)


def draw_figures(run: Path, out: Path | None = None) -> list[Path]:
    """On demand, for a run that is still training or has stopped: ``losses.png`` from its
    ``losses.csv`` (every epoch so far) and ``samples.png`` from its latest ``checkpoint.pt`` (the
    generator the run would export: the averaged one under --ema-decay), the kind of figures the run
    draws when it ends (its samples from the first subjects of its pools). Written into ``out``
    (default: the run folder). Returns the files written."""
    from dataclasses import fields

    from training.figures import loss_plot, run_losses

    losses = run_losses(run)
    out = out or run
    out.mkdir(parents=True, exist_ok=True)
    written = [loss_plot(losses, out / "losses.png")]
    checkpoint = run / "checkpoint.pt"
    if not checkpoint.is_file():
        log.warning("no checkpoint.pt in %s yet (--checkpoint-every): losses drawn, samples not", run)
        return written
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # tensors and plain data only
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: (tuple(v) if k == "hu_range" else v) for k, v in state["config"].items() if k in known})
    except Exception as exc:
        raise ValueError(f"{checkpoint} is not a training checkpoint of this version ({type(exc).__name__}: {exc})") from exc
    cpu = torch.device("cpu")
    g_ab, g_ba = _generator(cfg, cpu), _generator(cfg, cpu)
    g_ab.load_state_dict(state.get("ema_g_ab", state["nets"]["g_ab"]))
    g_ba.load_state_dict(state["nets"]["g_ba"])
    # A few subjects are enough for three sample rows: the first of the run's own pools.
    try:
        mr_pool, ct_pool = pools_from_cache(cfg) if cfg.data else make_pools(replace(cfg, subjects_per_pool=min(3, cfg.subjects_per_pool)))
    except (OSError, ValueError) as exc:
        log.warning("the run's dataset cache %s cannot be read (%s): losses drawn, samples not", cfg.data, exc)
        return written
    _figures(out, g_ab, g_ba, mr_pool, ct_pool, cfg, losses=False)
    return [*written, out / "samples.png"]


@torch.no_grad()
def _figures(out_dir: Path, g_ab: nn.Module, g_ba: nn.Module, mr_pool: np.ndarray, ct_pool: np.ndarray, cfg: TrainConfig,
             losses: bool = True) -> None:
    """Loss curves and an image grid (real MR, real CT, sCT, synthetic MR) in the run folder."""
    from synthesis.normalize import unit_to_hu
    from training.figures import image_grid, loss_plot

    if losses:
        loss_plot(out_dir / "losses.csv", out_dir / "losses.png")
    g_ab.eval()
    g_ba.eval()
    device = next(g_ab.parameters()).device
    picks = [len(mr_pool) // 2 + k * cfg.slices_per_subject for k in range(3)]
    rows = []
    for k in picks:
        mr = torch.from_numpy(mr_pool[k % len(mr_pool)][None]).to(device)
        ct = torch.from_numpy(ct_pool[k % len(ct_pool)][None]).to(device)
        sct = g_ab(mr)[0, 0].cpu().numpy()
        smr = g_ba(ct)[0, 0].cpu().numpy()
        rows.append((mr[0, 0].cpu().numpy(), unit_to_hu(ct[0, 0].cpu().numpy(), cfg.hu_range), unit_to_hu(sct, cfg.hu_range), smr))
    image_grid(rows, out_dir / "samples.png")
    g_ab.train()
    g_ba.train()


def initialize_from(source: str, nets: dict[str, nn.Module], device: torch.device) -> dict[str, Any]:
    """Fine-tuning: load network weights (not optimiser state, pool or schedule) from a run folder or
    its checkpoint.pt (all four networks), or from a model file made by `mr2ct train` (the MR->CT
    generator only; the others start fresh). The networks must have the same shapes; the grid
    (pixel spacing, image size) and data may differ — that is the point. Returns what the card
    records about the source."""
    from synthesis.errors import ModelMismatch
    from synthesis.model_file import load_model, sha256_of

    path = Path(source)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"--init-from: {source} is neither a run folder with checkpoint.pt, a checkpoint nor a model file")
    if path.suffix == ".safetensors":
        try:
            model = load_model(path)  # checks the card and the weights' SHA-256
        except ModelMismatch as exc:
            raise ValueError(f"--init-from: {exc}") from exc
        states, digest = {"g_ab": model.generator.state_dict()}, model.sha256
    else:
        try:
            states = torch.load(path, map_location="cpu", weights_only=True)["nets"]  # tensors and plain data only: no pickled code
        except Exception as exc:
            raise ValueError(f"--init-from: {path} is not a training checkpoint ({type(exc).__name__})") from exc
        digest = sha256_of(path)
    for name, state in states.items():
        own = nets[name].state_dict()
        mismatched = sorted(k for k in own.keys() | state.keys() if k not in own or k not in state or own[k].shape != state[k].shape)
        if mismatched:
            raise ValueError(f"--init-from: {name} in {path} has another architecture than this run "
                             f"(first differing weights: {', '.join(mismatched[:3])}); match --ngf/--n-blocks/--ndf/--d-layers/--generator")
        nets[name].load_state_dict({k: v.to(device) for k, v in state.items()})
    log.info("initialized %s from %s", ", ".join(sorted(states)), path)
    return {"path": str(path), "sha256": digest, "networks": sorted(states)}


def learned_from_caches(cfg: TrainConfig, out_dir: Path, resume: bool = False) -> list[str]:
    """The dataset caches (``training.pacs_pull.cache_id``) whose images the weights of this run
    learn from: its own ``--data`` and, through ``--init-from``, every cache the weights it starts
    from learned from (a checkpoint and a model card carry the list, so it follows the weights
    wherever they are copied); on ``--resume``, the list the checkpoint carries. What
    ``GET /audit/lineage`` matches a withdrawn patient's pulls against, on the run's row and on a
    registered model's card (a model trained elsewhere, or with ``--no-record``)."""
    from training.pacs_pull import cache_id

    caches: set[str] = set()
    source = Path(out_dir) / "checkpoint.pt" if resume else Path(str(cfg.init_from)) if cfg.init_from else None
    if source is not None and source.is_dir():
        source = source / "checkpoint.pt"
    if source is not None and source.is_file():
        if source.suffix == ".safetensors":
            from synthesis.model_file import card_path_for

            card_path = card_path_for(source)
            card = json.loads(card_path.read_text()) if card_path.is_file() else {}
            caches.update(card.get("training", {}).get("learned_from_caches", []))
        else:
            try:
                caches.update(torch.load(source, map_location="cpu", weights_only=True).get("learned_from_caches", []))
            except Exception:  # not a checkpoint: initialize_from (or --resume) says so
                pass
    own = cache_id(Path(str(cfg.data))) if cfg.data else None
    if own:
        caches.add(own)
    return sorted(caches)


def _manifest_digest(cache: Path) -> str:
    import hashlib

    manifest = cache / "manifest.jsonl"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else ""
