"""Volume -> DICOM: the synthetic CT series (CT Image Storage), built in memory.

Follows "DICOM rules for what mr2ct writes" (shared/design.md): same study,
patient and frame of reference as the MR; per-slice geometry copied from the
MR slice it came from; HU stored with slope 1 / intercept -1024; marked
DERIVED and synthetic; each slice names its MR source.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

import synthesis
from synthesis.model_file import LoadedModel
from synthesis.normalize import HU_MAX, HU_MIN
from synthesis.uids import derived_uid
from synthesis.volume import SourceSeries

MANUFACTURER = "mr2ct"
IMPLEMENTATION_VERSION = "MR2CT_" + synthesis.__version__.replace(".", "")
RESCALE_INTERCEPT = -1024
WINDOWS = (("BRAIN", 40.0, 80.0), ("BONE", 600.0, 2800.0))

PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "StudyDescription",
)
TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Patient and General Study modules copied from the source (type 2 present even when empty)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
        elif keyword in TYPE2_KEYWORDS:
            setattr(target, keyword, "")


def contributing_equipment(description: str) -> Sequence:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([_code("109102", "DCM", "Processing Equipment")])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = "mr2ct"
    item.SoftwareVersions = synthesis.__version__
    item.ContributionDescription = description[:1024]
    item.ContributionDateTime = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return Sequence([item])


def _ds_float(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


class SyntheticCTSeries:
    """The sCT series for one MR series; ``datasets`` holds one CT instance per MR slice."""

    def __init__(self, *, source: SourceSeries, hu: np.ndarray, model: LoadedModel, uid_root: str, device_label: str) -> None:
        if not isinstance(source, SourceSeries):
            raise TypeError(f"source must be a SourceSeries, got {type(source).__name__}")
        if not isinstance(hu, np.ndarray) or hu.shape != source.volume.voxels.shape:
            raise ValueError(f"hu must be an array of shape {source.volume.voxels.shape}, got {getattr(hu, 'shape', type(hu))}")
        if not uid_root.endswith("."):
            raise ValueError(f"uid_root must end with '.', got {uid_root!r}")
        self.source = source
        self.model = model
        first = source.headers[0]
        src_series = source.series_instance_uid
        self.series_instance_uid = derived_uid(uid_root, src_series, model.sha256, "ct-series")
        self.sop_instance_uids = [derived_uid(uid_root, src_series, model.sha256, "ct", i) for i in range(len(source.headers))]
        now = datetime.now(timezone.utc)
        date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        description = f"sCT (mr2ct {synthesis.__version__}, model {model.short_digest})"
        derivation = (
            f"Synthetic CT generated from MR series {src_series} by mr2ct {synthesis.__version__} "
            f"({model.card['architecture']} generator, model SHA-256 {model.sha256}) on {device_label}"
        )
        stored = np.clip(np.rint(hu), HU_MIN, HU_MAX) - RESCALE_INTERCEPT
        stored = stored.astype(np.uint16)
        source_series_number = int(first.get("SeriesNumber", 0) or 0)
        self.datasets: list[Dataset] = []
        for index, (mr, pixels) in enumerate(zip(source.headers, stored)):
            ds = Dataset()
            sop_uid = self.sop_instance_uids[index]
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION
            ds.file_meta = meta
            copy_patient_and_study(first, ds)
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
            ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
            ds.Modality = "CT"
            ds.SeriesInstanceUID = self.series_instance_uid
            ds.SeriesNumber = source_series_number + 1000
            ds.SeriesDescription = description
            ds.SeriesDate, ds.SeriesTime = date, time
            ds.PatientPosition = mr.get("PatientPosition", "") or "HFS"
            if "BodyPartExamined" in mr:
                ds.BodyPartExamined = mr.BodyPartExamined
            ds.FrameOfReferenceUID = source.volume.frame_of_reference_uid
            ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
            ds.Manufacturer = MANUFACTURER
            ds.ManufacturerModelName = "mr2ct"
            ds.SoftwareVersions = synthesis.__version__
            ds.InstanceNumber = index + 1
            ds.ContentDate, ds.ContentTime = date, time
            ds.AcquisitionNumber = ""
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.DerivationDescription = derivation[:1024]
            ref = Dataset()
            ref.ReferencedSOPClassUID = mr.SOPClassUID
            ref.ReferencedSOPInstanceUID = mr.SOPInstanceUID
            frame = source.frames[index] if source.frames else None
            if frame is not None:
                ref.ReferencedFrameNumber = frame
            ref.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM", "Source image for image processing operation")])
            ds.SourceImageSequence = Sequence([ref])
            ds.BurnedInAnnotation = "NO"
            ds.SyntheticData = "YES"
            ds.ContributingEquipmentSequence = contributing_equipment(derivation)
            ds.ImagePositionPatient = [_ds_float(v) for v in source.volume.positions[index]]
            ds.ImageOrientationPatient = [_ds_float(v) for v in source.volume.orientation]
            ds.PixelSpacing = [_ds_float(v) for v in source.volume.pixel_spacing]
            thickness = source.slice_thickness[index] if source.slice_thickness else str(mr.get("SliceThickness", "") or "")
            ds.SliceThickness = thickness or _ds_float(abs(source.volume.slice_spacing))
            if "SliceLocation" in mr and (not source.frames or source.frames[index] is None):
                ds.SliceLocation = mr.SliceLocation
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = pixels.shape
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
            ds.KVP = ""
            ds.WindowCenter = [w[1] for w in WINDOWS]
            ds.WindowWidth = [w[2] for w in WINDOWS]
            ds.WindowCenterWidthExplanation = [w[0] for w in WINDOWS]
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            self.datasets.append(ds)
