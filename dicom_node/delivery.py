"""Delivery of results (``deliver_to``): each done job's sCT series and SR are sent on by Orthanc
to DICOM modalities declared there (a treatment planning system, say), so that a physicist finds
the sCT where the plan is made without routing it by hand.

Orthanc does the C-STORE (``POST /modalities/{name}/store``, synchronous): the modality's address,
AE title and transfer syntaxes are Orthanc's configuration, as for every other modality a site
sends to from Orthanc. The node asks, records the answer and asks again with a growing pause while
the modality is down or refuses (``MAX_ATTEMPTS``, about a day, then given up and audited until
``POST /deliveries/retry``). The rows are written with the job's outcome (one transaction), so a
job done is never left undelivered by a restart; of several worker processes sharing a database,
one claims a delivery before sending it.

With ``deliver_commitment`` Orthanc also asks the modality for storage commitment of what it sent
(Orthanc's Storage Commitment SCU, ``"StorageCommitment": true`` on the same store call; the
modality reports to Orthanc's DICOM port, and the node reads the report at
``GET /storage-commitment/{transaction}``): the delivery is ``committing`` until the modality
reports every instance committed (then ``sent``, ``committed_at``); a report of failed instances,
none within ``deliver_commitment_wait_seconds``, or a transaction Orthanc no longer knows (it
restarted) is a failed attempt, and the sCT and SR are sent and asked for again.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import Delivery, Job, as_utc, utcnow
from dicom_node.orthanc_store import OrthancStore
from dicom_node.outcomes import mark_due_for_job
from dicom_node.rounds import claim, failed_attempt, run_rounds

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 30
MAX_PAUSE_SECONDS = 3600.0
CLAIM_SECONDS = 900.0  # a delivery being sent is this process's for that long (the store's timeout is shorter)
DELIVERED = "results-delivered"
DELIVERY_GIVEN_UP = "results-delivery-given-up"


def add_deliveries(session: Session, job_id: int, modalities: list[str], kept_sct: str | None = None) -> list[str]:
    """In the transaction that marks the job done: one delivery per modality, due now; the
    modalities it leaves out. A job that kept an earlier job's sCT (``kept_sct``, its CT series: a
    series sent again unchanged) is not delivered again where a delivery of that sCT was sent or is
    on its way (a retry of the job, POST /jobs/{id}/retry, makes and delivers it again)."""
    had: set[str] = set()
    if kept_sct:
        had = set(session.scalars(select(Delivery.modality).join(Job, Job.id == Delivery.job_id).where(
            Job.ct_series_uid == kept_sct, Job.id != job_id, Delivery.state.in_(("pending", "committing", "sent")))))
    for modality in modalities:
        if modality not in had:
            session.add(Delivery(job_id=job_id, modality=modality, state="pending", attempts=0, next_at=utcnow()))
    return [m for m in modalities if m in had]


def retry_given_up(sessions: sessionmaker[Session]) -> int:
    """POST /deliveries/retry: every delivery given up (or pending) is due now, its attempts counted afresh."""
    with sessions.begin() as session:
        return session.execute(update(Delivery).where(Delivery.state.in_(("given-up", "pending"))).values(
            state="pending", attempts=0, next_at=utcnow())).rowcount


class Deliverer:
    def __init__(self, sessions: sessionmaker[Session], store: OrthancStore, timeout: float = 600.0, *, commitment: bool = False,
                 commitment_wait_seconds: float = 3600.0) -> None:
        self.sessions, self.store, self.timeout = sessions, store, timeout
        self.commitment, self.commitment_wait = commitment, timedelta(seconds=commitment_wait_seconds)
        self.wake = threading.Event()
        self._unread = 0  # rounds in a row Orthanc did not answer for a storage commitment report
        # committing deliveries whose report was read Pending: not read again before then (monotonic seconds)
        self._next_look: dict[int, float] = {}
        self.reports_read = 0  # storage commitment reports asked of Orthanc by this process

    def _send(self, modality: str, job: Job) -> tuple[int, str | None]:
        """Orthanc sends the job's sCT series and SR to ``modality``: the instances sent, and with
        ``commitment`` the storage commitment transaction Orthanc opened. RuntimeError saying why not."""
        resources = []
        for uid in (job.ct_series_uid, job.sr_series_uid):
            found = self.store.series_id(str(uid)) if uid else None
            if found is None:
                raise RuntimeError(f"Orthanc no longer holds series {uid} of job {job.id} (deleted there?)")
            resources.append(found)
        try:
            answer = self.store.client.post(f"modalities/{modality}/store", json={
                "Resources": resources, "Synchronous": True, "Timeout": int(self.timeout), "StorageCommitment": self.commitment},
                timeout=self.timeout + 30).json()
        except Exception as exc:  # HttpError: an unknown modality (404), the C-STORE failed (500) ...; Orthanc unreachable
            status = getattr(exc, "http_status_code", None)
            detail = getattr(exc, "msg", None) or str(exc)
            raise RuntimeError(f"Orthanc did not send to modality {modality!r}" + (f" (HTTP {status})" if status else "")
                               + f": {str(detail)[:300]}") from exc
        failed = int(answer.get("FailedInstancesCount", 0) or 0)
        if failed:
            raise RuntimeError(f"modality {modality!r} refused {failed} of {answer.get('InstancesCount')} instances")
        transaction = answer.get("StorageCommitmentTransactionUID") if self.commitment else None
        if self.commitment and not transaction:
            raise RuntimeError(f"Orthanc sent to modality {modality!r} but opened no storage commitment transaction "
                               "(deliver_commitment needs Orthanc 1.6.0 or later)")
        return int(answer.get("InstancesCount", 0) or 0), transaction

    def deliver_due(self) -> int:
        """Send every delivery due now (after reading the storage commitment reports awaited); how many
        went (with ``commitment``: were sent, their commitment awaited)."""
        self.check_commitments()
        sent = 0
        with self.sessions() as session:
            due = session.scalars(select(Delivery.id).where(Delivery.state == "pending", Delivery.next_at <= utcnow())
                                  .order_by(Delivery.id)).all()
        for delivery_id in due:
            if not claim(self.sessions, Delivery, delivery_id, CLAIM_SECONDS):  # one of several workers sends it
                continue
            with self.sessions() as session:
                row = session.get(Delivery, delivery_id)
                job = session.get(Job, row.job_id) if row is not None else None
                if row is None or job is None:
                    continue
                session.expunge_all()
            try:
                instances, transaction = self._send(row.modality, job)
            except Exception as exc:
                self._failed(row, job, exc)
                continue
            sent += 1
            if transaction is not None:  # sent; counted as delivered once the modality commits it (check_commitments)
                with self.sessions.begin() as session:
                    session.execute(update(Delivery).where(Delivery.id == row.id).values(
                        state="committing", sent_at=utcnow(), instances=instances, next_at=None, commitment_uid=transaction, committed_at=None))
                    mark_due_for_job(session, job.id)  # the note on the MR series in Orthanc says where its sCT went
                log.info("results sent job=%d modality=%s instances=%d, its storage commitment asked (transaction %s)", job.id,
                         row.modality, instances, transaction)
                continue
            with self.sessions.begin() as session:
                session.execute(update(Delivery).where(Delivery.id == row.id).values(
                    state="sent", sent_at=utcnow(), instances=instances, attempts=row.attempts + 1, last_error=None, next_at=None))
                mark_due_for_job(session, job.id)
                session.add(audit.event(DELIVERED, "success", "deliverer", series_uid=job.series_instance_uid, job_id=job.id,
                                        destination=f"Orthanc modality {row.modality}", modality=row.modality, instances=instances,
                                        ct_series_uid=job.ct_series_uid, sr_series_uid=job.sr_series_uid))
            log.info("results delivered job=%d modality=%s instances=%d", job.id, row.modality, instances)
        return sent

    def check_commitments(self) -> int:
        """Read the storage commitment report of every delivery awaiting one; how many were settled
        (committed, or failed: to be sent again). Orthanc unreachable: read again next round. A report
        still pending is read again after a tenth of the time it has been awaited (1 to 30 s, and
        not past ``commitment_wait``): a planning system that never reports, with hundreds of
        deliveries awaiting it, is not asked after hundreds of times a second."""
        with self.sessions() as session:
            waiting = session.scalars(select(Delivery).where(Delivery.state == "committing").order_by(Delivery.id)).all()
            now, ids = time.monotonic(), {row.id for row in waiting}
            self._next_look = {key: at for key, at in self._next_look.items() if key in ids}
            waiting = [row for row in waiting if self._next_look.get(row.id, 0.0) <= now]
            jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_([row.job_id for row in waiting])))}
            session.expunge_all()
        settled = 0
        for row in waiting:
            job = jobs.get(row.job_id)
            if job is None:
                continue
            try:
                self.reports_read += 1
                report = self.store.client.get_json(f"storage-commitment/{row.commitment_uid}")
            except Exception as exc:  # noqa: BLE001 (HttpError 404: Orthanc no longer knows it; anything else: unreachable now)
                if getattr(exc, "http_status_code", None) != 404:
                    self._unread += 1
                    if self._unread == 1:  # once, not every round while Orthanc is away
                        log.warning("cannot read storage commitment reports from Orthanc, trying again each round: %s", exc)
                    return settled
                report = {"Status": "Unknown"}
            self._unread = 0
            status = report.get("Status")
            committed = len(report.get("Success") or ())
            awaited = (utcnow() - as_utc(row.sent_at)).total_seconds()
            if status == "Pending" and awaited < self.commitment_wait.total_seconds():
                pause = min(max(1.0, awaited / 10), 30.0, self.commitment_wait.total_seconds() - awaited)
                self._next_look[row.id] = time.monotonic() + pause
                continue
            if status == "Success" and committed >= (row.instances or 0):
                with self.sessions.begin() as session:
                    if not session.execute(update(Delivery).where(Delivery.id == row.id, Delivery.state == "committing",
                                                                  Delivery.commitment_uid == row.commitment_uid).values(
                            state="sent", committed_at=utcnow(), attempts=row.attempts + 1, last_error=None)).rowcount:
                        continue  # another node process settled it
                    mark_due_for_job(session, job.id)
                    session.add(audit.event(DELIVERED, "success", "deliverer", series_uid=job.series_instance_uid, job_id=job.id,
                                            destination=f"Orthanc modality {row.modality}", modality=row.modality, instances=row.instances,
                                            ct_series_uid=job.ct_series_uid, sr_series_uid=job.sr_series_uid, committed=True,
                                            commitment_uid=row.commitment_uid))
                log.info("results delivered and committed job=%d modality=%s instances=%d", job.id, row.modality, row.instances or 0)
            else:
                self._failed(row, job, RuntimeError(_not_committed(row, status, committed, report.get("Failures") or [],
                                                                   self.commitment_wait.total_seconds())), awaited=True)
            settled += 1
        return settled

    def _failed(self, row: Delivery, job: Job, exc: BaseException, awaited: bool = False) -> None:
        """A failed attempt at ``row``; ``awaited``: its storage commitment (unless another node
        process settled that sending meanwhile)."""
        with self.sessions.begin() as session:
            if awaited and tuple(session.execute(select(Delivery.state, Delivery.commitment_uid).where(Delivery.id == row.id)
                                                 .with_for_update()).one()) != ("committing", row.commitment_uid):
                return
            attempts, pause, given_up = failed_attempt(session, Delivery, row, exc, MAX_ATTEMPTS, MAX_PAUSE_SECONDS)
            mark_due_for_job(session, job.id)
            if given_up:
                session.add(audit.event(DELIVERY_GIVEN_UP, "failure", "deliverer", series_uid=job.series_instance_uid, job_id=job.id,
                                        destination=f"Orthanc modality {row.modality}", modality=row.modality, ct_series_uid=job.ct_series_uid,
                                        attempts=attempts, reason=str(exc)[:400]))
        log.warning("results delivery job=%d modality=%s failed (attempt %d)%s: %s", job.id, row.modality, attempts,
                    ", given up" if given_up else f", next in {pause:.0f} s", exc)

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        run_rounds(self.deliver_due, stop, self.wake, poll_seconds, "results delivery", "results delivery")


def _not_committed(row: Delivery, status: str | None, committed: int, failures: list[dict[str, Any]], wait: float) -> str:
    """Why a delivery's storage commitment did not come, for its last_error: it is sent again."""
    asked = f"modality {row.modality!r}"
    if status == "Pending":
        return f"{asked} sent no storage commitment report within {wait:.0f} s (does it know Orthanc's AE title and address?): sent again"
    if status == "Unknown":
        return f"Orthanc no longer knows storage commitment transaction {row.commitment_uid} (restarted?): sent again"
    reasons = sorted({f"0x{int(f.get('FailureReason', 0)):04X}" for f in failures})
    return (f"{asked} committed {committed} of the {row.instances} instances sent" + (f", failure reason {', '.join(reasons)}" if reasons else "")
            + ": sent again")


def listing(session: Session, state: str | None, limit: int, offset: int) -> dict[str, Any]:
    """GET /deliveries: counts by state, then the deliveries (newest first) with their job's sCT series."""
    counts = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    query = select(Delivery, Job.ct_series_uid).join(Job, Job.id == Delivery.job_id).order_by(Delivery.id.desc())
    if state:
        query = query.where(Delivery.state == state)
    items = [{"id": d.id, "job_id": d.job_id, "ct_series_uid": ct, "modality": d.modality, "state": d.state, "attempts": d.attempts,
              "created_at": d.created_at, "next_at": d.next_at, "sent_at": d.sent_at, "instances": d.instances, "last_error": d.last_error,
              "commitment_uid": d.commitment_uid, "committed_at": d.committed_at}
             for d, ct in session.execute(query.limit(limit).offset(offset)).all()]
    return {"counts": counts, "items": items, "limit": limit, "offset": offset}
