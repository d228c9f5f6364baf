"""Paired MR and CT series from a folder of DICOM files: what `mr2ct evaluate --pairs` scores a
model on, so that a hospital can measure a model on its own patients (e.g. radiotherapy patients
whose MR is registered to their planning CT) and not only on phantoms.

An MR series and a CT series pair when they share a Frame of Reference (and a patient), or when a
Spatial Registration in the folder relates their frames (an MR registered to a planning CT): their
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
from synthesis.image_type import WHAT, component, component_kind, not_anatomy
from synthesis.volume import SourceSeries, assemble, resample

BODY_THRESHOLD_HU = -500.0
SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"


@dataclass(frozen=True)
class SeriesFiles:
    series_uid: str
    modality: str
    description: str
    frame_of_reference_uid: str
    patient_key: str  # PatientID, only to refuse pairs across patients and find them in a training cache; never shown
    files: tuple[Path, ...]
    patient_issuer: str = ""  # IssuerOfPatientID

    def label(self) -> str:
        return f"{self.modality} series {self.series_uid}" + (f" ({self.description})" if self.description else "")


@dataclass(frozen=True)
class PairFiles:
    mr: SeriesFiles
    ct: SeriesFiles
    mr_to_ct: tuple[tuple[float, ...], ...] | None = None  # 4x4: MR patient coordinates into the CT's (other frames)
    registration: str | None = None  # the spatial registration series that relates the two frames


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


def registrations(ds: pydicom.Dataset) -> dict[tuple[str, str], np.ndarray]:
    """The frame-to-frame transforms of a Spatial Registration instance (PS3.3 C.20.2): each item's
    matrix takes its frame's coordinates into the registered frame (the instance's own), so any two
    frames it names are related: ``{(from, to): 4x4}``. Raises ValueError naming what is wrong."""
    registered = str(ds.get("FrameOfReferenceUID", "") or "")
    if not registered:
        raise ValueError("it has no FrameOfReferenceUID")
    to_registered = {registered: np.eye(4)}
    for item in ds.get("RegistrationSequence", []):
        frame = str(item.get("FrameOfReferenceUID", "") or "")
        matrices = [m for r in item.get("MatrixRegistrationSequence", []) for m in r.get("MatrixSequence", [])]
        if not frame:
            raise ValueError("a registration item names images, not a frame of reference (not supported)")
        if len(matrices) != 1:
            raise ValueError(f"the item for frame {frame} has {len(matrices)} matrices (one is supported)")
        values = [float(v) for v in matrices[0].get("FrameOfReferenceTransformationMatrix", [])]
        if len(values) != 16:
            raise ValueError(f"the item for frame {frame} has no 4x4 FrameOfReferenceTransformationMatrix")
        matrix = np.array(values).reshape(4, 4)  # row-major
        if not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
            raise ValueError(f"the matrix for frame {frame} is not an invertible affine transform")
        to_registered[frame] = matrix
    return {(a, b): np.linalg.inv(mb) @ ma for a, ma in to_registered.items() for b, mb in to_registered.items() if a != b}


def find_pairs(folder: Path) -> Found:
    """Every MR series in ``folder`` (searched recursively, hidden files and folders left out)
    with a CT series of the same patient in its Frame of Reference, or in a frame a Spatial
    Registration (REG) in the folder relates to its own. A CT in the MR's own frame comes first;
    among several, the one with the most instances is taken (the others are named in ``skipped``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    not_dicom = 0
    # Hidden files (a pull's salt, a viewer's or the OS's bookkeeping) are not the patient's images.
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
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
    series, transforms = [], {}
    for uid, members in by_series.items():
        first = members[0][1]
        found = SeriesFiles(
            series_uid=uid, modality=str(first.get("Modality", "")), description=str(first.get("SeriesDescription", "") or ""),
            frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""), patient_key=str(first.get("PatientID", "") or ""),
            files=tuple(path for path, _ in members), patient_issuer=str(first.get("IssuerOfPatientID", "") or ""),
        )
        told = not_anatomy(first.get("ImageType"))
        told = (told[0], f"ImageType {told[1]}") if told else component_kind(component(first))
        if str(first.get("SyntheticData", "") or "").upper() == "YES":
            # An sCT (mr2ct's own, exported with the study) shares the MR's frame: never take it for the truth.
            skipped.append(f"{found.label()}: synthetic (Synthetic Data YES), not a ground truth")
        elif told is not None:
            # A scout (a CT's topogram: a projection, not HU), a Siemens mosaic (each image a volume's slices
            # tiled), phase images (angles): never a pair to score (synthesis.image_type).
            skipped.append(f"{found.label()}: {WHAT[told[0]]} ({told[1]}), not a volume to score")
        elif found.modality == "REG" or str(first.get("SOPClassUID", "")) == SPATIAL_REGISTRATION:
            for _, ds in members:
                try:
                    related = registrations(ds)
                except ValueError as exc:
                    skipped.append(f"spatial registration {ds.get('SOPInstanceUID', '?')} of {found.label()}: {exc}")
                    continue
                transforms.update({(found.patient_key, *frames): (matrix, uid) for frames, matrix in related.items()})
        else:
            series.append(found)
    by_patient: dict[str, dict[str, list[SeriesFiles]]] = defaultdict(lambda: defaultdict(list))
    for s in series:
        if s.modality not in ("MR", "CT"):
            skipped.append(f"{s.label()}: neither MR nor CT")
        elif not s.frame_of_reference_uid:
            skipped.append(f"{s.label()}: no FrameOfReferenceUID, so no CT can be matched to it in space")
        else:
            by_patient[s.patient_key][s.modality].append(s)
    pairs, used = [], set()
    for patient, found in by_patient.items():
        cts = sorted(found["CT"], key=lambda s: (-len(s.files), s.series_uid))
        for mr in found["MR"]:
            same = [ct for ct in cts if ct.frame_of_reference_uid == mr.frame_of_reference_uid]
            related = [ct for ct in cts if (patient, mr.frame_of_reference_uid, ct.frame_of_reference_uid) in transforms]
            if same:
                pairs.append(PairFiles(mr, same[0]))
                used.add(same[0].series_uid)
            elif related:
                matrix, registration = transforms[(patient, mr.frame_of_reference_uid, related[0].frame_of_reference_uid)]
                pairs.append(PairFiles(mr, related[0], tuple(tuple(float(v) for v in row) for row in matrix), registration))
                used.add(related[0].series_uid)
            else:
                skipped.append(f"{mr.label()}: no CT series of the same patient in its frame of reference "
                               f"{mr.frame_of_reference_uid} or registered to it")
        skipped.extend(f"{ct.label()}: not paired (no MR of the same patient in its frame, or another CT there has more instances)"
                       for ct in cts if ct.series_uid not in used)
    pairs.sort(key=lambda p: (p.mr.series_uid, p.ct.series_uid))
    return Found(pairs, skipped, sum(len(s.files) for s in series))


def leave_out_trained(found: Found, cache_dir: Path) -> Found:
    """``found`` without the pairs whose patient is in a dataset cache of `mr2ct pull` (either
    split: the train split taught the model, the validation split may have chosen it), matched by
    the cache's own salted patient key. A model scored on patients it was trained on flatters itself."""
    from training.pacs_pull import DatasetCache, patient_key

    cache = DatasetCache.existing(cache_dir)
    splits = cache.patients()  # removed series' patients too: a model trained before the removal may have learnt from them
    kept, skipped = [], list(found.skipped)
    for pair in found.pairs:
        split = splits.get(patient_key(pair.mr.patient_key, pair.mr.patient_issuer, cache.salt))
        if split is None:
            kept.append(pair)
        else:
            skipped.append(f"{pair.mr.label()} with {pair.ct.label()}: the patient is in the {split} split of the "
                           f"training cache {cache_dir}, so the model may have learnt from them")
    return Found(kept, skipped, found.files)


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
    ct_hu = resample(ct.volume, mr.volume, None if pair.mr_to_ct is None else np.array(pair.mr_to_ct))
    body = body_mask(ct_hu) & ~np.isnan(ct_hu)
    if not body.any():
        raise SeriesNotUsable(f"the CT series {pair.ct.series_uid} does not reach the body on any voxel of the MR")
    return Pair(mr, ct_hu, body)
