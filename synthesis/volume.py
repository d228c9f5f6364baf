"""DICOM -> volume with geometry. The model never sees a Dataset; writers get the headers back.

Slices are sorted along the slice normal (row x column direction cosines)
using ImagePositionPatient, not by InstanceNumber.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from synthesis.errors import SeriesNotUsable

ORIENTATION_TOLERANCE = 1e-3
POSITION_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Volume:
    """A stack of slices in patient space (LPS, mm)."""

    voxels: np.ndarray  # (slices, rows, columns), float32, stored values after rescale
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    orientation: tuple[float, float, float, float, float, float]  # row then column direction cosines
    positions: np.ndarray  # (slices, 3) ImagePositionPatient of each slice
    frame_of_reference_uid: str

    @property
    def normal(self) -> np.ndarray:
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        return np.cross(row, col)

    @property
    def slice_spacing(self) -> float:
        if len(self.positions) < 2:
            return 0.0
        return float(np.median(np.diff(self.positions @ self.normal)))


@dataclass(frozen=True)
class SourceSeries:
    volume: Volume
    headers: list[Dataset]  # sorted like volume.voxels, pixel data not needed by writers

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count:
        raise SeriesNotUsable(f"instance {ds.get('SOPInstanceUID', '?')} has no usable {keyword} (needs {count} numbers)")
    return numbers


def assemble(datasets: list[Dataset]) -> SourceSeries:
    """Build a volume from single-frame instances of one series; refuse what cannot be one."""
    if not datasets:
        raise SeriesNotUsable("the series has no instances")
    series_uids = {str(ds.get("SeriesInstanceUID")) for ds in datasets}
    if len(series_uids) != 1:
        raise SeriesNotUsable(f"instances belong to {len(series_uids)} series")
    first = datasets[0]
    orientation = _floats(first, "ImageOrientationPatient", 6)
    spacing = _floats(first, "PixelSpacing", 2)
    shape = (int(first.Rows), int(first.Columns))
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesNotUsable("multi-frame instances are not supported yet")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise SeriesNotUsable(f"mixed image sizes in the series: {shape} and {(int(ds.Rows), int(ds.Columns))}")
        if np.max(np.abs(np.subtract(_floats(ds, "ImageOrientationPatient", 6), orientation))) > ORIENTATION_TOLERANCE:
            raise SeriesNotUsable("mixed orientations in the series (ImageOrientationPatient differs between instances)")
        if np.max(np.abs(np.subtract(_floats(ds, "PixelSpacing", 2), spacing))) > 1e-4:
            raise SeriesNotUsable("mixed pixel spacings in the series")
    for_uids = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(for_uids) != 1 or "" in for_uids:
        raise SeriesNotUsable("instances must share one FrameOfReferenceUID")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    if len(order) > 1 and np.min(np.diff(sorted_distances)) < POSITION_TOLERANCE_MM:
        raise SeriesNotUsable("two or more instances share one slice position")
    headers = [datasets[i] for i in order]
    voxels = np.empty((len(headers), *shape), dtype=np.float32)
    for i, ds in enumerate(headers):
        pixels = ds.pixel_array.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        voxels[i] = pixels * slope + intercept
    volume = Volume(
        voxels=voxels,
        pixel_spacing=(spacing[0], spacing[1]),
        orientation=orientation,  # type: ignore[arg-type]
        positions=positions[order],
        frame_of_reference_uid=for_uids.pop(),
    )
    return SourceSeries(volume=volume, headers=headers)
