"""Volume -> volume: normalise the MR, run the generator slice-wise in batches, map to HU.

Each slice is resampled to the model grid (the card's pixel spacing), padded
to a multiple of 4, run, cropped and resampled back, so the sCT has the MR's
matrix and geometry whatever the MR's spacing or matrix. When the model grid is
coarser than the MR, the way back is a guided upsampling with the MR as guide.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from synthesis.errors import SeriesNotUsable, Stopped
from synthesis.model_file import TEST_TIME_AUGMENTATIONS, LoadedModel
from synthesis.networks import low_precision_copy, size_multiple
from synthesis.normalize import mr_to_unit, n4_correct, unit_to_hu
from synthesis.volume import Reslice, Volume, axial_reslice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return f"cpu ({torch.get_num_threads()} threads)"


def choose_device(requested: str) -> DeviceChoice:
    """``auto``: CUDA when present, otherwise CPU. ``cuda`` without a GPU is an error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ValueError("device is 'cuda' but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if requested == "cpu":
        return DeviceChoice(torch.device("cpu"), "device=cpu in the configuration")
    if has_cuda:
        return DeviceChoice(torch.device("cuda"), f"device={requested} and CUDA is available")
    return DeviceChoice(torch.device("cpu"), "device=auto and no CUDA GPU is visible")


def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 natively (AVX-512 BF16 or AMX), where bf16 inference pays off."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability:
        return True
    if "AVX512" not in capability:
        return False  # no AVX-512, or torch's kernels capped below it (ATEN_CPU_CAPABILITY)
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if onednn_cap != "ALL" and not any(isa in onednn_cap for isa in ("BF16", "AMX", "FP16", "AVX10")):
        return False  # oneDNN's convolutions capped below bf16 (e.g. ONEDNN_MAX_CPU_ISA=AVX2)
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 tensor cores (Ampere and later); older GPUs (V100, T4) only emulate it."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively on ``device`` (where it pays off); elsewhere it is emulated and
    slower than fp32 by far."""
    return cuda_has_bf16(device) if device.type == "cuda" else cpu_has_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, fp32 on other CPUs.
    None means fp32."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


CPU_BATCH = 8
MAX_BATCH = 256


def auto_batch_size(generator: torch.nn.Module, grid: tuple[int, int], device: torch.device, dtype: torch.dtype | None) -> int:
    """Slices per batch: on CUDA, sized to half the free GPU memory from one measured slice; on CPU, 8."""
    if device.type != "cuda":
        return CPU_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    probe = torch.zeros(1, 1, *grid, device=device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type="cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        generator(probe)
    per_slice = max(1, torch.cuda.max_memory_allocated(device) - before)
    free, _total = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_BATCH, (free // 2) // per_slice)))


_prepared: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, bool, str], Callable[[torch.Tensor], torch.Tensor]]]" = weakref.WeakKeyDictionary()
_prepare_lock = threading.Lock()


def prepared(generator: torch.nn.Module, dtype: torch.dtype | None, compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator as inference runs it, made once per generator object.

    ``dtype`` bf16 or fp16: a copy with weights of that type (tanh in fp32,
    ``low_precision_copy``) that takes input of that type; measured here faster than autocast,
    which casts at every layer. None: fp32. ``compile``: ``torch.compile`` of it (Inductor fuses
    the normalisation, activation and padding around each convolution; ~2x on this CPU); the
    first batch of each new grid size pays the compilation.
    """
    if dtype is None and not compile:
        return generator
    key = (str(dtype), compile, str(next(generator.parameters()).device))  # a copy lives on its device
    with _prepare_lock:
        variants = _prepared.setdefault(generator, {})
        fn = variants.get(key)
        if fn is None:
            # A copy, never the generator itself: a cached value that referred to its own weak key
            # would keep every model the node ever loaded alive.
            net = low_precision_copy(generator, dtype) if dtype is not None else copy.deepcopy(generator)
            fn = variants[key] = torch.compile(net, dynamic=False) if compile else net
        return fn


GUIDE_RADIUS = 1  # model-grid pixels: a 3x3 window
GUIDE_EPS = 0.1  # in squared units of the [-1, 1] images; below it, a window counts as flat


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (radius,) * 4, mode="replicate"), 2 * radius + 1, stride=1)


def guided_upsample(guide: torch.Tensor, guide_low: torch.Tensor, output_low: torch.Tensor,
                    radius: int = GUIDE_RADIUS, eps: float = GUIDE_EPS) -> torch.Tensor:
    """Bring a coarse-grid output back to the MR's matrix with the MR itself as the guide (the
    guided filter of He et al. 2013, in its joint-upsampling form).

    On the coarse grid, each window fits the output as ``a * MR + b``; ``a`` and ``b`` are
    smoothed, resampled to the full matrix and applied to the full-resolution MR. Flat windows
    (MR variance well below ``eps``) get ``a ~ 0``: the output is only resampled there, no MR
    noise enters. At tissue boundaries the sCT edge follows the MR edge instead of the blur of
    bilinear upsampling; on held-out phantoms this took the 2 mm model shipped until
    2026-11-25 from 155 to 142 HU MAE at 1 mm (the 1 mm model shipped since needs no upsampling
    for 1 mm MR).
    """
    mean_i, mean_p = _box(guide_low, radius), _box(output_low, radius)
    var_i = _box(guide_low * guide_low, radius) - mean_i * mean_i
    cov_ip = _box(guide_low * output_low, radius) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    size = tuple(guide.shape[-2:])
    a_full = F.interpolate(_box(a, radius), size=size, mode="bilinear", align_corners=False)
    b_full = F.interpolate(_box(b, radius), size=size, mode="bilinear", align_corners=False)
    return a_full * guide + b_full


def to_grid(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Slices (N, C, H, W) resampled to ``size`` the way inference takes MR to the model grid
    (bilinear, antialiased when shrinking)."""
    if tuple(batch.shape[-2:]) == size:
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)


def model_grid(shape: tuple[int, int], pixel_spacing: tuple[float, float], model_spacing: float) -> tuple[int, int]:
    """The matrix an MR slice of ``shape`` and ``pixel_spacing`` (mm) has on the model's grid."""
    return max(4, round(shape[0] * pixel_spacing[0] / model_spacing)), max(4, round(shape[1] * pixel_spacing[1] / model_spacing))


def to_mr_matrix(mr: torch.Tensor, mr_on_grid: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """A model-grid output back on the MR's matrix: guided by the MR when the grid is coarser,
    resampled otherwise."""
    size = (int(mr.shape[-2]), int(mr.shape[-1]))
    if output.shape[-2] < size[0] and output.shape[-1] < size[1]:
        return guided_upsample(mr, mr_on_grid, output)
    return to_grid(output, size)


# (transpose, flipped dimensions) of each view; a view is undone by flipping back, then transposing.
_VIEWS: dict[str, tuple[tuple[bool, tuple[int, ...]], ...]] = {
    "none": ((False, ()),),
    "mirror": ((False, ()), (False, (-1,)), (False, (-2,)), (False, (-2, -1))),
}
_VIEWS["dihedral"] = _VIEWS["mirror"] + tuple((True, dims) for _, dims in _VIEWS["mirror"])


def augmented(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str, multiple: int = 4,
              should_stop: Callable[[], bool] | None = None, on_view: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The mean of the generator's outputs over the test-time augmentation's views of ``x``
    (N, C, H, W), each mapped back onto ``x``'s pixels; fp32. The generator is fully
    convolutional, so a transposed view of a non-square grid is just another input shape.
    ``multiple``: what height and width must be multiples of (the generator's stride); the
    shifted modes move the image by half of it, padding (reflected) so the size stays a multiple.
    ``should_stop``: asked before each view after the first; when it says yes, ``Stopped`` is
    raised (one batch of the 32 shifted dihedral views is tens of seconds on a small CPU: a
    cancelled job or a stopping service should not wait for all of them). ``on_view``: told
    (views done, views in all) after each view."""
    shifted = mode.endswith("-shift")
    views = _VIEWS[mode.removesuffix("-shift")]
    half = multiple // 2
    offsets = [(0, 0), (half, 0), (0, half), (half, half)] if shifted and half else [(0, 0)]
    count = len(offsets) * len(views)
    done = 0
    total: torch.Tensor | None = None
    for dr, dc in offsets:
        moved = x if (dr, dc) == (0, 0) else F.pad(x, (dc, multiple - dc if dc else 0, dr, multiple - dr if dr else 0), mode=_pad_mode(x, multiple))
        for transpose, dims in views:
            if done and should_stop is not None and should_stop():
                raise Stopped(f"stopped after {done} of {count} test-time views")
            done += 1
            view = moved.transpose(-1, -2) if transpose else moved
            if dims:
                view = torch.flip(view, dims)
            y = forward(view.contiguous(memory_format=torch.channels_last)).float()
            if dims:
                y = torch.flip(y, dims)
            if transpose:
                y = y.transpose(-1, -2)
            y = y[..., dr : dr + x.shape[-2], dc : dc + x.shape[-1]]
            total = y if total is None else total.add_(y)
            if on_view is not None:
                on_view(done, count)
    assert total is not None
    return total.div_(count) if count > 1 else total


def _pad_mode(x: torch.Tensor, pad: int) -> str:
    """Reflect padding where the image is larger than the pad (always, except on toy grids)."""
    return "reflect" if min(x.shape[-2:]) > pad else "replicate"


def normalised(voxels: np.ndarray, model: LoadedModel) -> np.ndarray:
    """MR voxels in the generator's [-1, 1] units, by the intensity percentiles its card names."""
    norm = model.card["normalization"]
    low, high = float(norm.get("low", 0.5)), float(norm.get("high", 99.5))
    unit = mr_to_unit(voxels, low, high)
    if voxels.size and float(unit.max()) <= -1.0:  # its low and high percentiles are one value
        # A blank MR (a failed acquisition, a placeholder) made a uniform sCT of ~470 HU until 2026-12-05.
        raise SeriesNotUsable(f"the MR has no contrast: its {low:g}th and {high:g}th intensity percentiles are equal (nearly every "
                              "voxel holds one value), so there is no anatomy to synthesize a CT from (a blank or failed acquisition?)")
    return unit


@torch.inference_mode()
def synthesize(
    voxels: np.ndarray,
    pixel_spacing: tuple[float, float],
    model: LoadedModel,
    device: torch.device,
    batch_size: int = 8,
    precision: str = "auto",
    compile: bool = False,
    augment: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[float], None] | None = None,
) -> np.ndarray:
    """MR volume (slices, rows, cols) -> sCT volume in HU, same shape, float32.

    ``compile``: run the generator through ``torch.compile`` (worth it for a long-running node;
    each new grid size compiles once, tens of seconds on a CPU). ``augment``: the test-time
    augmentation (``TEST_TIME_AUGMENTATIONS``); None: the model card's. ``should_stop``: asked
    before each batch and between its test-time views; when it says yes, ``Stopped`` is raised (a
    job cancelled while it runs, a service stopping). ``progress``: told the fraction of the slices
    synthesized (0..1, a batch's test-time views counted) after each view of each batch.
    """
    if voxels.ndim != 3:
        raise ValueError(f"voxels must be (slices, rows, columns), got shape {voxels.shape}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0: sized automatically), got {batch_size}")
    mode = model.test_time_augmentation if augment is None else augment
    if mode not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, got {mode!r}")
    if model.card.get("n4_bias_correction"):
        voxels = n4_correct(voxels, pixel_spacing)
    unit = normalised(voxels, model)
    slices, rows, cols = unit.shape
    target = model.pixel_spacing_mm
    grid = model_grid((rows, cols), pixel_spacing, target)
    multiple = size_multiple(model.generator)
    pad_r, pad_c = (-grid[0]) % multiple, (-grid[1]) % multiple
    generator = model.generator.to(device, memory_format=torch.channels_last)
    compute_dtype = resolve_precision(precision, device)
    if batch_size == 0:
        batch_size = auto_batch_size(generator, (grid[0] + pad_r, grid[1] + pad_c), device, compute_dtype)
    forward = prepared(generator, compute_dtype, compile)
    input_dtype = compute_dtype or torch.float32
    out = np.empty_like(unit)
    started = time.perf_counter()
    for start in range(0, slices, batch_size):
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped after {start} of {slices} slices")
        batch = torch.from_numpy(unit[start : start + batch_size, None]).to(device)
        x = to_grid(batch, grid)
        if pad_r or pad_c:
            x = F.pad(x, (0, pad_c, 0, pad_r), mode=_pad_mode(x, max(pad_r, pad_c)))
        x = x.contiguous(memory_format=torch.channels_last)
        on_view = None
        if progress is not None:
            def on_view(done: int, count: int, start: int = start, size: int = x.shape[0]) -> None:
                progress((start + size * done / count) / slices)
        try:
            y = augmented(forward, x.to(input_dtype), mode, multiple, should_stop, on_view)[..., : grid[0], : grid[1]]
        except Stopped as exc:
            raise Stopped(f"stopped after {start} of {slices} slices; in the next batch: {exc}") from exc
        y = to_mr_matrix(batch, x[..., : grid[0], : grid[1]].float(), y).clamp_(-1.0, 1.0)
        out[start : start + batch_size] = y[:, 0].cpu().numpy()
    log.info(
        "inference slices=%d grid=%dx%d seconds=%.2f device=%s precision=%s compiled=%s tta=%s", slices, grid[0], grid[1],
        time.perf_counter() - started, device, precision_name(compute_dtype), compile, mode,
    )
    return unit_to_hu(out, model.hu_range)


def synthesize_volume(volume: Volume, model: LoadedModel, device: torch.device, plane: str = "auto",
                      **options: Any) -> tuple[np.ndarray, Reslice | None, str]:
    """``synthesize`` of a volume in the plane the generator was trained in when that helps
    (``axial_reslice``: a 3D sagittal or coronal acquisition goes as axial slices, by an exchange
    of axes, and its sCT comes back on the acquisition's own slices). Returns (sCT in HU, shaped
    like ``volume.voxels``; the reslice, None when the acquired slices went; why)."""
    reslice, why = axial_reslice(volume, plane)
    if reslice is None:
        return synthesize(volume.voxels, volume.pixel_spacing, model, device, **options), None, why
    hu = synthesize(reslice.forward(volume.voxels), reslice.pixel_spacing, model, device, **options)
    return reslice.back(hu), reslice, why
