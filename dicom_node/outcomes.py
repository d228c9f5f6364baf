"""Where a series stands, written on the MR series in Orthanc (its ``Mr2ctOutcome`` metadata).

A user of Orthanc sees an MR series the plugin routed, or the node routed there, and no sCT beside
it: until now only the node's API said why (ignored for its contrast, a job still queued, a job
failed). The node writes a one-line note on the series in the Orthanc it stores results into, each
time its standing changes: not synthesized and why, queued, synthesizing, the sCT stored (which
series, and where it was delivered: deliver_to), failed and why, cancelled, receiving instances
again (judged again once complete). Orthanc Explorer shows it on the series page
(orthanc/plugin.py); any REST client reads ``GET /series/<id>/metadata/Mr2ctOutcome``.

The places that change a series' standing (series completion, the worker's claim and settlement,
the API's retry, cancel and synthesize, a delivery's progress) set ``Series.outcome_due`` in the
same transaction; a round here takes the due series (clearing the flag in the transaction that
reads them, so a change made meanwhile flags it again) and holds them until their notes are
written (``Series.outcome_after``, a lease: with several worker processes a second writer waits,
so a note never lands after a newer one), then writes each note. A series whose lease ran out
while still held (its writer died between taking and writing: killed, its host lost) is taken
again, so its note is not lost. A writer alive but slow (Orthanc answering slowly for a batch)
renews its lease once half of it has passed, on the condition that it still holds it: a series
another writer took meanwhile (the lease ran out all the same: a process paused, a clock jump) is
that writer's now, and the slow one leaves it unwritten, so its older note cannot land last. A
note Orthanc cannot take now (Orthanc down) is flagged again for a later round; a series Orthanc
does not hold yet (routed there after the node judged it: the node's own forward_originals, or a
scanner that sends to both) is looked for again every ``NOT_HELD_PAUSE`` seconds until
``NOT_HELD_WINDOW`` after its last instance; one the node's routing puts there later (a backlog)
is flagged again by it (``mark_due_unwritten``); one Orthanc never receives (sent to the node
only) gets no note. Notes are best effort: nothing else waits on them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from orthanc_api_client.exceptions import HttpError
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import Delivery, Job, Series, as_utc, utcnow
from dicom_node.orthanc_store import OUTCOME_FLAG, OrthancStore
from dicom_node.rounds import growing_pause, run_rounds
from synthesis.errors import PacsUnavailable

log = logging.getLogger(__name__)

MAX_NOTE_CHARS = 1000
BATCH = 50
LEASE = timedelta(seconds=120)  # how long a writer holds the series it took (one that dies lets go after this)
NOT_HELD_PAUSE = timedelta(seconds=30)  # a series Orthanc does not hold yet: looked for again after this...
NOT_HELD_WINDOW = timedelta(minutes=10)  # ...until this long after its last instance arrived at the node


def mark_due(session: Session, *series_uids: str) -> None:
    """In the transaction that changes their standing: these series' notes are to be written again."""
    uids = [uid for uid in series_uids if uid]
    if uids:
        session.execute(update(Series).where(Series.series_instance_uid.in_(uids)).values(outcome_due=True))


def mark_due_unwritten(session: Session, series_uids: Collection[str]) -> None:
    """Series just routed into the Orthanc the notes go to (forward_originals): those judged whose
    note was never written (Orthanc did not hold them within ``NOT_HELD_WINDOW``: a routing backlog,
    Orthanc down for long) are due again. One first being received gets its note once judged."""
    session.execute(update(Series).where(Series.series_instance_uid.in_(list(series_uids)), Series.outcome_note.is_(None),
                                         Series.state != "receiving", Series.outcome_due.is_(False)).values(outcome_due=True))


def mark_due_for_job(session: Session, job_id: int) -> None:
    """As mark_due, for the series of a job."""
    session.execute(update(Series).where(Series.series_instance_uid == select(Job.series_instance_uid).where(Job.id == job_id)
                                         .scalar_subquery()).values(outcome_due=True))


def note(series: Series, job: Job | None, deliveries: list[Delivery] | None = None) -> str | None:
    """The line a user of Orthanc reads on the series (None while it is first being received);
    ``deliveries``: where a done job's sCT went (deliver_to; ``where_sent``)."""
    if series.state == "ignored":
        text = f"not synthesized: {series.reason or 'no reason recorded'}"
    elif series.state == "receiving" and series.outcome_note is not None:  # judged before; more instances came
        text = (f"receiving instances again ({series.instance_count} so far): judged again once the series is complete"
                + (f"; until then, {_job_text(job)}" if job is not None else ""))
    elif job is None:
        return None
    else:
        text = _job_text(job) + "".join(f"; {standing(d)}" for d in deliveries or ())
    line = f"mr2ct {utcnow():%Y-%m-%d %H:%M} UTC: {text}"
    return line if len(line) <= MAX_NOTE_CHARS else line[:MAX_NOTE_CHARS - 3] + "..."


def _job_text(job: Job) -> str:
    if job.state == "queued" and job.error:
        return f"job {job.id} waits to try again (attempt {job.attempts + 1}): {job.error}"
    if job.state == "queued":
        return f"job {job.id} queued for synthesis ({job.instance_count} instances)"
    if job.state == "running":
        return f"job {job.id} synthesizing ({job.instance_count} instances, attempt {job.attempts})"
    if job.state == "done":
        return (f"sCT stored in this study: CT series {job.ct_series_uid} and its provenance SR series {job.sr_series_uid} "
                f"(job {job.id}, {job.instance_count} instances, model sha256 {(job.model_sha256 or '')[:12]}"
                + (f"; the series came again unchanged: the sCT job {job.reused_job_id} made is kept)" if job.reused_job_id else ")"))
    if job.state == "failed":
        return f"sCT failed (job {job.id}): {job.error or 'no reason recorded'}; an administrator may retry it (POST /jobs/{job.id}/retry)"
    return f"job {job.id} {job.state}: {job.error or ''}".rstrip(": ")


def where_sent(session: Session, ct_series_uids: list[str]) -> dict[str, list[Delivery]]:
    """Where each sCT series went: per CT series UID, the newest delivery to each modality of any
    job that stored or kept it (a kept sCT is not delivered again, a remade one is), by modality
    (dicom_node.delivery sends them)."""
    newest = (select(func.max(Delivery.id)).join(Job, Job.id == Delivery.job_id)
              .where(Job.ct_series_uid.in_(ct_series_uids)).group_by(Job.ct_series_uid, Delivery.modality))
    found: dict[str, list[Delivery]] = {}
    for delivery, ct in session.execute(select(Delivery, Job.ct_series_uid).join(Job, Job.id == Delivery.job_id)
                                        .where(Delivery.id.in_(newest)).order_by(Delivery.modality)):
        found.setdefault(ct, []).append(delivery)
    return found


def standing(delivery: Delivery) -> str:
    """How a delivery stands, in words (the dashboard's row, the note on the MR series in Orthanc)."""
    to = delivery.modality
    if delivery.state == "sent":
        return f"delivered to {to}" + (", committed" if delivery.committed_at else "")
    if delivery.state == "committing":
        return f"sent to {to}, its storage commitment awaited"
    why = (delivery.last_error or "")[:200]
    if delivery.state == "given-up":
        return f"delivery to {to} given up after {delivery.attempts} attempts: {why}"
    return f"delivery to {to} waiting" + (f" (attempt {delivery.attempts}: {why})" if delivery.attempts else "")


class Due(NamedTuple):
    series_uid: str
    text: str | None  # the note now; None while the series is first being received
    last_received_at: datetime
    lease: datetime  # until when the writer that took it holds it (``Series.outcome_after`` as it set it)


def _claim_due(sessions: sessionmaker[Session], limit: int) -> list[Due]:
    """Take up to ``limit`` due series no other writer holds: their notes now, the flag cleared, held
    for ``LEASE`` (until ``_release``). A series held (``outcome_after`` set) and not due is one a
    writer took and has not let go of: once its lease is over, that writer died, and it is taken again."""
    now = utcnow()
    with sessions.begin() as session:
        uids = session.scalars(select(Series.series_instance_uid)
                               .where(or_(Series.outcome_due.is_(True), Series.outcome_after.is_not(None)),
                                      or_(Series.outcome_after.is_(None), Series.outcome_after <= now))
                               .limit(limit).with_for_update(skip_locked=True)).all()
        if not uids:
            return []
        lease = now + LEASE
        session.execute(update(Series).where(Series.series_instance_uid.in_(uids)).values(outcome_due=False, outcome_after=lease))
        newest = dict(session.execute(select(Job.series_instance_uid, func.max(Job.id)).where(Job.series_instance_uid.in_(uids))
                                      .group_by(Job.series_instance_uid)).all())
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(list(newest.values()))))}
        sent = where_sent(session, [job.ct_series_uid for job in jobs.values() if job.state == "done" and job.ct_series_uid])
        return [Due(series.series_instance_uid, note(series, job := jobs.get(newest.get(series.series_instance_uid, -1)),
                                                     sent.get(job.ct_series_uid or "") if job is not None else None),
                    as_utc(series.last_received_at), lease)
                for series in session.scalars(select(Series).where(Series.series_instance_uid.in_(uids)))]


def _by_lease(uids: list[str], lease: dict[str, datetime]) -> dict[datetime, list[str]]:
    """``uids`` grouped by the lease this writer holds each by (one group, or two after a renewal):
    one conditional statement per group."""
    groups: dict[datetime, list[str]] = {}
    for uid in uids:
        groups.setdefault(lease[uid], []).append(uid)
    return groups


def _renew(sessions: sessionmaker[Session], taken: list[Due]) -> list[Due]:
    """Of series taken by ``_claim_due`` (and not let go of), those this writer still holds, their
    leases renewed for ``LEASE`` from now; the others (taken by another writer once their lease ran
    out) are left to it."""
    if not taken:
        return []
    lease = utcnow() + LEASE
    with sessions.begin() as session:
        for until, uids in _by_lease([due.series_uid for due in taken], {due.series_uid: due.lease for due in taken}).items():
            session.execute(update(Series).where(Series.series_instance_uid.in_(uids), Series.outcome_after == until)
                            .values(outcome_after=lease))
        held = set(session.scalars(select(Series.series_instance_uid).where(
            Series.series_instance_uid.in_([due.series_uid for due in taken]), Series.outcome_after == lease)))
    return [due._replace(lease=lease) for due in taken if due.series_uid in held]


def _release(sessions: sessionmaker[Session], uids: list[str], *, due: bool = False, after: datetime | None = None,
             lease: dict[str, datetime] | None = None) -> None:
    """Let go of series taken by ``_claim_due``: flagged due again if ``due``, free to be taken again
    from ``after`` (None: at once); with ``lease`` (each series' lease as this writer set it), only
    those it still holds."""
    if uids:
        with sessions.begin() as session:
            values: dict[str, Any] = {"outcome_after": after}
            if due:
                values["outcome_due"] = True
            if lease is None:
                session.execute(update(Series).where(Series.series_instance_uid.in_(uids)).values(**values))
                return
            for until, held in _by_lease(uids, lease).items():
                session.execute(update(Series).where(Series.series_instance_uid.in_(held), Series.outcome_after == until).values(**values))


class OutcomeNotes:
    """Writes the due notes into the Orthanc results go to (``store``)."""

    def __init__(self, sessions: sessionmaker[Session], store: OrthancStore) -> None:
        self.sessions, self.store = sessions, store
        self.wake = threading.Event()
        self._quiet_until = 0.0  # Orthanc down, or declaring no Mr2ctOutcome: no round before then (monotonic seconds)
        self._failures = 0  # rounds in a row that Orthanc could not be reached

    def write_due(self, limit: int = BATCH) -> int:
        """One round of at most ``limit`` due series: how many were taken (written, with no note yet,
        or not in Orthanc). Those not written because Orthanc is down (tried again after 2, 4, ... 60
        seconds) or declares no such metadata (after 10 minutes) are due again; so is one Orthanc does
        not hold yet, within ``NOT_HELD_WINDOW`` of its last instance (after ``NOT_HELD_PAUSE``)."""
        if time.monotonic() < self._quiet_until:
            return 0
        taken = _claim_due(self.sessions, limit)
        return len(taken) if self.write_taken(taken) else 0

    def write_taken(self, taken: list[Due]) -> bool:
        """Write the notes of series this writer took (``_claim_due``), renewing its lease on those
        not written yet once half of it has passed; one another writer took meanwhile is left to it.
        False: Orthanc could not take them now (the rest let go of, due again)."""
        leases = {due.series_uid: due.lease for due in taken}
        done: list[str] = []
        not_held: list[str] = []  # Orthanc may receive them yet: looked for again after the pause
        pending = list(taken)
        while pending:
            if utcnow() >= pending[0].lease - LEASE / 2:  # let go of those handled before their lease runs out
                _release(self.sessions, done, lease=leases)
                _release(self.sessions, not_held, due=True, after=utcnow() + NOT_HELD_PAUSE, lease=leases)
                done, not_held = [], []
                still = _renew(self.sessions, pending)
                if len(still) < len(pending):
                    log.info("%d series' notes were taken by another writer while this one was slow; left to it", len(pending) - len(still))
                leases.update((due.series_uid, due.lease) for due in still)
                pending = still
                continue
            due = pending.pop(0)
            try:
                written = None if due.text is None else self._write(due.series_uid, due.text)
            except (PacsUnavailable, HttpError, OSError) as exc:
                self._failures += 1
                self._quiet_until = time.monotonic() + growing_pause(self._failures, 60.0)
                if self._failures == 1:
                    log.warning("cannot write series' %s in %s, trying again later: %s", OUTCOME_FLAG, self.store.url, exc)
                written = None
            if written is None and due.text is not None:  # Orthanc down, or not declaring the metadata: the rest waits
                _release(self.sessions, done, lease=leases)
                _release(self.sessions, [*not_held, due.series_uid, *(d.series_uid for d in pending)], due=True, lease=leases)
                return False
            if written is not None:
                self._failures = 0
            if written is False and utcnow() - due.last_received_at < NOT_HELD_WINDOW:
                not_held.append(due.series_uid)
            else:
                done.append(due.series_uid)
        _release(self.sessions, done, lease=leases)
        _release(self.sessions, not_held, due=True, after=utcnow() + NOT_HELD_PAUSE, lease=leases)
        return True

    def _write(self, series_uid: str, text: str) -> bool | None:
        """True: the note went onto the series; False: Orthanc does not hold the series (sent to the
        node only, or deleted); None: Orthanc declares no such metadata (then quiet for 10 minutes)."""
        series_id = self.store.series_id(series_uid)
        if series_id is None:
            return False
        try:
            self.store.client.put(f"series/{series_id}/metadata/{OUTCOME_FLAG}", data=text.encode())
        except HttpError as exc:
            if exc.http_status_code not in (400, 404):
                raise
            if self.store.series_id(series_uid) is None:  # deleted in Orthanc meanwhile
                return False
            self._quiet_until = time.monotonic() + 600
            log.info("%s does not declare the %s metadata (UserMetadata in its configuration; mr2ct orthanc-config writes it): "
                     "no notes on its series for 10 minutes", self.store.url, OUTCOME_FLAG)
            return None
        with self.sessions.begin() as session:
            session.execute(update(Series).where(Series.series_instance_uid == series_uid).values(outcome_note=text))
        return True

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        def step() -> Any:
            while self.write_due() == BATCH and not stop.is_set():
                pass

        run_rounds(step, stop, self.wake, poll_seconds, "writing the series' notes into Orthanc failed", "the series' notes in Orthanc")
