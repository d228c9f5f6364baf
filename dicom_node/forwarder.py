"""Routing: every received original is also stored into Orthanc, retried with backoff until it lands."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import Instance, utcnow
from dicom_node.orthanc_store import OrthancStore

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0


def backoff_seconds(attempts: int) -> float:
    """1, 2, 4, ... seconds, at most five minutes."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, attempts - 1))


def forward_pending(sessions: sessionmaker[Session], store: OrthancStore, limit: int = 200) -> tuple[int, int]:
    """One pass: forward due instances. Returns (forwarded, failed)."""
    now = utcnow()
    with sessions() as session:
        due = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.forward_attempts)
            .where(Instance.forwarded_at.is_(None), Instance.forward_next_at <= now)
            .order_by(Instance.received_at)
            .limit(limit)
        ).all()
    forwarded = failed = 0
    for sop_uid, path, attempts in due:
        try:
            store.client.upload(Path(path).read_bytes())
        except Exception as exc:
            failed += 1
            wait = backoff_seconds(attempts + 1)
            with sessions.begin() as session:
                session.execute(
                    update(Instance).where(Instance.sop_instance_uid == sop_uid).values(
                        forward_attempts=attempts + 1, forward_next_at=utcnow() + timedelta(seconds=wait), forward_error=str(exc)[:500]
                    )
                )
            log.warning("forward failed sop=%s attempt=%d retry_in=%.0fs", sop_uid, attempts + 1, wait)
            break  # Orthanc is likely down: wait for the backoff instead of hammering it
        with sessions.begin() as session:
            session.execute(
                update(Instance).where(Instance.sop_instance_uid == sop_uid).values(
                    forwarded_at=utcnow(), forward_attempts=attempts + 1, forward_error=None
                )
            )
        forwarded += 1
    if forwarded:
        audit.record(sessions, audit.INSTANCES_TRANSFERRED, "success", "forwarder", destination=store.url, instances=forwarded, originals=True)
    return forwarded, failed


def forward_loop(sessions: sessionmaker[Session], store: OrthancStore, poll_seconds: float, stop: threading.Event) -> None:
    while not stop.wait(poll_seconds):
        try:
            forward_pending(sessions, store)
        except Exception:
            log.exception("forwarder pass failed")
