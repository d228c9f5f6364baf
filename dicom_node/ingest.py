"""What happens to a received instance: validate, spool durably, record. No networking here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import Instance, Job, Series, utcnow
from dicom_node.spool import Spool, require_uid
from synthesis.errors import InvalidInstance

log = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = {MRImageStorage: "MR Image Storage"}


class DatasetMismatch(InvalidInstance):
    """The data set does not match its SOP class (DICOM status 0xA900)."""


@dataclass(frozen=True)
class ReceivedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str


def validate(ds: Dataset, affected_sop_class: str, affected_sop_instance: str) -> ReceivedInstance:
    """Check what must hold before an instance is accepted; raise ``InvalidInstance`` saying why not."""
    sop_class = require_uid(affected_sop_class, "Affected SOP Class UID")
    sop_uid = require_uid(affected_sop_instance, "Affected SOP Instance UID")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise DatasetMismatch(f"SOP class {sop_class} is not accepted by this node")
    if ds.get("SOPClassUID") != sop_class:
        raise DatasetMismatch(f"SOPClassUID in the data set ({ds.get('SOPClassUID')!r}) differs from the request ({sop_class})")
    if ds.get("SOPInstanceUID") != sop_uid:
        raise DatasetMismatch("SOPInstanceUID in the data set differs from the C-STORE request")
    study_uid = require_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    if "PixelData" not in ds:
        raise DatasetMismatch("the instance has no Pixel Data")
    for keyword in ("Rows", "Columns", "BitsAllocated", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise DatasetMismatch(f"{keyword} is missing; the node needs it to build a volume")
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    if not (0 < rows <= 8192 and 0 < cols <= 8192) or bits not in (8, 16, 32):
        raise DatasetMismatch(f"implausible image size {rows}x{cols} with {bits} bits allocated")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = rows * cols * frames * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise DatasetMismatch(f"Pixel Data holds {actual} bytes, {rows}x{cols}x{frames} at {bits} bits needs {expected}")
    modality = str(ds.get("Modality", "") or "")
    return ReceivedInstance(sop_class, sop_uid, study_uid, series_uid, modality)


class Ingest:
    """Spools and records instances; shared by all SCP association threads."""

    def __init__(self, spool: Spool, sessions: sessionmaker[Session]) -> None:
        self.spool = spool
        self.sessions = sessions

    def store(self, info: ReceivedInstance, data: bytes, transfer_syntax: str, calling_ae: str, association_id: int | None) -> Path:
        path = self.spool.write(info.study_uid, info.series_uid, info.sop_instance_uid, data)
        now = utcnow()
        with self.sessions.begin() as session:
            series = session.get(Series, info.series_uid, with_for_update=True)
            if series is None:
                series = Series(
                    series_instance_uid=info.series_uid, study_instance_uid=info.study_uid, modality=info.modality,
                    calling_ae=calling_ae, instance_count=0, first_received_at=now, last_received_at=now, state="receiving",
                )
                session.add(series)
                session.flush()
            existing = session.get(Instance, info.sop_instance_uid)
            if existing is None:
                session.add(
                    Instance(
                        sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                        series_instance_uid=info.series_uid, transfer_syntax_uid=transfer_syntax, path=str(path),
                        size_bytes=len(data), association_id=association_id, received_at=now,
                    )
                )
                series.instance_count += 1
            else:  # a re-send: the spool file was replaced atomically; the count stays
                existing.received_at, existing.size_bytes, existing.association_id = now, len(data), association_id
                existing.transfer_syntax_uid = transfer_syntax
            series.last_received_at = now
            if series.state != "receiving":
                series.state, series.reason = "receiving", None
        return path


def stable_series(sessions: sessionmaker[Session], stable_seconds: float) -> list[str]:
    """Series that received nothing for ``stable_seconds``."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    with sessions() as session:
        rows = session.scalars(
            select(Series.series_instance_uid).where(Series.state == "receiving", Series.last_received_at < cutoff)
        ).all()
    return list(rows)


def mark_stable(sessions: sessionmaker[Session], series_uid: str, stable_seconds: float) -> tuple[str, int | None]:
    """Turn a quiet series into a job (MR) or mark it ignored. Returns (state, job id)."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    with sessions.begin() as session:
        claimed = session.execute(
            update(Series)
            .where(Series.series_instance_uid == series_uid, Series.state == "receiving", Series.last_received_at < cutoff)
            .values(state="stable")
        ).rowcount
        if not claimed:
            return "receiving", None
        series = session.get(Series, series_uid)
        assert series is not None
        if series.modality != "MR":
            series.state, series.reason = "ignored", f"modality {series.modality!r} is not MR"
            return "ignored", None
        job = Job(series_instance_uid=series_uid, state="queued", instance_count=series.instance_count)
        session.add(job)
        session.flush()
        return "stable", job.id
