"""Volume -> DICOM: the synthetic CT series (CT Image Storage), built in memory.

Follows "DICOM rules for what mr2ct writes" (shared/design.md): same study,
patient and frame of reference as the MR; per-slice geometry copied from the
MR slice it came from; HU stored with slope 1 / intercept -1024; marked
DERIVED and synthetic; each slice names its MR source.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from functools import cached_property

import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import is_valid_ds

import synthesis
from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from synthesis.contrast import UNKNOWN, parts_named, series_body_part
from synthesis.model_file import LoadedModel
from synthesis.normalize import HU_MAX, HU_MIN
from synthesis.uids import derived_uid
from synthesis.volume import (Reslice, SourceSeries, Volume, is_transverse, reoriented, resample, scanner_transverse,
                              slices_closest_to_axial, transverse_grid)

MANUFACTURER = "mr2ct"
# In the derived series' UIDs: which rule named their instances (since 2026-12-05, each sCT slice
# after its MR slice). A series made again under another rule is a new series, not the old one
# with a second set of instances.
UID_SCHEME = "slice-uids-from-source"
RESCALE_INTERCEPT = -1024
WINDOWS = (("BRAIN", 40.0, 80.0), ("BONE", 600.0, 2800.0))
# BodyPartExamined's parts of a head and neck, and the defined term (PS3.16 Annex L, CID 4031) for
# a series whose slices name several of them: HEADNECK where any says NECK (or HEADNECK), else HEAD
HEAD_AND_NECK_PARTS, NECK_PARTS = frozenset({"HEAD", "BRAIN", "NECK", "HEADNECK"}), frozenset({"NECK", "HEADNECK"})

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
    """Patient and General Study modules copied from the source (type 2 present even when empty),
    each element as read, not its value parsed again: a value that breaks its VR's rules (a decimal
    comma in a weight, "70,5", which pydicom reads as the text it is but refuses to assign; a birth
    date 1970-02-03) is carried as the MR has it. Until 2026-12-07 such a weight failed the job,
    after its inference. Copies: the MR's header stays its own."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in TYPE2_KEYWORDS:
            setattr(target, keyword, "")


def mr_timezone(mr: Dataset) -> timezone | None:
    """The zone the MR's dates and times are in when it says so (TimezoneOffsetFromUTC, +/-HHMM)."""
    match = re.fullmatch(r"([+-])(\d\d)([0-5]\d)", str(mr.get("TimezoneOffsetFromUTC", "") or "").strip())
    if match is None or int(match[2]) > 14:
        return None
    sign = 1 if match[1] == "+" else -1
    return timezone(sign * timedelta(hours=int(match[2]), minutes=int(match[3])))


def local_now(mr: Dataset) -> datetime:
    """Now, as the MR's dates and times are read: in its zone when it names one, else this host's.
    DICOM dates and times without an offset are local time, and a viewer shows the sCT's beside
    the MR's (until 2026-12-05 they were UTC, hours off wherever the hospital is not)."""
    zone = mr_timezone(mr)
    return datetime.now(zone) if zone is not None else datetime.now().astimezone()


def copy_timezone(mr: Dataset, target: Dataset) -> None:
    """The MR's TimezoneOffsetFromUTC, when it names one: the study dates copied from it are in
    that zone, and mr2ct's own were written in it (local_now)."""
    if mr_timezone(mr) is not None:
        target.TimezoneOffsetFromUTC = str(mr.TimezoneOffsetFromUTC).strip()


def date_time(moment: datetime) -> str:
    """A DT value with its offset from UTC, so that it is read the same anywhere; none where the
    offset is zero (UTC, or a zone such as London's in winter): dcmtk 3.6.7's check of DT (Debian's,
    and the DICOM reader of many viewers) takes an offset whose hours are 00 for an invalid value,
    and its SR reader then refused the whole report (``dsr2xml``: "Invalid Value"). Without one, the
    value is in the zone of the object's TimezoneOffsetFromUTC (copied from the MR when it names
    one), else in the local time its dates and times are all written in: the same moment."""
    value = moment.strftime("%Y%m%d%H%M%S%z")
    return value[:-5] if value[-5:] in ("+0000", "-0000") else value


def contributing_equipment(description: str, when: str | None = None) -> Sequence:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([_code("109102", "DCM", "Processing Equipment")])
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = "mr2ct"
    item.SoftwareVersions = synthesis.__version__
    item.ContributionDescription = description[:1024]
    item.ContributionDateTime = when or date_time(datetime.now().astimezone())
    return Sequence([item])


def _ds_float(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


class SyntheticCTSeries:
    """The sCT series for one MR series; ``datasets`` holds one CT instance per MR slice, or per
    transverse slice with ``ct_plane = axial``."""

    def __init__(self, *, source: SourceSeries, hu: np.ndarray, model: LoadedModel, uid_root: str, device_label: str,
                 reslice: Reslice | None = None, ct_plane: str = "acquired") -> None:
        """``reslice``: how the generator saw the volume as axial slices
        (``synthesis.volume.axial_reslice``); None when it saw the acquired slices.
        ``ct_plane``: ``acquired`` writes one CT slice per MR slice, overlaying it; ``axial`` writes
        transverse slices, as planning systems take a CT: the axial slices the generator saw (a
        3D sagittal or coronal MR; an exchange of axes, no interpolation), resampled (trilinear)
        onto exact transverse slices when they are tilted (an oblique acquisition), and a series
        seen in its acquired slices that are not transverse but closest to it (a tilted axial one)
        resampled so too; a 2D sagittal or coronal series (thick slices, never resliced) stays as
        acquired. Axial slices each derive from every MR slice and have UIDs of their own."""
        if not isinstance(source, SourceSeries):
            raise TypeError(f"source must be a SourceSeries, got {type(source).__name__}")
        if not isinstance(hu, np.ndarray) or hu.shape != source.volume.voxels.shape:
            raise ValueError(f"hu must be an array of shape {source.volume.voxels.shape}, got {getattr(hu, 'shape', type(hu))}")
        if not uid_root.endswith("."):
            raise ValueError(f"uid_root must end with '.', got {uid_root!r}")
        if ct_plane not in ("acquired", "axial"):
            raise ValueError(f"ct_plane must be acquired or axial, got {ct_plane!r}")
        self.source = source
        self.model = model
        # The geometry the CT slices are written in: transverse slices, or (None) the MR's.
        transverse, written = (None, "") if ct_plane == "acquired" else _transverse(source, hu, reslice)
        self.per_mr_slice = transverse is None
        self.geometry: Volume = source.volume if transverse is None else transverse
        self.plane = (f"axial slices resliced from the {reslice.acquired} acquisition" if reslice else "the acquired slices") + written
        src_series = source.series_instance_uid
        key = model.output_key + ("+axial" if reslice else "") + ("+axial-ct" if written else "")  # other pixels, other UIDs
        self.series_instance_uid = derived_uid(uid_root, src_series, key, "ct-series", UID_SCHEME)
        if self.per_mr_slice:
            # Each slice's UID follows the MR slice (instance, frame) it was made from, not its place in
            # the series: a late MR slice adds a UID instead of moving every later UID to another
            # position (until 2026-12-05 the n-th UID named whatever slice was n-th).
            frames = source.frames or [None] * len(source.headers)
            self.sop_instance_uids = [derived_uid(uid_root, src_series, key, "ct", str(mr.SOPInstanceUID), frame)
                                      for mr, frame in zip(source.headers, frames)]
        else:  # each axial slice by where it lies along its normal: a late MR slice widens the slices resliced from
            # a 3D series and moves none (a tilted series' box, and so its resampled slices, may move)
            normal = self.geometry.normal
            self.sop_instance_uids = [derived_uid(uid_root, src_series, key, "ct", f"{float(p @ normal):.2f}")
                                      for p in self.geometry.positions]
        now = local_now(source.headers[0])
        description = f"sCT (mr2ct {synthesis.__version__}, model {model.short_digest})"
        derivation = (
            f"Synthetic CT generated from MR series {src_series} by mr2ct {synthesis.__version__} "
            f"({model.card['architecture']} generator, model SHA-256 {model.sha256}"
            + (f", test-time augmentation {model.test_time_augmentation}" if model.test_time_augmentation != "none" else "")
            + (f", {self.plane}" if reslice or written else "") + f") on {device_label}"
        )
        stored = np.clip(np.rint(hu if self.per_mr_slice else self.geometry.voxels), HU_MIN, HU_MAX) - RESCALE_INTERCEPT
        self._stored = stored.astype(np.uint16)
        self._created = now  # one moment for every date and time of the series
        self._description, self._derivation = description, derivation
        self._constant_encoded: list[tuple[int, bytes]] | None = None

    def __len__(self) -> int:
        return len(self.sop_instance_uids)

    def _constant(self) -> Dataset:
        """Every element that is the same in all instances of the series (no file meta)."""
        source, first = self.source, self.source.headers[0]
        date, time = self._created.strftime("%Y%m%d"), self._created.strftime("%H%M%S")
        ds = Dataset()
        copy_patient_and_study(first, ds)
        ds.SOPClassUID = CTImageStorage
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        copy_timezone(first, ds)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 1000
        ds.SeriesDescription = self._description
        ds.SeriesDate, ds.SeriesTime = date, time
        # the MR's, or empty (unknown, as type 2 allows): a planning system reads it, so it is never guessed
        ds.PatientPosition = first.get("PatientPosition", "") or ""
        body_part = self._body_part
        if body_part:
            ds.BodyPartExamined = body_part
        if "Laterality" in first:  # the same anatomy as the MR's
            ds.Laterality = first.Laterality
        elif not body_part:  # the MR does not say what it shows: laterality unknown (type 2C)
            ds.Laterality = ""
        ds.FrameOfReferenceUID = source.volume.frame_of_reference_uid
        ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "mr2ct"
        ds.SoftwareVersions = synthesis.__version__
        ds.ContentDate, ds.ContentTime = date, time
        ds.AcquisitionNumber = ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.DerivationDescription = self._derivation[:1024]
        ds.BurnedInAnnotation = "NO"
        ds.SyntheticData = "YES"
        ds.ContributingEquipmentSequence = contributing_equipment(self._derivation, date_time(self._created))
        if not self.per_mr_slice:  # every axial slice is made from a line of each MR slice: all are its sources
            ds.SourceImageSequence = Sequence(_source_references(source))
        ds.ImageOrientationPatient = [_ds_float(v) for v in self.geometry.orientation]
        ds.PixelSpacing = [_ds_float(v) for v in self.geometry.pixel_spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = self._stored.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
        ds.KVP = ""
        ds.WindowCenter = [w[1] for w in WINDOWS]
        ds.WindowWidth = [w[2] for w in WINDOWS]
        ds.WindowCenterWidthExplanation = [w[0] for w in WINDOWS]
        return ds

    @cached_property
    def _body_part(self) -> str:
        """BodyPartExamined (a series-level attribute) for what every MR slice names: that part
        where they name one, HEADNECK where they name a head (or brain) and a neck, HEAD for a head
        and a brain, '' (not said) where no one term covers the parts (the SR names them all)."""
        parts = set(parts_named(series_body_part(self.source.headers))) - {UNKNOWN}
        if len(parts) <= 1:
            return parts.pop() if parts else ""
        if parts <= HEAD_AND_NECK_PARTS:
            return "HEADNECK" if parts & NECK_PARTS else "HEAD"
        return ""

    def _varying(self, index: int) -> Dataset:
        """The elements that differ from slice to slice: identity, source reference, position, pixels."""
        source = self.source
        ds = Dataset()
        ds.SOPInstanceUID = self.sop_instance_uids[index]
        ds.InstanceNumber = index + 1
        position = self.geometry.positions[index]
        ds.ImagePositionPatient = [_ds_float(v) for v in position]
        if not self.per_mr_slice:
            ds.SliceThickness = _ds_float(abs(self.geometry.slice_spacing))
            ds.SliceLocation = _ds_float(float(position @ self.geometry.normal))
        else:
            mr = source.headers[index]
            frame = source.frames[index] if source.frames else None
            ds.SourceImageSequence = Sequence(_source_references(source, index))
            thickness = source.slice_thickness[index] if source.slice_thickness else str(mr.get("SliceThickness", "") or "")
            # copied only when it is a DS number: one written "4,25" failed the job; the spacing stands in
            ds.SliceThickness = thickness if thickness.strip() and is_valid_ds(thickness) else _ds_float(abs(source.volume.slice_spacing))
            if "SliceLocation" in mr and frame is None:
                ds.SliceLocation = mr.SliceLocation
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(self._stored[index]).tobytes())  # PixelData: 16-bit, so OW
        return ds

    def _file_meta(self, index: int) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = self.sop_instance_uids[index]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        return meta

    def dataset(self, index: int) -> Dataset:
        """The CT instance for MR slice ``index`` as a pydicom data set (a new object on every call)."""
        ds = self._constant()
        ds.update(self._varying(index))
        ds.file_meta = self._file_meta(index)
        return ds

    @cached_property
    def datasets(self) -> list[Dataset]:
        """One CT instance per MR slice, as pydicom data sets (built on first use)."""
        return [self.dataset(i) for i in range(len(self))]

    def evidence(self) -> list[Dataset]:
        """The four identifying attributes of every CT instance: what an SR needs to reference them."""
        out = []
        for sop_uid in self.sop_instance_uids:
            ds = Dataset()
            ds.StudyInstanceUID = self.source.headers[0].StudyInstanceUID
            ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = self.series_instance_uid, CTImageStorage, sop_uid
            out.append(ds)
        return out

    def encoded(self, index: int) -> bytes:
        """The CT instance for slice ``index`` in DICOM file format (Part 10, explicit VR little endian),
        byte for byte what pydicom writes for :meth:`dataset` (tested), without building the whole
        data set again: the elements shared by the series are encoded once and merged, in tag
        order, with the few encoded per slice."""
        if self._constant_encoded is None:
            self._constant_encoded = _encode_elements(self._constant(), None)
        charset = self.source.headers[0].get("SpecificCharacterSet")
        varying = _encode_elements(self._varying(index), charset)
        merged = b"".join(chunk for _, chunk in sorted(self._constant_encoded + varying, key=lambda pair: pair[0]))
        head = DicomBytesIO()
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, self._file_meta(index), enforce_standard=True)
        return head.getvalue() + merged


OUTSIDE_THE_MR_HU = -1000.0  # a transverse slice's pixels the tilted MR does not reach: air


def _transverse(source: SourceSeries, hu: np.ndarray, reslice: Reslice | None) -> tuple[Volume | None, str]:
    """The sCT as transverse slices, and how they were made (for the plane text); (None, "") when
    it stays in the MR's slices (transverse already, or 2D slices that are not closest to axial).
    The slices it makes are oriented as a CT scanner writes them for the MR's Patient Position
    (``scanner_transverse``: rows to the patient's right and columns anterior for a head-first
    prone patient, say), by an exchange of axes and flips; before 2026-12-07 always as for a
    head-first supine one."""
    if reslice is not None:
        view = reslice.volume(source.volume, hu)  # the axial slices the generator saw
    elif len(source.volume.positions) > 1 and slices_closest_to_axial(source.volume.orientation):  # one slice: no volume to resample
        view = replace(source.volume, voxels=hu)
    else:
        return None, ""
    oriented = scanner_transverse(source.headers[0].get("PatientPosition"))
    if is_transverse(view.orientation):
        return (reoriented(view, oriented), ", written as axial slices") if reslice is not None else (None, "")
    grid = transverse_grid(view)
    voxels = resample(view, grid)
    voxels[np.isnan(voxels)] = OUTSIDE_THE_MR_HU
    return reoriented(replace(grid, voxels=voxels), oriented), ", resampled (trilinear) onto transverse slices"


def _source_references(source: SourceSeries, index: int | None = None) -> list[Dataset]:
    """Source Image Sequence items: of MR slice ``index``, or of every MR slice (an instance once,
    with the frames of a multi-frame one)."""
    frames = source.frames or [None] * len(source.headers)
    chosen = range(len(source.headers)) if index is None else [index]
    by_instance: dict[str, tuple[Dataset, list[int]]] = {}
    for i in chosen:
        mr, frame = source.headers[i], frames[i]
        _, numbers = by_instance.setdefault(str(mr.SOPInstanceUID), (mr, []))
        if frame is not None:
            numbers.append(frame)
    items = []
    for mr, numbers in by_instance.values():
        ref = Dataset()
        ref.ReferencedSOPClassUID = mr.SOPClassUID
        ref.ReferencedSOPInstanceUID = mr.SOPInstanceUID
        if numbers:
            ref.ReferencedFrameNumber = sorted(numbers) if len(numbers) > 1 else numbers[0]
        ref.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM", "Source image for image processing operation")])
        items.append(ref)
    return items


def _encode_elements(ds: Dataset, charset: str | list[str] | None) -> list[tuple[int, bytes]]:
    """Each top-level element of ``ds`` encoded on its own (explicit VR little endian), with its tag."""
    encoding = ds.get("SpecificCharacterSet", charset) or default_encoding
    out = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_data_element(fp, elem, encoding)
        out.append((int(elem.tag), fp.getvalue()))
    return out
