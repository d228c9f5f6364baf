"""Phantom heads written as DICOM series (what a scanner would send). The demo and tests use these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from synthesis.contrast import EXAMPLE_TIMINGS
from training import phantoms

UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class PhantomSeries:
    folder: Path
    files: list[Path]
    labels: np.ndarray  # (slices, rows, columns) tissue labels, as written
    ct_hu: np.ndarray  # ground-truth CT of the same anatomy, HU
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str


def write_mr_series(
    folder: Path,
    *,
    seed: int = 1,
    slices: int = 32,
    size: int = 256,
    pixel_spacing: float = 1.0,
    slice_spacing: float = 4.0,
    patient_name: str = "PHANTOM^HEAD",
    patient_id: str | None = None,
    shuffle_instance_numbers: bool = False,
    orientation: str = "axial",
    columns: int | None = None,
    series_description: str | None = None,
    modality: str = "MR",
    study_uid: str | None = None,
    uid_key: str = "",
    mr_timing: tuple[str, str, str, str | None] = EXAMPLE_TIMINGS["T1"],
    contrast_agent: str | None = None,
    fat_suppressed: bool = False,
) -> PhantomSeries:
    """Render one phantom head as a T1 MR (or, with ``modality="CT"``, a CT in HU) series of
    single-frame instances in ``folder``. Its UIDs follow from its parameters (the same call, the
    same UIDs), and ``uid_key``: another key, other UIDs for the same anatomy. ``mr_timing``: the
    (ScanningSequence, RepetitionTime, EchoTime, InversionTime or None) its header says, which is
    what tells the node its contrast (synthesis.contrast); the pixels stay T1-weighted whatever it says.
    ``contrast_agent``: an agent's name its Contrast/Bolus module says was given intravenously (the
    header of a post-contrast series, synthesis.contrast.contrast_agent; the pixels stay unenhanced).
    ``fat_suppressed``: ScanOptions says FS (fat saturation; the pixels keep their fat bright)."""
    if modality not in ("MR", "CT"):
        raise ValueError(f"modality must be MR or CT, got {modality!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = columns or size
    grid = phantoms.oriented_grid(orientation, slices, size, columns, pixel_spacing, slice_spacing)
    labels = phantoms.head_labels(seed, grid)
    mr = phantoms.mr_to_stored(phantoms.render_mr(labels, grid, seed))
    ct = phantoms.render_ct(labels, grid, seed)
    ct_stored = np.clip(np.rint(ct) + 1024, 0, 4095).astype(np.uint16)
    key = f"mr2ct-phantom-{seed}-{slices}-{size}-{columns}-{pixel_spacing}-{slice_spacing}-{orientation}-{series_description}{uid_key}"
    study_uid = study_uid or generate_uid(UID_PREFIX, [key, "study"])
    series_uid = generate_uid(UID_PREFIX, [key, modality, "series"])
    for_uid = generate_uid(UID_PREFIX, [key, "for"])
    patient_id = patient_id or f"PH{seed:06d}"
    now = datetime(2026, 1, 1, 9, 0, 0)
    order = np.random.default_rng(seed).permutation(slices) if shuffle_instance_numbers else np.arange(slices)
    files = []
    for i in range(slices):
        sop_uid = generate_uid(UID_PREFIX, [key, modality, "instance", str(i)])
        sop_class = MRImageStorage if modality == "MR" else CTImageStorage
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", f"ACC{seed:06d}"
        ds.StudyDescription = "Phantom head MR"
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 3 if modality == "MR" else 2
        default_description = f"T1 {orientation} (phantom)" if modality == "MR" else f"CT head {orientation} (phantom)"
        ds.SeriesDescription = series_description if series_description is not None else default_description
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer = "mr2ct phantom"
        ds.InstanceNumber = int(order[i]) + 1
        if modality == "MR":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = mr_timing[0], "SP", "2D"
            ds.ScanOptions = ["PFP", "FS"] if fat_suppressed else ""
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = mr_timing[1], mr_timing[2], "1"
            if mr_timing[3]:
                ds.InversionTime = mr_timing[3]
            ds.MagneticFieldStrength = "3"
            if contrast_agent:
                ds.ContrastBolusAgent, ds.ContrastBolusRoute = contrast_agent, "IV"
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.KVP, ds.AcquisitionNumber = "120", 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.SliceThickness = f"{slice_spacing:g}"
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.ImageOrientationPatient = [_ds(v) for v in grid.orientation]
        ds.ImagePositionPatient = [_ds(v) for v in grid.position(i)]
        ds.SliceLocation = _ds(grid.slice_offsets[i])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = size, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (mr[i] if modality == "MR" else ct_stored[i]).tobytes()
        path = folder / f"{modality}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return PhantomSeries(folder, files, labels, ct, study_uid, series_uid, for_uid, patient_name, patient_id)


@dataclass(frozen=True)
class Cohort:
    mr_only: list[PhantomSeries]
    ct_only: list[PhantomSeries]
    paired: list[tuple[PhantomSeries, PhantomSeries]]  # held out for evaluation: MR and CT of one anatomy


def write_cohort(folder: Path, *, mr_subjects: int, ct_subjects: int, paired_subjects: int, seed: int = 0,
                 slices: int = 24, size: int = 128, pixel_spacing: float = 2.0, slice_spacing: float = 6.0) -> Cohort:
    """A synthetic head cohort as DICOM studies: MR-only subjects, CT-only subjects (disjoint
    anatomies: unpaired pools) and paired held-out subjects (one study with an MR and a CT series)."""
    folder = Path(folder)
    common = dict(slices=slices, size=size, pixel_spacing=pixel_spacing, slice_spacing=slice_spacing)
    base = seed * 1_000_000 + 10_000
    mr_only = [write_mr_series(folder / f"mr-{i:03d}", seed=base + i, patient_id=f"PHMR{seed:03d}{i:04d}", **common) for i in range(mr_subjects)]
    ct_only = [
        write_mr_series(folder / f"ct-{i:03d}", seed=base + 5_000 + i, patient_id=f"PHCT{seed:03d}{i:04d}", modality="CT", **common)
        for i in range(ct_subjects)
    ]
    paired = []
    for i in range(paired_subjects):
        subject = base + 9_000 + i
        mr = write_mr_series(folder / f"pair-{i:03d}-mr", seed=subject, patient_id=f"PHPR{seed:03d}{i:04d}", **common)
        ct = write_mr_series(folder / f"pair-{i:03d}-ct", seed=subject, patient_id=f"PHPR{seed:03d}{i:04d}", modality="CT", study_uid=mr.study_uid, **common)
        paired.append((mr, ct))
    return Cohort(mr_only, ct_only, paired)
