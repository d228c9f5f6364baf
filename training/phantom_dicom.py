"""Phantom heads written as DICOM series (what a scanner would send). The demo and tests use these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

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
) -> PhantomSeries:
    """Render one phantom head as an axial T1 MR series of single-frame instances in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = columns or size
    grid = phantoms.oriented_grid(orientation, slices, size, columns, pixel_spacing, slice_spacing)
    labels = phantoms.head_labels(seed, grid)
    mr = phantoms.mr_to_stored(phantoms.render_mr(labels, grid, seed))
    ct = phantoms.render_ct(labels, grid, seed)
    key = f"mr2ct-phantom-{seed}-{slices}-{size}-{columns}-{pixel_spacing}-{slice_spacing}-{orientation}-{series_description}"
    study_uid = generate_uid(UID_PREFIX, [key, "study"])
    series_uid = generate_uid(UID_PREFIX, [key, "series"])
    for_uid = generate_uid(UID_PREFIX, [key, "for"])
    patient_id = patient_id or f"PH{seed:06d}"
    now = datetime(2026, 1, 1, 9, 0, 0)
    order = np.random.default_rng(seed).permutation(slices) if shuffle_instance_numbers else np.arange(slices)
    files = []
    for i in range(slices):
        sop_uid = generate_uid(UID_PREFIX, [key, "instance", str(i)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", f"ACC{seed:06d}"
        ds.StudyDescription = "Phantom head MR"
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, 3
        ds.SeriesDescription = series_description if series_description is not None else f"T1 {orientation} (phantom)"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.Manufacturer = "mr2ct phantom"
        ds.InstanceNumber = int(order[i]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "10", "1"
        ds.MagneticFieldStrength = "3"
        ds.SliceThickness = f"{slice_spacing:g}"
        ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
        ds.ImageOrientationPatient = [_ds(v) for v in grid.orientation]
        ds.ImagePositionPatient = [_ds(v) for v in grid.position(i)]
        ds.SliceLocation = _ds(grid.slice_offsets[i])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = size, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = mr[i].tobytes()
        path = folder / f"MR{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return PhantomSeries(folder, files, labels, ct, study_uid, series_uid, for_uid, patient_name, patient_id)
