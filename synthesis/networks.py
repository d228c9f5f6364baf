"""Generator and discriminator builders (pure ``nn.Module``s).

Generators, chosen by a model card's ``architecture``: ``resnet``, the ResNet generator of
Zhu et al. 2017 (CycleGAN: reflection padding, instance normalisation, two stride-2
downsamplings, ``n_blocks`` residual blocks, two transposed-convolution upsamplings, tanh);
``unet``; ``fcn``, the seed paper's fully convolutional layer recipe as an encoder-decoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def fp32_tanh(pre_activation: torch.Tensor) -> torch.Tensor:
    """A generator's final tanh, computed in fp32 whatever the precision of the layers before it.

    The output is mapped to HU: a bf16 tanh output would be quantised to steps of ~6 HU near the
    ends of the range (8-bit mantissa), while a bf16 *input* to an fp32 tanh costs well under
    a HU (the tanh flattens exactly where bf16 steps are coarse)."""
    return torch.tanh(pre_activation.float())


def low_precision_copy(generator: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of a generator with bf16 (or fp16) weights, for inference without autocast's casts
    at every layer (faster on CPUs and GPUs alike). Feed it input of that dtype; its tanh output
    is fp32."""
    import copy

    return copy.deepcopy(generator).to(dtype).eval()


class ResnetBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=True),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """ResNet generator (Zhu et al. 2017), one input and one output channel by default.

    Input height and width must be multiples of 4 (two stride-2 steps); callers pad.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        if ngf < 1:
            raise ValueError(f"ngf must be >= 1, got {ngf}")
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, kernel_size=7, bias=True),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        channels = ngf
        for _ in range(2):
            layers += [
                nn.Conv2d(channels, channels * 2, kernel_size=3, stride=2, padding=1, bias=True),
                nn.InstanceNorm2d(channels * 2),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        layers += [ResnetBlock(channels) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, kernel_size=3, stride=2, padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_tanh(self.model[:-1](x))  # self.model[-1] is the nn.Tanh, applied here in fp32


class UnetGenerator(nn.Module):
    """U-Net generator (Ronneberger et al.; as in Isola et al. / Zhu et al.): ``depth`` stride-2
    encoder steps with skip connections, instance normalisation, tanh output.

    Height and width must be multiples of ``2**depth``; callers pad (``size_multiple``).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 32, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.size_multiple = 2**depth
        self.inc = nn.Sequential(nn.Conv2d(in_channels, ngf, 3, padding=1), nn.InstanceNorm2d(ngf), nn.LeakyReLU(0.2, True))
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        channels = [ngf * min(2**i, 8) for i in range(depth + 1)]
        for i in range(depth):
            self.down.append(nn.Sequential(
                nn.Conv2d(channels[i], channels[i + 1], 4, stride=2, padding=1), nn.InstanceNorm2d(channels[i + 1]), nn.LeakyReLU(0.2, True),
            ))
        for i in reversed(range(depth)):
            self.up.append(nn.Sequential(
                nn.ConvTranspose2d(channels[i + 1] * (1 if i == depth - 1 else 2), channels[i], 4, stride=2, padding=1),
                nn.InstanceNorm2d(channels[i]), nn.ReLU(True),
            ))
        self.out = nn.Sequential(nn.Conv2d(channels[0] * 2, out_channels, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        y = skips.pop()
        for i, layer in enumerate(self.up):
            y = layer(y)
            y = torch.cat([y, skips.pop()], dim=1)
        return fp32_tanh(self.out[0](y))  # self.out[1] is the nn.Tanh, applied here in fp32


class FcnGenerator(nn.Module):
    """The seed paper's fully convolutional set-up as a generator (card ``"fcn"``): an encoder of
    the layers its discriminator is built from (Conv2d k4 s2, BatchNorm, LeakyReLU 0.2), a decoder
    of transposed convolutions (k4 s2, BatchNorm, ReLU), a 3x3 convolution and tanh; no skip
    connections or residual blocks. The paper's text fixes its discriminator's layers, not its
    generator's; this is that layer recipe run down and back up.

    Height and width must be multiples of ``2**depth``; callers pad (``size_multiple``).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 32, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.size_multiple = 2**depth
        channels = [ngf * min(2**i, 8) for i in range(depth)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for i in range(1, depth):
            layers += [nn.Conv2d(channels[i - 1], channels[i], 4, stride=2, padding=1), nn.BatchNorm2d(channels[i]), nn.LeakyReLU(0.2, True)]
        for i in reversed(range(depth)):
            target = channels[i - 1] if i else channels[0]
            layers += [nn.ConvTranspose2d(channels[i], target, 4, stride=2, padding=1), nn.BatchNorm2d(target), nn.ReLU(True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_tanh(self.out(self.body(x)))


class PaperDiscriminator(nn.Module):
    """The seed paper's fully convolutional discriminator: Conv2d k4 s2, BatchNorm, LeakyReLU 0.2,
    ending in a one-channel patch map (use with BCE, as the paper)."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(channels, channels * 2, 4, stride=2, padding=1), nn.BatchNorm2d(channels * 2), nn.LeakyReLU(0.2, True)]
            channels *= 2
        layers += [nn.Conv2d(channels, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Zhu et al. 2017); ``n_layers=3`` gives the 70x70 receptive field."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


GENERATORS: dict[str, type[nn.Module]] = {"resnet": ResnetGenerator, "unet": UnetGenerator, "fcn": FcnGenerator}


def size_multiple(generator: nn.Module) -> int:
    """What input height and width must be multiples of (ResNet: 4, U-Net and FCN: 2**depth)."""
    return int(getattr(generator, "size_multiple", 4))


def build_generator(architecture: str, params: dict[str, Any]) -> nn.Module:
    """Build the generator a model card names; unknown names are refused."""
    try:
        cls = GENERATORS[architecture]
    except KeyError:
        raise ValueError(f"unknown generator architecture {architecture!r}; known: {sorted(GENERATORS)}") from None
    return cls(**params)
