"""DICOM -> volume with geometry. The model never sees a Dataset; writers get the headers back.

Slices are sorted along the slice normal (row x column direction cosines)
using ImagePositionPatient, not by InstanceNumber.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

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
    headers: list[Dataset]  # sorted like volume.voxels; a multi-frame instance appears once per frame
    frames: list[int | None] = field(default_factory=list)  # 1-based frame number, None for single-frame
    slice_thickness: list[str] = field(default_factory=list)

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)


@dataclass(frozen=True)
class FrameGeometry:
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: str
    rescale: tuple[float, float]  # slope, intercept


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count:
        raise SeriesNotUsable(f"instance {ds.get('SOPInstanceUID', '?')} has no usable {keyword} (needs {count} numbers)")
    return numbers


def _group(ds: Dataset, shared: Dataset | None, per_frame: Dataset, sequence: str) -> Dataset | None:
    for source in (per_frame, shared):
        if source is not None and sequence in source and len(source[sequence].value):
            return source[sequence].value[0]
    return None


def frame_geometry(ds: Dataset) -> list[FrameGeometry]:
    """Geometry of every frame: top-level attributes for single-frame instances, functional groups
    (per-frame first, then shared) for enhanced multi-frame ones."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if frames != 1:
            raise SeriesNotUsable(f"instance {ds.get('SOPInstanceUID', '?')} has {frames} frames but no per-frame functional groups")
        rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
        return [
            FrameGeometry(
                _floats(ds, "ImagePositionPatient", 3), _floats(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
                _floats(ds, "PixelSpacing", 2), str(ds.get("SliceThickness", "") or ""), rescale,  # type: ignore[arg-type]
            )
        ]
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise SeriesNotUsable(f"NumberOfFrames is {frames} but there are {len(per_frame)} per-frame functional groups")
    out = []
    for item in per_frame:
        position = _group(ds, shared, item, "PlanePositionSequence")
        orientation = _group(ds, shared, item, "PlaneOrientationSequence")
        measures = _group(ds, shared, item, "PixelMeasuresSequence")
        transform = _group(ds, shared, item, "PixelValueTransformationSequence")
        if position is None or orientation is None or measures is None:
            raise SeriesNotUsable("a frame lacks plane position, plane orientation or pixel measures")
        rescale = (1.0, 0.0)
        if transform is not None:
            rescale = (float(transform.get("RescaleSlope", 1) or 1), float(transform.get("RescaleIntercept", 0) or 0))
        out.append(
            FrameGeometry(
                _floats(position, "ImagePositionPatient", 3), _floats(orientation, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
                _floats(measures, "PixelSpacing", 2), str(measures.get("SliceThickness", "") or ""), rescale,  # type: ignore[arg-type]
            )
        )
    return out


COS_10_DEGREES = math.cos(math.radians(10.0))


def orientation_label(iop: list[float] | tuple[float, ...]) -> str:
    """axial / sagittal / coronal when the slice normal is within 10 degrees of an axis, else oblique."""
    rx, ry, rz, cx, cy, cz = (float(v) for v in iop[:6])
    normal = (abs(ry * cz - rz * cy), abs(rz * cx - rx * cz), abs(rx * cy - ry * cx))  # |row x column|
    length = math.sqrt(sum(n * n for n in normal))
    if length == 0:
        return "oblique"
    axis = max(range(3), key=normal.__getitem__)
    if normal[axis] / length < COS_10_DEGREES:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


SYNTHESIS_PLANES = ("auto", "axial", "acquired")
# auto reslices a volume whose slices are at most this many times further apart than its pixels (a 3D acquisition) ...
RESLICE_MAX_SPACING_RATIO = 1.5
# ... and whose slab spans at least this fraction of its slices' shorter side (the head, not a thin slab of it).
RESLICE_MIN_EXTENT_FRACTION = 0.5


@dataclass(frozen=True)
class Reslice:
    """A volume's voxels seen as axial slices: an exchange of array axes and flips (no
    interpolation), so that each 2D slice the generator sees is in the plane it was trained in
    (the phantoms' and pulled caches' axial slices: rows running posterior, columns to the
    patient's left). ``back`` undoes ``forward`` exactly."""

    axes: tuple[int, int, int]  # the volume's array axis that becomes (slices, rows, columns)
    flips: tuple[bool, bool, bool]
    pixel_spacing: tuple[float, float]  # (between rows, between columns) of the axial slices, mm
    slice_spacing: float  # between the axial slices, mm
    acquired: str  # the acquisition's plane, for logs and provenance: sagittal, coronal, oblique

    def forward(self, voxels: np.ndarray) -> np.ndarray:
        view = np.transpose(voxels, self.axes)
        return np.ascontiguousarray(np.flip(view, [a for a, f in enumerate(self.flips) if f]))

    def back(self, voxels: np.ndarray) -> np.ndarray:
        view = np.flip(voxels, [a for a, f in enumerate(self.flips) if f])
        return np.ascontiguousarray(np.transpose(view, np.argsort(self.axes)))

    def volume(self, source: Volume, voxels: np.ndarray | None = None) -> Volume:
        """``source`` as the axial volume the generator sees: ``forward`` of its voxels (or of
        ``voxels``, shaped like them: its sCT) with the geometry that puts each voxel where it was
        in patient space, so that the axial slices can be written as images of their own."""
        directions = _axial_axes(source.orientation)[1]  # of the source's array axes: slices, rows, columns
        steps = [0.0, 0.0, 0.0]  # between the source's slices, rows, columns: this reslice's spacings, put back in place
        for axis, step in zip(self.axes, (self.slice_spacing, *self.pixel_spacing)):
            steps[axis] = step
        shape = source.voxels.shape
        origin = np.asarray(source.positions[0], dtype=float).copy()
        for n, axis in enumerate(self.axes):  # a flipped axis starts at the source's far end
            if self.flips[n]:
                origin += (shape[axis] - 1) * steps[axis] * directions[axis]
        axes_out = [(-1.0 if self.flips[n] else 1.0) * directions[axis] for n, axis in enumerate(self.axes)]
        positions = origin + np.arange(shape[self.axes[0]])[:, None] * steps[self.axes[0]] * axes_out[0]
        return Volume(
            voxels=self.forward(source.voxels if voxels is None else voxels),
            pixel_spacing=(steps[self.axes[1]], steps[self.axes[2]]),
            orientation=tuple(float(v) for v in (*axes_out[2], *axes_out[1])),  # type: ignore[arg-type]
            positions=positions,
            frame_of_reference_uid=source.frame_of_reference_uid,
        )


def _axial_axes(orientation: tuple[float, ...] | list[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The exchange of a volume's array axes (slices, rows, columns) that brings them closest to
    (z, y, x), and the patient direction (LPS) of each array axis."""
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float)
    directions = np.array([np.cross(row, col), col, row])
    axes = max(itertools.permutations(range(3)), key=lambda p: sum(abs(directions[p[i], 2 - i]) for i in range(3)))
    return axes, directions  # type: ignore[return-value]


def slices_closest_to_axial(orientation: tuple[float, ...] | list[float]) -> bool:
    """Whether slices of this orientation are the ones closest to axial already: such a volume is
    never resliced, whatever ``synthesis_plane`` says."""
    return _axial_axes(orientation)[0][0] == 0


def axial_reslice(volume: Volume, plane: str = "auto") -> tuple[Reslice | None, str]:
    """How a volume goes to the generator: (None, why) in its acquired slices, or (a Reslice, why)
    as axial slices. ``plane``: ``acquired`` never reslices; ``axial`` reslices every volume that
    is not axial already and has evenly spaced slices; ``auto`` only those whose slices are about
    as far apart as their pixels (a 3D acquisition: at most ``RESLICE_MAX_SPACING_RATIO`` times)
    and whose slab covers the head (at least ``RESLICE_MIN_EXTENT_FRACTION`` of the slices'
    shorter side). A model that sees a head in another plane than it learnt does worse, and a
    thick-slice series resliced is worse still (its slice gap across every axial slice):
    ``bench/plane.py`` measures both on phantom heads."""
    if plane not in SYNTHESIS_PLANES:
        raise ValueError(f"plane must be one of {', '.join(SYNTHESIS_PLANES)}, got {plane!r}")
    axes, directions = _axial_axes(volume.orientation)
    acquired = orientation_label(volume.orientation)
    if axes[0] == 0:  # its slices are the ones closest to axial already
        return None, f"{acquired} slices as acquired"
    if plane == "acquired":
        return None, f"{acquired} slices as acquired (synthesis_plane acquired)"
    slices = len(volume.positions)
    if slices < 2:
        return None, f"{acquired} slice as acquired (one slice)"
    gaps = np.diff(volume.positions @ volume.normal)
    if np.max(np.abs(gaps - gaps.mean())) > 0.1 * abs(gaps.mean()):
        return None, f"{acquired} slices as acquired (slices not evenly spaced: no axial view without interpolation)"
    spacing = (abs(float(gaps.mean())), *volume.pixel_spacing)
    if plane == "auto":
        ratio = spacing[0] / max(volume.pixel_spacing)
        side = min(volume.voxels.shape[1] * spacing[1], volume.voxels.shape[2] * spacing[2])
        if ratio > RESLICE_MAX_SPACING_RATIO:
            return None, f"{acquired} slices as acquired ({spacing[0]:.2g} mm apart, {ratio:.2g}x the pixel spacing: resliced they would blur)"
        if slices * spacing[0] < RESLICE_MIN_EXTENT_FRACTION * side:
            return None, f"{acquired} slices as acquired (a slab of {slices * spacing[0]:.0f} mm: axial slices of it would not show the head)"
    flips = tuple(bool(directions[axes[i], 2 - i] < 0) for i in range(3))
    reslice = Reslice(axes=axes, flips=flips, pixel_spacing=(spacing[axes[1]], spacing[axes[2]]),  # type: ignore[arg-type]
                      slice_spacing=spacing[axes[0]], acquired=acquired)
    return reslice, f"axial slices resliced from the {acquired} acquisition"


# What can make a series hold several images per position: (what, its attribute in a single-frame
# instance, its functional group and attribute in an enhanced multi-frame one).
_REPEATS = (
    ("echoes", "EchoNumbers", ("MREchoSequence", "EffectiveEchoTime")),
    ("time points", "TemporalPositionIdentifier", ("FrameContentSequence", "TemporalPositionIndex")),
    ("b-values", "DiffusionBValue", ("MRDiffusionSequence", "DiffusionBValue")),
    ("image types", "ImageType", ("MRImageFrameTypeSequence", "FrameType")),
    ("stacks", "StackID", ("FrameContentSequence", "StackID")),
)


def _frame_value(ds: Dataset, frame: int | None, keyword: str, group: tuple[str, str]) -> tuple[str, str] | None:
    """(attribute, value) of one repeat marker for one image: a frame's functional group (per-frame,
    then shared), a legacy converted frame's unassigned attributes, else the instance's own."""
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        item = ds.PerFrameFunctionalGroupsSequence[frame - 1]
        sequence, attribute = group
        found = _group(ds, shared, item, sequence)
        if found is not None and attribute in found:
            return attribute, str(found.get(attribute))
        unassigned = _group(ds, shared, item, "UnassignedPerFrameConvertedAttributesSequence")
        if unassigned is not None and keyword in unassigned:
            return keyword, str(unassigned.get(keyword))
    return (keyword, str(ds.get(keyword))) if keyword in ds else None


def _why_positions_repeat(images: list[tuple[Dataset, int | None]]) -> str:
    """What makes a series hold several images per position, when its headers say (several echoes,
    time points, b-values, image types, stacks), single-frame or enhanced multi-frame: the series is
    then several volumes, and which one to use is the site's call."""
    reasons = []
    for what, keyword, group in _REPEATS:
        seen = [v for v in (_frame_value(ds, frame, keyword, group) for ds, frame in images) if v is not None]
        values = {value for _, value in seen}
        if len(values) > 1:
            reasons.append(f"{len(values)} {what} ({seen[0][0]})")
    if not reasons:
        return ""
    return (f": the series holds {', '.join(reasons)}, one volume each; send one of them as its own series "
            "(most scanners can save echoes or phases as separate series), or exclude the series by its description")


def assemble(datasets: list[Dataset]) -> SourceSeries:
    """Build a volume from the instances of one series (single-frame or enhanced multi-frame);
    refuse what cannot be one volume."""
    if not datasets:
        raise SeriesNotUsable("the series has no instances")
    series_uids = {str(ds.get("SeriesInstanceUID")) for ds in datasets}
    if len(series_uids) != 1:
        raise SeriesNotUsable(f"instances belong to {len(series_uids)} series")
    for_uids = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets}
    if "" in for_uids:
        without = sum(not ds.get("FrameOfReferenceUID") for ds in datasets)
        raise SeriesNotUsable(f"{without} of the series' {len(datasets)} instances have no FrameOfReferenceUID: the sCT could not "
                              "say where it lies (export the series from the scanner or PACS with it)")
    if len(for_uids) != 1:
        raise SeriesNotUsable(f"the instances name {len(for_uids)} frames of reference (FrameOfReferenceUID): one volume needs one")
    for ds in datasets:
        samples, photometric = int(ds.get("SamplesPerPixel", 1) or 1), str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if samples != 1 or not photometric.startswith("MONOCHROME"):
            raise SeriesNotUsable(f"instance {ds.get('SOPInstanceUID', '?')} is not greyscale (SamplesPerPixel {samples}, "
                                  f"PhotometricInterpretation {photometric}): the model takes MR signal, one value per pixel")
    slices: list[tuple[Dataset, int | None, FrameGeometry]] = []
    for ds in datasets:
        geometry = frame_geometry(ds)
        multi = "PerFrameFunctionalGroupsSequence" in ds
        slices.extend((ds, (i + 1) if multi else None, g) for i, g in enumerate(geometry))
    first = slices[0]
    orientation, spacing = first[2].orientation, first[2].pixel_spacing
    shape = (int(first[0].Rows), int(first[0].Columns))
    for ds, _, g in slices:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise SeriesNotUsable(f"mixed image sizes in the series: {shape} and {(int(ds.Rows), int(ds.Columns))}")
        if np.max(np.abs(np.subtract(g.orientation, orientation))) > ORIENTATION_TOLERANCE:
            raise SeriesNotUsable("mixed orientations in the series (ImageOrientationPatient differs between slices)")
        if np.max(np.abs(np.subtract(g.pixel_spacing, spacing))) > 1e-4:
            raise SeriesNotUsable("mixed pixel spacings in the series")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([g.position for _, _, g in slices])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    if len(order) > 1 and np.min(np.diff(distances[order])) < POSITION_TOLERANCE_MM:
        raise SeriesNotUsable("two or more slices share one position" + _why_positions_repeat([(ds, frame) for ds, frame, _ in slices]))
    voxels = np.empty((len(order), *shape), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    for out_index, i in enumerate(order):
        ds, frame, g = slices[i]
        if id(ds) not in decoded:
            decoded[id(ds)] = ds.pixel_array
        pixels = decoded[id(ds)]
        plane = pixels[frame - 1] if frame is not None and pixels.ndim == 3 else pixels
        voxels[out_index] = plane.astype(np.float32) * g.rescale[0] + g.rescale[1]
    volume = Volume(
        voxels=voxels,
        pixel_spacing=spacing,
        orientation=orientation,
        positions=positions[order],
        frame_of_reference_uid=for_uids.pop(),
    )
    return SourceSeries(
        volume=volume,
        headers=[slices[i][0] for i in order],
        frames=[slices[i][1] for i in order],
        slice_thickness=[slices[i][2].slice_thickness for i in order],
    )


TRANSVERSE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows running posterior, columns to the patient's left

# Transverse slices as a CT scanner writes them for each Patient Position (0018,5100): rows along
# the equipment's X axis, columns along its Y axis (towards the floor), with the patient's left,
# posterior and head directions on the table as PS3.17 FFF.1.2.2 tabulates them for the eight
# positions (the row is the X components of those three, the column their Y components). A
# planning system may expect a prone or feet-first patient's CT in these; HFS is TRANSVERSE.
SCANNER_TRANSVERSE: dict[str, tuple[float, float, float, float, float, float]] = {
    "HFS": TRANSVERSE,
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "HFDR": (0.0, 1.0, 0.0, -1.0, 0.0, 0.0),
    "HFDL": (0.0, -1.0, 0.0, 1.0, 0.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFDR": (0.0, -1.0, 0.0, -1.0, 0.0, 0.0),
    "FFDL": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
}


def scanner_transverse(patient_position: object) -> tuple[float, float, float, float, float, float]:
    """The orientation of transverse slices a CT scanner writes for ``patient_position`` (a
    Patient Position value); TRANSVERSE (head first supine) for an empty or unknown one."""
    return SCANNER_TRANSVERSE.get(str(patient_position or "").strip().upper(), TRANSVERSE)


def reoriented(volume: Volume, orientation: tuple[float, ...]) -> Volume:
    """A volume of evenly spaced slices, its voxels seen in slices of another ``orientation`` whose
    rows, columns and normal each run along one of its own array axes (either way): an exchange of
    axes and flips, no interpolation; each voxel stays at its point in patient space, and the new
    slices lie one after the other along the new normal. The volume itself when it has that
    orientation already."""
    if np.allclose(volume.orientation, orientation, atol=ORIENTATION_TOLERANCE):
        return volume
    row, col = np.asarray(volume.orientation[:3], dtype=float), np.asarray(volume.orientation[3:6], dtype=float)
    first_step = volume.positions[1] - volume.positions[0] if len(volume.positions) > 1 else np.cross(row, col)
    steps = [float(np.linalg.norm(first_step)) if len(volume.positions) > 1 else 0.0, volume.pixel_spacing[0], volume.pixel_spacing[1]]
    moves = np.array([first_step / np.linalg.norm(first_step), col, row])  # where each array axis runs: slices, rows, columns
    new_row, new_col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float)
    match = np.array([np.cross(new_row, new_col), new_col, new_row]) @ moves.T  # new axis (rows) against old axis (columns)
    axes = [int(np.argmax(np.abs(match[n]))) for n in range(3)]
    if sorted(axes) != [0, 1, 2] or not np.allclose(np.abs(match[range(3), axes]), 1.0, atol=ORIENTATION_TOLERANCE):
        raise ValueError(f"orientation {tuple(orientation)} is not an exchange of the axes of {tuple(volume.orientation)}")
    flips = [bool(match[n, axes[n]] < 0) for n in range(3)]
    voxels = np.flip(np.transpose(volume.voxels, axes), [n for n in range(3) if flips[n]])
    shape = volume.voxels.shape
    corner = [shape[axes[n]] - 1 if flips[n] else 0 for n in range(3)]  # the old index of the new first voxel, by new axis
    old_index = [0, 0, 0]
    for n in range(3):
        old_index[axes[n]] = corner[n]
    origin = volume.positions[old_index[0]] + old_index[1] * steps[1] * col + old_index[2] * steps[2] * row
    normal = np.cross(new_row, new_col)
    positions = origin + np.arange(voxels.shape[0])[:, None] * steps[axes[0]] * normal
    return Volume(voxels=np.ascontiguousarray(voxels), pixel_spacing=(steps[axes[1]], steps[axes[2]]),
                  orientation=tuple(float(v) for v in orientation),  # type: ignore[arg-type]
                  positions=positions, frame_of_reference_uid=volume.frame_of_reference_uid)


def is_transverse(orientation: tuple[float, ...] | list[float], tolerance: float = 1e-4) -> bool:
    """Whether slices of this orientation are transverse exactly: rows and columns each along the
    patient's x or y axis (either way), so the slice normal is the z axis."""
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:6], dtype=float)
    return bool(abs(row[2]) < tolerance and abs(col[2]) < tolerance
                and all(np.sort(np.abs(v))[1] < tolerance for v in (row, col)))


def transverse_grid(volume: Volume) -> Volume:
    """Transverse slices (``TRANSVERSE``, feet to head) at the volume's own pixel and slice spacing
    that cover every voxel centre of it: where a tilted volume is resampled to be written as axial
    slices. Its voxels are empty (NaN) until filled.

    The grid's points lie on a lattice fixed in patient space (whole multiples of its steps from
    the origin), not at the volume's corner: a late slice that grows the volume adds slices to the
    grid and moves none, so the slices already written keep their positions (and UIDs, which
    follow them); until 2026-12-05 every slice moved with the box."""
    shape = np.array(volume.voxels.shape)
    row, col = np.asarray(volume.orientation[:3], dtype=float), np.asarray(volume.orientation[3:6], dtype=float)
    spacing = abs(volume.slice_spacing) or min(volume.pixel_spacing)
    extent = [(shape[0] - 1) * spacing * volume.normal, (shape[1] - 1) * volume.pixel_spacing[0] * col,
              (shape[2] - 1) * volume.pixel_spacing[1] * row]
    corners = np.array([volume.positions[0] + sum(e * bit for e, bit in zip(extent, bits)) for bits in itertools.product((0, 1), repeat=3)])
    low, high = corners.min(axis=0), corners.max(axis=0)
    step = min(volume.pixel_spacing)  # in plane: the finer of the MR's two
    low = np.floor(low / np.array([step, step, spacing]) + 1e-6) * np.array([step, step, spacing])
    columns, rows = (int(np.floor((high[a] - low[a]) / step + 1e-6)) + 1 for a in (0, 1))
    slices = int(np.floor((high[2] - low[2]) / spacing + 1e-6)) + 1
    positions = np.array([[low[0], low[1], low[2] + k * spacing] for k in range(slices)])
    return Volume(voxels=np.full((slices, rows, columns), np.nan, np.float32), pixel_spacing=(step, step), orientation=TRANSVERSE,
                  positions=positions, frame_of_reference_uid=volume.frame_of_reference_uid)


def slice_points(volume: Volume, k: int) -> np.ndarray:
    """Patient coordinates (LPS, mm) of the voxel centres of slice ``k``: (rows, columns, 3)."""
    row, col = np.asarray(volume.orientation[:3]), np.asarray(volume.orientation[3:])
    rows, columns = volume.voxels.shape[1:]
    down = np.arange(rows)[:, None, None] * volume.pixel_spacing[0] * col
    across = np.arange(columns)[None, :, None] * volume.pixel_spacing[1] * row
    return volume.positions[k] + down + across


def resample(moving: Volume, onto: Volume, onto_to_moving: np.ndarray | None = None) -> np.ndarray:
    """``moving``'s voxels sampled (trilinear) at the voxel centres of ``onto``: (slices, rows,
    columns) of ``onto``, NaN where ``moving`` does not reach. The two share a frame of reference,
    or ``onto_to_moving`` (4x4, homogeneous) takes ``onto``'s patient coordinates into ``moving``'s
    (a spatial registration between their frames).

    Slices of ``moving`` may be unevenly spaced or tilted (each slice's own position is used); a
    single-slice ``moving`` is sampled only within half a pixel of its plane.
    """
    from scipy import ndimage

    if onto_to_moving is None and moving.frame_of_reference_uid != onto.frame_of_reference_uid:
        raise SeriesNotUsable("the two series do not share a frame of reference (and no registration relates them): their voxels cannot be matched")
    row, col, normal = np.asarray(moving.orientation[:3]), np.asarray(moving.orientation[3:]), moving.normal
    count, rows, columns = moving.voxels.shape
    distances = moving.positions @ normal  # ascending: assemble sorts along the normal
    tolerance = 1e-3  # voxels: a grid that matches ``moving``'s exactly is inside at its edges
    out = np.empty(onto.voxels.shape, dtype=np.float32)
    for k in range(len(onto.positions)):
        points = slice_points(onto, k)
        if onto_to_moving is not None:
            points = points @ onto_to_moving[:3, :3].T + onto_to_moving[:3, 3]
        d = points @ normal
        # The first and last planes are inside however the positions were rounded (DICOM's decimal strings).
        d = np.where(np.abs(d - distances[0]) <= POSITION_TOLERANCE_MM, distances[0], d)
        d = np.where(np.abs(d - distances[-1]) <= POSITION_TOLERANCE_MM, distances[-1], d)
        if count == 1:
            s = np.where(np.abs(d - distances[0]) <= 0.5 * min(moving.pixel_spacing), 0.0, np.nan)
        else:
            s = np.interp(d, distances, np.arange(count, dtype=np.float64), left=np.nan, right=np.nan)
        inside_s = ~np.isnan(s)
        s = np.nan_to_num(s, nan=0.0)
        origin = np.stack([np.interp(s, np.arange(count), moving.positions[:, a]) for a in range(3)], axis=-1)
        u = (points - origin) @ row / moving.pixel_spacing[1]  # column index
        v = (points - origin) @ col / moving.pixel_spacing[0]  # row index
        inside = inside_s & (u >= -tolerance) & (u <= columns - 1 + tolerance) & (v >= -tolerance) & (v <= rows - 1 + tolerance)
        coords = np.stack([s, np.clip(v, 0, rows - 1), np.clip(u, 0, columns - 1)])
        sampled = ndimage.map_coordinates(moving.voxels, coords, order=1, mode="nearest")
        out[k] = np.where(inside, sampled, np.nan)
    return out
