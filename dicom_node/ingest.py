"""What happens to a received instance: validate, spool durably, record. No networking here."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import Instance, Job, Series, utcnow
from dicom_node.spool import Spool, require_uid
from synthesis.errors import InvalidInstance, SeriesNotUsable
from synthesis.volume import frame_geometry

log = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = {
    MRImageStorage: "MR Image Storage",
    EnhancedMRImageStorage: "Enhanced MR Image Storage",
    LegacyConvertedEnhancedMRImageStorage: "Legacy Converted Enhanced MR Image Storage",
}


class DatasetMismatch(InvalidInstance):
    """The data set does not match its SOP class (DICOM status 0xA900)."""


@dataclass(frozen=True)
class ReceivedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str = ""
    orientation: str = ""
    patient_id: str = ""


def orientation_label(iop: list[float] | tuple[float, ...]) -> str:
    """axial / sagittal / coronal when the slice normal is within 10 degrees of an axis, else oblique."""
    normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:6], dtype=float))
    length = float(np.linalg.norm(normal))
    if length == 0:
        return "oblique"
    normal = np.abs(normal / length)
    axis = int(np.argmax(normal))
    if normal[axis] < np.cos(np.deg2rad(10.0)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass(frozen=True)
class SelectionRules:
    """Which complete series are synthesized; the first rule that fails is the recorded reason."""

    modalities: tuple[str, ...] = ("MR",)
    description_include: str | None = None
    description_exclude: str | None = None
    min_slices: int = 1
    orientations: tuple[str, ...] = ("axial", "sagittal", "coronal", "oblique")

    def reason_to_skip(self, series: Series) -> str | None:
        if series.modality not in self.modalities:
            return f"modality {series.modality!r} is not one of {list(self.modalities)}"
        description = series.series_description or ""
        if self.description_include and not re.search(self.description_include, description, re.IGNORECASE):
            return f"series description {description!r} does not match {self.description_include!r}"
        if self.description_exclude and re.search(self.description_exclude, description, re.IGNORECASE):
            return f"series description {description!r} matches the exclusion {self.description_exclude!r}"
        if series.instance_count < self.min_slices:
            return f"{series.instance_count} instances, fewer than the {self.min_slices} required"
        if series.orientation and series.orientation not in self.orientations:
            return f"orientation {series.orientation} is not one of {list(self.orientations)}"
        return None


MAX_SEQUENCE_DEPTH = 16


def check_nesting(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> None:
    """Refuse sequences nested deeper than any real MR needs (a cheap denial-of-service guard)."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for element in current:
            if element.VR == "SQ":
                if depth + 1 > limit:
                    raise DatasetMismatch(f"sequences nested deeper than {limit} levels")
                stack.extend((item, depth + 1) for item in element.value)


def validate(
    ds: Dataset, affected_sop_class: str, affected_sop_instance: str, forward_only: frozenset[str] = frozenset()
) -> ReceivedInstance:
    """Check what must hold before an instance is accepted; raise ``InvalidInstance`` saying why not.

    ``forward_only``: other SOP classes accepted only to be routed to Orthanc (never synthesized);
    they need well-formed UIDs, not MR geometry.
    """
    sop_class = require_uid(affected_sop_class, "Affected SOP Class UID")
    sop_uid = require_uid(affected_sop_instance, "Affected SOP Instance UID")
    if sop_class not in SUPPORTED_SOP_CLASSES and sop_class not in forward_only:
        raise DatasetMismatch(f"SOP class {sop_class} is not accepted by this node")
    if ds.get("SOPClassUID") != sop_class:
        raise DatasetMismatch(f"SOPClassUID in the data set ({ds.get('SOPClassUID')!r}) differs from the request ({sop_class})")
    if ds.get("SOPInstanceUID") != sop_uid:
        raise DatasetMismatch("SOPInstanceUID in the data set differs from the C-STORE request")
    study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        check_nesting(ds)
        return ReceivedInstance(sop_class, sop_uid, study_uid, series_uid, str(ds.get("Modality", "") or ""),
                                str(ds.get("SeriesDescription", "") or "")[:64], "", str(ds.get("PatientID", "") or "")[:64])
    if "PixelData" not in ds:
        raise DatasetMismatch("the instance has no Pixel Data")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise DatasetMismatch(f"{keyword} is missing; the node needs it to build a volume")
    try:
        geometry = frame_geometry(ds)
    except SeriesNotUsable as exc:
        raise DatasetMismatch(f"geometry missing or unusable: {exc}") from None
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    if not (0 < rows <= 8192 and 0 < cols <= 8192) or bits not in (8, 16, 32):
        raise DatasetMismatch(f"implausible image size {rows}x{cols} with {bits} bits allocated")
    pixel_element = ds.get_item(0x7FE00010)
    declared = getattr(pixel_element, "length", None)
    value = getattr(pixel_element, "value", None)
    if declared is not None and declared != 0xFFFFFFFF and value is not None and len(value) != declared:
        raise DatasetMismatch(f"Pixel Data declares {declared} bytes but the data set holds {len(value)}")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = rows * cols * frames * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise DatasetMismatch(f"Pixel Data holds {actual} bytes, {rows}x{cols}x{frames} at {bits} bits needs {expected}")
    check_nesting(ds)  # after the Pixel Data checks, which need the raw (unconverted) element
    modality = str(ds.get("Modality", "") or "")
    orientation = orientation_label(geometry[0].orientation)
    description = str(ds.get("SeriesDescription", "") or "")[:64]
    patient_id = str(ds.get("PatientID", "") or "")[:64]
    return ReceivedInstance(sop_class, sop_uid, study_uid, series_uid, modality, description, orientation, patient_id)


class Ingest:
    """Spools and records instances; shared by all SCP association threads."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session]) -> None:
        self.spool = spool
        self.sessions = sessions

    def store(self, info: ReceivedInstance, data: bytes, transfer_syntax: str, calling_ae: str, association_id: int | None) -> Path:
        path = self.spool.write(info.study_uid, info.series_uid, info.sop_instance_uid, data)
        self.record(info, path, len(data), transfer_syntax, calling_ae, association_id)
        return path

    def record(self, info: ReceivedInstance, path: Path, size: int, transfer_syntax: str, calling_ae: str, association_id: int | None) -> None:
        """Record a spooled instance (new or re-sent) and wake its series up."""
        now = utcnow()
        with self.sessions.begin() as session:
            series = session.get(Series, info.series_uid, with_for_update=True)
            if series is None:
                series = Series(
                    series_instance_uid=info.series_uid, study_instance_uid=info.study_uid, modality=info.modality,
                    calling_ae=calling_ae, instance_count=0, first_received_at=now, last_received_at=now, state="receiving",
                    series_description=info.series_description, orientation=info.orientation, patient_id=info.patient_id,
                )
                session.add(series)
                session.flush()
            existing = session.get(Instance, info.sop_instance_uid)
            if existing is None:
                session.add(
                    Instance(
                        sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                        series_instance_uid=info.series_uid, transfer_syntax_uid=transfer_syntax, path=str(path),
                        size_bytes=size, association_id=association_id, received_at=now, forward_next_at=now,
                    )
                )
                series.instance_count += 1
            else:  # a re-send: the spool file was replaced atomically; the count stays
                existing.received_at, existing.size_bytes, existing.association_id = now, size, association_id
                existing.transfer_syntax_uid = transfer_syntax
                existing.forwarded_at, existing.forward_attempts, existing.forward_next_at = None, 0, now
            series.last_received_at = now
            if series.state != "receiving":
                series.state, series.reason = "receiving", None


def stable_series(sessions: sessionmaker[Session], stable_seconds: float) -> list[str]:
    """Series that received nothing for ``stable_seconds``."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    with sessions() as session:
        rows = session.scalars(
            select(Series.series_instance_uid).where(Series.state == "receiving", Series.last_received_at < cutoff)
        ).all()
    return list(rows)


def mark_stable(
    sessions: sessionmaker[Session], series_uid: str, stable_seconds: float, rules: SelectionRules | None = None
) -> tuple[str, int | None]:
    """Turn a quiet series into a job or mark it ignored with the reason. Returns (state, job id).

    ``stable_seconds=0`` completes the series now (complete_on_release).
    """
    rules = rules or SelectionRules()
    conditions = [Series.series_instance_uid == series_uid, Series.state == "receiving"]
    if stable_seconds > 0:
        conditions.append(Series.last_received_at < utcnow() - timedelta(seconds=stable_seconds))
    with sessions.begin() as session:
        claimed = session.execute(update(Series).where(*conditions).values(state="stable")).rowcount
        if not claimed:
            return "receiving", None
        series = session.get(Series, series_uid)
        assert series is not None
        reason = rules.reason_to_skip(series)
        if reason is not None:
            series.state, series.reason = "ignored", reason
            return "ignored", None
        job = Job(series_instance_uid=series_uid, state="queued", instance_count=series.instance_count)
        session.add(job)
        session.flush()
        return "stable", job.id
