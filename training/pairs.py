"""Paired MR and CT series from a folder of DICOM files: what `mr2ct evaluate --pairs` scores a
model on, so that a hospital can measure a model on its own patients (e.g. radiotherapy patients
whose MR is registered to their planning CT) and not only on phantoms.

An MR series and a CT series pair when they share a Frame of Reference (and a patient): their
voxels are then matched in patient space, the CT resampled onto the MR's voxels. Nothing here
prints or returns a patient identifier; series are named by their UIDs and descriptions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from synthesis.errors import SeriesNotUsable
from synthesis.volume import SourceSeries, assemble, resample

BODY_THRESHOLD_HU = -500.0


@dataclass(frozen=True)
class SeriesFiles:
    series_uid: str
    modality: str
    description: str
    frame_of_reference_uid: str
    patient_key: str  # PatientID, only to refuse pairs across patients; never shown
    files: tuple[Path, ...]

    def label(self) -> str:
        return f"{self.modality} series {self.series_uid}" + (f" ({self.description})" if self.description else "")


@dataclass(frozen=True)
class PairFiles:
    mr: SeriesFiles
    ct: SeriesFiles


@dataclass(frozen=True)
class Found:
    pairs: list[PairFiles]
    skipped: list[str]  # one reason per series (or file count) left out
    files: int  # DICOM files read


@dataclass(frozen=True)
class Pair:
    mr: SourceSeries
    ct_hu: np.ndarray  # the CT on the MR's voxels (slices, rows, columns); NaN where the CT does not reach
    body: np.ndarray  # inside the body (from the CT, holes filled) and inside the CT's extent


def find_pairs(folder: Path) -> Found:
    """Every MR series in ``folder`` (searched recursively) with a CT series of the same patient in
    its Frame of Reference. Where one frame of reference holds several CT series, the one with the
    most instances is taken (and the others named in ``skipped``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    not_dicom = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            not_dicom += 1
            continue
        if "SeriesInstanceUID" in ds:
            by_series[str(ds.SeriesInstanceUID)].append((path, ds))
        else:
            not_dicom += 1
    skipped = [f"{not_dicom} file(s) that are not DICOM images"] if not_dicom else []
    series = []
    for uid, members in by_series.items():
        first = members[0][1]
        series.append(SeriesFiles(
            series_uid=uid, modality=str(first.get("Modality", "")), description=str(first.get("SeriesDescription", "") or ""),
            frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""), patient_key=str(first.get("PatientID", "") or ""),
            files=tuple(path for path, _ in members),
        ))
    by_frame: dict[tuple[str, str], dict[str, list[SeriesFiles]]] = defaultdict(lambda: defaultdict(list))
    for s in series:
        if s.modality not in ("MR", "CT"):
            skipped.append(f"{s.label()}: neither MR nor CT")
        elif not s.frame_of_reference_uid:
            skipped.append(f"{s.label()}: no FrameOfReferenceUID, so no CT can be matched to it in space")
        else:
            by_frame[(s.frame_of_reference_uid, s.patient_key)][s.modality].append(s)
    pairs = []
    for (frame, _), found in by_frame.items():
        cts = sorted(found["CT"], key=lambda s: (-len(s.files), s.series_uid))
        if not found["MR"]:
            skipped.extend(f"{ct.label()}: no MR series in its frame of reference {frame}" for ct in cts)
            continue
        if not cts:
            skipped.extend(f"{mr.label()}: no CT series of the same patient in its frame of reference {frame}" for mr in found["MR"])
            continue
        skipped.extend(f"{ct.label()}: another CT series in frame of reference {frame} has more instances" for ct in cts[1:])
        pairs.extend(PairFiles(mr, cts[0]) for mr in found["MR"])
    pairs.sort(key=lambda p: (p.mr.series_uid, p.ct.series_uid))
    return Found(pairs, skipped, sum(len(s.files) for s in series))


def _series(files: SeriesFiles) -> SourceSeries:
    return assemble([pydicom.dcmread(path) for path in files.files])


def body_mask(ct_hu: np.ndarray) -> np.ndarray:
    """The body on a CT: the largest connected region above -500 HU (the couch and other objects
    apart), each slice's holes filled (sinuses and airways belong to the body)."""
    from scipy import ndimage

    above = np.nan_to_num(ct_hu, nan=-1024.0) > BODY_THRESHOLD_HU
    regions, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = ndimage.sum_labels(above, regions, index=np.arange(1, count + 1))
    body = regions == 1 + int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(plane) for plane in body])


def load(pair: PairFiles) -> Pair:
    """Read both series and bring the CT onto the MR's voxels (raises SeriesNotUsable with the reason)."""
    mr = _series(pair.mr)
    ct = _series(pair.ct)
    ct_hu = resample(ct.volume, mr.volume)
    body = body_mask(ct_hu) & ~np.isnan(ct_hu)
    if not body.any():
        raise SeriesNotUsable(f"the CT series {pair.ct.series_uid} does not reach the body on any voxel of the MR")
    return Pair(mr, ct_hu, body)
