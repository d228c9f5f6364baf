"""Database rows for spooled instances: recorded in batches, group-committed behind the spool."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.db import PassErrors, cannot_reach, driver_message
from dicom_node.models import AuditEvent, Instance, RefusedInstance, Series, as_utc
from synthesis.contrast import with_other_choice, with_other_contrast, with_other_part

if TYPE_CHECKING:
    from dicom_node.ingest import ReceivedInstance

log = logging.getLogger(__name__)

WINDOW_SECONDS = 0.2  # how long a row waits for others to share its transaction
MAX_BACKLOG = 20_000  # rows waiting for the database before the SCP refuses instances (Out of Resources)


@dataclass(frozen=True)
class SpooledInstance:
    """An instance that is durably in the spool and waits for (or has) its database row."""

    info: ReceivedInstance
    path: Path
    size: int
    transfer_syntax: str
    calling_ae: str
    association_id: int | None
    received_at: datetime


def heed(series: Series, info: ReceivedInstance) -> None:
    """What another instance's header says against what ``series`` took from its first (its MR
    contrast, contrast agent, fat suppression and body part, which the selection rules judge): an
    agent or fat suppression any instance says holds for the series, instances that read different
    MR contrasts make it MIXED, and every body part an instance names is the series' (HEAD\\NECK)
    (``synthesis.contrast.with_other_choice``, ``with_other_contrast``, ``with_other_part``; the
    SR's ``series_headers`` and ``series_body_part`` read them alike). Until 2026-12-06 the first
    instance alone was read."""
    part = with_other_part(series.body_part or "", info.body_part)
    if part != (series.body_part or ""):
        series.body_part = part
    for field, combine in (("contrast", with_other_contrast), ("contrast_agent", with_other_choice),
                           ("fat_suppression", with_other_choice)):
        before = (getattr(series, field), getattr(series, f"{field}_source"))
        told = combine(before, (getattr(info, field), getattr(info, f"{field}_source")))
        if told != before:
            setattr(series, field, told[0])
            setattr(series, f"{field}_source", told[1])


def record_batch(sessions: sessionmaker[Session], items: list[SpooledInstance]) -> None:
    """Record spooled instances (new or re-sent) in one transaction and wake their series up.

    A SOP Instance UID sent twice counts once; the later arrival wins (its file replaced the
    earlier one atomically in the spool). One sent again under another series or study (split,
    merged or corrected upstream) moves there: its row follows the new file, the series it left
    counts one fewer, and the earlier file is deleted once the move is committed (until
    2026-12-05 the row kept naming the old file, so the new series was synthesized without it).
    """
    latest: dict[str, SpooledInstance] = {}
    superseded: list[tuple[Path, SpooledInstance]] = []  # (a file an arrival replaced elsewhere, that arrival)
    for item in items:
        earlier = latest.pop(item.info.sop_instance_uid, None)
        if earlier is not None and earlier.path != item.path:
            superseded.append((earlier.path, item))
        latest[item.info.sop_instance_uid] = item
    moved = 0
    first_of: dict[str, SpooledInstance] = {}  # each series' first arrival in the batch: what a new series' row is made of
    for item in latest.values():
        first_of.setdefault(item.info.series_uid, item)
    with sessions.begin() as session:
        touched: dict[str, Series] = {}

        def locked_series(uid: str) -> Series | None:
            if uid not in touched:
                found = session.get(Series, uid, with_for_update=True)
                if found is None:
                    return None
                touched[uid] = found
            return touched[uid]

        # Every series of the batch is locked, or made, in one order (their UIDs'), before anything
        # else: two processes whose batches hold the same series then take them alike, and neither
        # waits on the other in a circle. Until 2026-12-08 it was arrival order, and two SCP
        # processes taking instances of two series in opposite orders deadlocked (17 of 20 rounds,
        # one of them stalled ~1 s each time by PostgreSQL's deadlock_timeout), and a new series'
        # row was inserted plainly, so the second process to insert it failed its whole batch
        # (duplicate key) and recorded it again. Instances are read once their series are locked: a
        # concurrent batch with the same instance has committed by then, and it is a re-send here.
        for uid in sorted(first_of):
            if locked_series(uid) is None:
                _insert_series(session, first_of[uid])  # nothing when another process made it meanwhile
                touched[uid] = session.get(Series, uid, with_for_update=True, populate_existing=True)
        existing = {
            row.sop_instance_uid: row
            for chunk in _chunks(list(latest), 500)
            for row in session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(chunk)))
        }

        for uid, item in latest.items():
            info = item.info
            series = touched[info.series_uid]
            if series.study_instance_uid != info.study_uid:  # the series moved to another study upstream: the latest says where
                series.study_instance_uid = info.study_uid
            heed(series, info)  # the series' first instance says nothing new to the row made of it
            row = existing.get(uid)
            if row is None:
                session.add(
                    Instance(
                        sop_instance_uid=uid, sop_class_uid=info.sop_class_uid, series_instance_uid=info.series_uid,
                        transfer_syntax_uid=item.transfer_syntax, orientation=info.orientation, position=info.position, frames=info.frames,
                        frame_positions=info.frame_positions, frame_set=info.frame_set, path=str(item.path), size_bytes=item.size,
                        association_id=item.association_id, received_at=item.received_at, forward_next_at=item.received_at,
                    )
                )
                series.instance_count += 1
            else:  # a re-send: the count stays, unless it comes under another series or had been set aside
                # its header may say otherwise now (corrected upstream): what the series' headers say is read again at completion
                series.headers_stale = True
                if row.series_instance_uid != info.series_uid:
                    left = locked_series(row.series_instance_uid)
                    if left is not None:
                        left.headers_stale = True
                    if left is not None and row.set_aside is None:
                        left.instance_count = max(0, left.instance_count - 1)
                    row.series_instance_uid = info.series_uid
                    series.instance_count += 1
                    moved += 1
                elif row.set_aside is not None:  # sent again: part of its series again
                    series.instance_count += 1
                row.set_aside = None
                if row.path != str(item.path):  # another series or study folder: the row follows the new file
                    superseded.append((Path(row.path), item))
                    row.path = str(item.path)
                row.received_at, row.size_bytes, row.association_id = item.received_at, item.size, item.association_id
                row.transfer_syntax_uid, row.orientation, row.position = item.transfer_syntax, info.orientation, info.position
                row.frames, row.frame_positions, row.frame_set = info.frames, info.frame_positions, info.frame_set
                row.forwarded_at, row.forward_attempts, row.forward_refusals, row.forward_next_at = None, 0, 0, item.received_at
                row.forward_commitment_id, row.forward_committed_at = None, None  # routed, and asked for, again
                row.purged_at = None
            if series.last_received_at is None or as_utc(series.last_received_at) < item.received_at:
                series.last_received_at = item.received_at
            if series.state != "receiving":
                series.state, series.reason, series.reason_code = "receiving", None, ""
                # the note in Orthanc (dicom_node.outcomes) says it is being received again, not its last judgement
                series.outcome_due = series.outcome_due or series.outcome_note is not None
        for chunk in _chunks(list(latest), 500):  # refused before, stored now: its series is whole again
            session.execute(delete(RefusedInstance).where(RefusedInstance.sop_instance_uid.in_(chunk)))
    if moved:
        log.info("re-sent instance(s) moved to another series: %d", moved)
    for stale, newer in superseded:
        remove_superseded(stale, newer.path, newer.received_at)


def _insert_series(session: Session, item: SpooledInstance) -> None:
    """Insert the row of ``item``'s series, made of its header, unless it exists (``INSERT ... ON
    CONFLICT DO NOTHING``, on PostgreSQL and SQLite alike): another process that inserts it at the
    same moment makes this one wait for its commit, then do nothing."""
    info = item.info
    values = dict(
        series_instance_uid=info.series_uid, study_instance_uid=info.study_uid, modality=info.modality,
        calling_ae=item.calling_ae, instance_count=0, first_received_at=item.received_at,
        last_received_at=item.received_at, state="receiving", series_description=info.series_description,
        orientation=info.orientation, patient_id=info.patient_id, image_type=info.image_type,
        component=info.component, component_source=info.component_source,
        contrast=info.contrast, contrast_source=info.contrast_source, body_part=info.body_part,
        contrast_agent=info.contrast_agent, contrast_agent_source=info.contrast_agent_source,
        fat_suppression=info.fat_suppression, fat_suppression_source=info.fat_suppression_source,
    )
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # a database the node is not tested on: a plain insert (a race there is the duplicate-key retry's)
        session.add(Series(**values))
        session.flush()
        return
    session.execute(insert(Series).values(**values).on_conflict_do_nothing(index_elements=[Series.series_instance_uid]))


def record_sorting_out(sessions: sessionmaker[Session], items: list[SpooledInstance], *,
                       retried: bool = False) -> list[tuple[SpooledInstance, str]]:
    """``record_batch``, where one row the database will not take for a reason other than an
    outage (a value it refuses: a defect, not a wait) cannot hold back the rows with it: the batch
    is recorded in halves down to the rows it refuses, which are returned with the driver's
    message (the rest are recorded). An outage is raised, all rows still to record. Until
    2026-12-07 such a batch was retried for ever, every row received after it waiting behind it
    until the backlog refused all instances (on PostgreSQL, a position too long for its column).
    A row refused for a duplicate key is tried once more (``retried``): another process inserted
    the same instance at the same moment under another series (its series' locks do not meet),
    which is a race, not a refusal. (A new series' row is inserted if absent, and an instance of a
    series both processes lock is read after the lock, since 2026-12-08: those races no longer
    come here.)"""
    try:
        record_batch(sessions, items)
        return []
    except Exception as exc:
        if cannot_reach(exc):
            raise
        if len(items) == 1:
            if isinstance(exc, IntegrityError) and not retried:
                # Another process recorded the same instance at the same moment: its row exists now,
                # so it is updated, not inserted. (Until 2026-12-07 night one of two processes taking
                # a new series' first instances at once held its instance as unrecordable, and the
                # series with it; since 2026-12-08 that series' row is inserted if absent instead.)
                return record_sorting_out(sessions, items, retried=True)
            return [(items[0], driver_message(exc))]
    half = len(items) // 2  # in order: of two arrivals of one instance the later still wins
    return record_sorting_out(sessions, items[:half]) + record_sorting_out(sessions, items[half:])


def hold_unrecorded(sessions: sessionmaker[Session], item: SpooledInstance, reason: str, *, recovered: bool = False) -> None:
    """An instance the database refused to record: its file stays in the spool (start-up recovery
    tries it again), an audit row says so, and its series waits for it as for a refused instance
    (``ingest.record_refusal``: not synthesized with the gap) until it is sent again.

    ``recovered``: the file was found again by start-up recovery. When it was audited before (an
    earlier start, or its arrival), only the log says so: one file kept for a human is one audit
    row and one count of ``mr2ct_instances_not_recorded_total``, not one more at every start, and
    a hold an administrator has lifted since (``POST /synthesize``) stays lifted."""
    info = item.info
    log.error("instance spooled but not recorded series=%s sop=%s file=%s: %s", info.series_uid, info.sop_instance_uid, item.path.name,
              reason)
    from dicom_node.ingest import record_refusal  # here: ingest imports this module

    because = f"stored in the spool, but the database refused its row ({reason})"[:500]
    try:
        with sessions.begin() as session:
            if recovered and _audited_unrecorded(session, info.series_uid, info.sop_instance_uid):
                log.warning("instance not recorded again, audited before sop=%s file=%s", info.sop_instance_uid, item.path.name)
                return
            session.add(audit.event(audit.INSTANCE_NOT_RECORDED, "failure", item.calling_ae[:128], series_uid=info.series_uid,
                                    sop_instance_uid=info.sop_instance_uid, association_id=item.association_id, reason=because))
            record_refusal(session, info.sop_instance_uid, info.series_uid, 0x0110, because, item.received_at)
    except Exception as exc:  # noqa: BLE001 (the series' UID itself may be what it refuses): the log line above stays
        log.error("instance not recorded, and its hold not recorded either sop=%s: %s", info.sop_instance_uid, driver_message(exc))


def _audited_unrecorded(session: Session, series_uid: str, sop_uid: str) -> bool:
    """Whether an instance's row was refused before (its ``dicom-instance-not-recorded`` audit row;
    found by the indexed series UID, then the SOP Instance UID in its detail)."""
    details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == audit.INSTANCE_NOT_RECORDED,
                                                              AuditEvent.series_instance_uid == series_uid)).all()
    return any((detail or {}).get("sop_instance_uid") == sop_uid for detail in details)


def remove_superseded(stale: Path, newer: Path, newer_received_at: datetime) -> bool:
    """Delete the spool file of an instance that arrived again under another series or study, so
    that start-up recovery cannot record it back over the newer one. Only a file of the same
    spool and the same SOP Instance UID, written before the arrival that replaced it (a copy
    written since, the instance sent back where it was, stays)."""
    if stale == newer or stale.name != newer.name or stale.parent.parent.parent != newer.parent.parent.parent:
        return False
    try:
        if datetime.fromtimestamp(stale.stat().st_mtime, timezone.utc) >= as_utc(newer_received_at):
            return False
        stale.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:  # left behind: recovery tells it from the newer one by the same rule
        log.warning("superseded spool file not deleted path=%s reason=%s", stale.name, exc)
        return False
    return True


def _chunks(values: list[str], size: int) -> list[list[str]]:
    return [values[start:start + size] for start in range(0, len(values), size)]


class Recorder:
    """Group commit of instance rows behind the durable spool.

    The spool (fsynced, renamed, folder fsynced) is the truth and is complete before the sender
    hears Success; the database row follows a few milliseconds later, many rows per transaction,
    written by this one thread while the association threads wait for the network. A crash in
    between loses no instance: start-up recovery records every spool file the database does
    not know. ``flush`` waits until everything submitted so far is committed (the SCP calls it
    before it answers an A-RELEASE, so a sender that sees its association released finds every
    instance it sent in the database).
    """

    def __init__(
        self, sessions: sessionmaker[Session], max_batch: int = 512, max_backlog: int = MAX_BACKLOG, window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        self.sessions = sessions
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        # Rows wait up to this long for company: one transaction for a burst of instances costs
        # the association threads (and the GIL) far less than one per instance.
        self.window_seconds = window_seconds
        self._pending: list[SpooledInstance] = []
        self._oldest = 0.0
        self._flush_requested = 0
        self._submitted = 0
        self._committed = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        with self._condition:
            return self._submitted - self._committed

    def pending_series(self) -> set[str]:
        """The series with spooled instances whose rows are not committed yet (waiting, being
        written, or held back by a database that is away): still arriving, whatever their
        committed rows' times say."""
        with self._condition:
            return {item.info.series_uid for item in self._pending}

    def submit(self, item: SpooledInstance) -> None:
        with self._condition:
            first = not self._pending
            if first:
                self._oldest = time.monotonic()
            self._pending.append(item)
            self._submitted += 1
            # The first row of a window wakes the recorder to time that window; a full batch
            # ends it early. (Without the first, rows waited for a full batch or a flush.)
            if first or len(self._pending) >= self.max_batch:
                self._condition.notify_all()

    def flush(self, timeout: float = 120.0) -> bool:
        """Wait until every instance submitted before this call is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._condition:
            target = self._submitted
            if self._committed >= target:
                return True
            self._flush_requested += 1
            self._condition.notify_all()
            try:
                while self._committed < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.error("database rows lag behind the spool backlog=%d", self._submitted - self._committed)
                        return False
                    self._condition.wait(remaining)
            finally:
                self._flush_requested -= 1
        return True

    def stop(self, timeout: float = 120.0) -> None:
        self.flush(timeout)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        outage = PassErrors(log, "recording spooled instances", "recording spooled instances failed")
        while True:
            with self._condition:
                while True:
                    if not self._pending:
                        if self._stopping:
                            return
                        self._condition.wait()
                        continue
                    due = self._oldest + self.window_seconds - time.monotonic()
                    if due <= 0 or self._flush_requested or self._stopping or len(self._pending) >= self.max_batch:
                        break
                    self._condition.wait(due)
                batch = self._pending[: self.max_batch]
            try:
                for item, reason in record_sorting_out(self.sessions, batch):
                    hold_unrecorded(self.sessions, item, reason)
            except Exception as exc:  # the database is busy or down: the rows wait, the files are safe
                failures += 1
                delay = min(5.0, 0.05 * 2 ** min(failures, 7))
                outage.failed(exc)  # an outage: a line when it begins, reminders, a line when it ends
                if self._stopping and failures >= 5:
                    log.error("giving up on %d row(s) at stop; start-up recovery records them from the spool", len(self._pending))
                    with self._condition:
                        self._committed += len(self._pending)
                        self._pending.clear()
                        self._condition.notify_all()
                    return
                time.sleep(delay)
                continue
            failures = 0
            outage.succeeded()
            with self._condition:
                del self._pending[: len(batch)]
                self._oldest = time.monotonic()
                self._committed += len(batch)
                self._condition.notify_all()
