"""Intensity mappings between stored values and the network's [-1, 1] range (pure functions)."""

from __future__ import annotations

import numpy as np

HU_MIN, HU_MAX = -1024.0, 3071.0


MAX_HISTOGRAM_BINS = 1 << 22


def percentiles(volume: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(volume, qs)`` (linear interpolation), computed from a histogram when the
    values are integers in a modest range, as MR pixel data almost always are: one counting pass
    instead of a partition of the whole volume (~3x faster on a 64-slice 256x256 series). The
    order statistics are exact and the interpolation is numpy's, so the result is the same."""
    flat = volume.ravel()
    n = flat.size
    if n == 0:
        raise ValueError("percentiles of an empty volume")
    low, high = float(flat.min()), float(flat.max())
    if not (np.isfinite(low) and np.isfinite(high)) or high - low >= MAX_HISTOGRAM_BINS or not np.array_equal(flat, np.floor(flat)):
        return tuple(float(v) for v in np.percentile(volume, qs))
    cumulative = np.cumsum(np.bincount((flat - low).astype(np.int32)))
    out = []
    for q in qs:
        virtual = (n - 1) * (np.float64(q) / 100)  # numpy's virtual index for the linear method
        previous = int(np.clip(np.floor(virtual), 0, n - 1))
        following = min(previous + 1, n - 1)
        gamma = virtual - np.floor(virtual)
        a = np.float32(low + np.searchsorted(cumulative, previous, side="right"))
        b = np.float32(low + np.searchsorted(cumulative, following, side="right"))
        diff = b - a  # in the data's precision, as numpy's lerp does
        out.append(float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma))
    return tuple(out)


def mr_to_unit(volume: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5) -> np.ndarray:
    """Robust percentile clipping of a whole MR volume to [-1, 1].

    Percentiles are taken over the whole volume so that every slice of a series
    gets the same mapping.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_percentile}, {high_percentile}")
    volume = np.asarray(volume, dtype=np.float32)
    lo, hi = percentiles(volume, (low_percentile, high_percentile))
    if hi <= lo:
        return np.full(volume.shape, -1.0, dtype=np.float32)
    scaled = (volume - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def hu_to_unit(hu: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_range
    return (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def unit_to_hu(unit: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    """Network output in [-1, 1] to HU, clipped to what CT storage holds ([-1024, 3071])."""
    lo, hi = hu_range
    hu = (np.asarray(unit, dtype=np.float32) + 1.0) / 2.0 * (hi - lo) + lo
    return np.clip(hu, HU_MIN, HU_MAX)


def n4_correct(volume: np.ndarray, pixel_spacing: tuple[float, float], shrink: int = 4, iterations: int = 30) -> np.ndarray:
    """N4 bias-field correction (Tustison et al. 2010, SimpleITK), as the paper's future work proposes.

    The field is estimated on a shrunken copy inside an Otsu head mask and divided out at full
    resolution; slices are treated as one volume.
    """
    import SimpleITK as sitk

    data = np.asarray(volume, dtype=np.float32)
    image = sitk.GetImageFromArray(np.maximum(data, 0) + 1.0)
    image.SetSpacing((float(pixel_spacing[1]), float(pixel_spacing[0]), 1.0))
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    factor = [shrink, shrink, 1] if data.shape[0] < 2 * shrink else [shrink] * 3
    small = sitk.Shrink(image, factor)
    small_mask = sitk.Shrink(mask, factor)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([iterations] * 3)
    corrector.Execute(small, small_mask)
    log_field = corrector.GetLogBiasFieldAsImage(image)
    field = np.exp(sitk.GetArrayFromImage(log_field)).astype(np.float32)
    return (np.maximum(data, 0) + 1.0) / field - 1.0
