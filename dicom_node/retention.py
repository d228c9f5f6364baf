"""Spool retention: originals the node no longer needs are deleted from the spool after
``spool_retention_hours``, so the spool does not grow until the disk is full and C-STORE answers
0xA700. The node is not an archive: the PACS keeps the originals (the scanner sends them there,
or the node routes them there).

An original is deleted only when all of these hold:

- it arrived more than ``spool_retention_hours`` ago (and the file in the spool is that old:
  a re-send that arrived since is kept);
- its series is no longer receiving, and its newest job is done (or the selection rules ignored
  the series): a queued, running, failed or cancelled job keeps the originals, for its retry;
- or, with ``spool_failed_retention_hours``, its series' newest job failed or was cancelled that
  long ago and it arrived that long ago: such a series is kept for its retry that long, then it
  goes too (a site where many series fail, or are cancelled, would otherwise fill its spool); a
  retry then says to send the series again. A series set aside because the SCP refused an
  instance of it waits for that instance as a failed one waits for its retry, and goes by the
  same rule;
- when the node routes (``forward_originals``), it reached the destination: one waiting for a
  retry, or given up, is kept; with ``forward_commitment``, the destination committed it too (its
  storage commitment report said so): one routed but not committed yet, or reported failed, is kept.

A file is first renamed aside (``.<name>.purge``), which takes whatever file the path holds at
that moment atomically; a file written there after the cutoff (a re-send racing the purge) is
linked back, never lost. Start-up recovery puts back a renamed file whose deletion a crash
interrupted when its path is empty. The row stays, with ``purged_at``; the audit trail gets one
``spool-purged`` event per round. A job asked for a purged series fails with the reason, and a
re-send of the series makes it whole again. A series is held (``lock_series``) from the check
that its rows are still due to the mark, as POST /jobs/{id}/retry holds it: a retry that comes
while a round runs either keeps the originals or is refused with the reason, never both
accepted and then left without them. Only files where the spool keeps them are deleted
(``<spool_dir>/<study>/<series>/<sop>.dcm`` for the row's own SOP Instance UID): a row that names
any other path (the spool moved, a database edited by hand) is left alone and counted.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Union

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.db import PassErrors
from dicom_node.models import Instance, Job, RefusedInstance, Series, utcnow
from dicom_node.spool import PURGE_SUFFIX, Spool, fsync_dir
from synthesis.errors import InvalidInstance

log = logging.getLogger(__name__)

SPOOL_PURGED = "spool-purged"
RETRYABLE = ("failed", "cancelled")  # a job left so, kept for a retry (spool_failed_retention_hours)
BATCH = 2000
CHECK_SECONDS = 60.0


def purged_reason(purged: int, of: int) -> str:
    """Why a series whose originals retention deleted cannot be synthesized (job error, API 409)."""
    return (f"{purged} of the series' {of} originals were deleted from the spool by spool retention: send the series again, "
            "or, where Orthanc holds the series, ask for it from there (POST /synthesize with its series_uid)")


def _remove(path: Path, cutoff: datetime) -> int | None:
    """Delete ``path`` if the file there was written before ``cutoff``; its size, or None if kept."""
    aside = path.with_name(f".{path.name}{PURGE_SUFFIX}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return 0  # gone already (removed by hand): nothing to free, the row is marked all the same
    status = os.stat(aside)
    if status.st_mtime >= cutoff.timestamp():  # a re-send landed after the cutoff: it stays
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # a newer one still arrived meanwhile: that one stays
        os.unlink(aside)
        return None
    os.unlink(aside)
    return status.st_size


Routing = Union[bool, Literal["committed"]]
"""What retention waits for of a routed original: nothing (False: the node does not route), its
arrival at the destination (True), or the destination's storage commitment too ("committed")."""


def routing_rule(forward_originals: bool, forward_commitment: bool) -> Routing:
    return "committed" if forward_originals and forward_commitment else forward_originals


def _held(routing: Routing) -> Select[Any]:
    """The rows of the originals still in the spool whose series is no longer arriving (and, when
    routing, that reached the destination, committed there when that is asked): what either rule may delete."""
    query = (select(Instance.sop_instance_uid, Instance.path, Instance.series_instance_uid, Instance.size_bytes, Series.study_instance_uid)
             .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
             .where(Instance.purged_at.is_(None), Series.state != "receiving"))
    if routing == "committed":
        return query.where(Instance.forwarded_at.is_not(None), Instance.forward_committed_at.is_not(None))
    return query.where(Instance.forwarded_at.is_not(None)) if routing else query


def _newest_job(column: Any) -> Any:
    return (select(column).where(Job.series_instance_uid == Series.series_instance_uid)
            .order_by(Job.id.desc()).limit(1).correlate(Series).scalar_subquery())


def _no_job() -> Any:
    return ~select(Job.id).where(Job.series_instance_uid == Series.series_instance_uid).correlate(Series).exists()


def _waits_for_refused() -> Any:
    """The series is set aside until instances of it the SCP refused arrive (ingest.mark_stable)."""
    return select(RefusedInstance.sop_instance_uid).where(
        RefusedInstance.series_instance_uid == Series.series_instance_uid).correlate(Series).exists()


def _due(cutoff: datetime, routing: Routing) -> Select[Any]:
    """The rows of the originals due for deletion at ``cutoff``: their series done or ignored (not
    one set aside for a refused instance: it waits for that instance, as a failed series for its retry)."""
    return _held(routing).where(Instance.received_at < cutoff,
                                or_(_newest_job(Job.state) == "done", and_(Series.state == "ignored", _no_job(), ~_waits_for_refused())))


def _due_failed(cutoff: datetime, routing: Routing) -> Select[Any]:
    """The rows of the originals due at ``cutoff`` whose series' newest job failed, or was
    cancelled, before it, or that arrived before it in a series set aside for a refused instance."""
    failed = and_(_newest_job(Job.state).in_(RETRYABLE), _newest_job(func.coalesce(Job.finished_at, Job.created_at)) < cutoff)
    return _held(routing).where(Instance.received_at < cutoff,
                                or_(failed, and_(Series.state == "ignored", _no_job(), _waits_for_refused())))


def _rules(now: datetime, retention: timedelta | None, failed_retention: timedelta | None,
           routing: Routing) -> list[tuple[str, Select[Any], datetime]]:
    """Each rule's name, rows and cutoff (a file written after its cutoff is kept). The rules
    never share a row: a series' newest job is done or failed."""
    rules = []
    if retention:
        rules.append(("done", _due(now - retention, routing), now - retention))
    if failed_retention:
        rules.append(("failed", _due_failed(now - failed_retention, routing), now - failed_retention))
    return rules


def due_for_purge(sessions: sessionmaker[Session], retention: timedelta | None, routing: Routing, now: datetime | None = None,
                  failed_retention: timedelta | None = None) -> dict[str, int]:
    """What a round would delete now, deleting nothing (``mr2ct spool purge --dry-run``)."""
    totals = {"instances": 0, "series": 0, "bytes": 0}
    with sessions() as session:
        for _, query, _ in _rules(now or utcnow(), retention, failed_retention, routing):
            due = query.subquery()
            instances, series, size = session.execute(select(
                func.count(), func.count(func.distinct(due.c.series_instance_uid)), func.coalesce(func.sum(due.c.size_bytes), 0))).one()
            totals["instances"] += instances
            totals["series"] += series
            totals["bytes"] += int(size)
    return totals


def spool_usage(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Originals the spool holds (recorded, not deleted) and their bytes; those deleted by retention.
    Two queries on the (purged_at, received_at) index, not one pass over every row ever received
    (/metrics asks at every scrape)."""
    with sessions() as session:
        held, size = session.execute(select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
                                     .where(Instance.purged_at.is_(None))).one()
        purged = session.scalar(select(func.count()).select_from(Instance).where(Instance.purged_at.is_not(None)))
    return {"instances": held, "bytes": int(size), "purged_instances": purged}


def _in_spool(spool: Spool, row: Any) -> bool:
    """Whether the row names the very path the spool gives its instance's file (Spool.path_for,
    which validates the UIDs and keeps every path inside the spool)."""
    try:
        return Path(row.path) == spool.path_for(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
    except InvalidInstance:
        return False


def purge_spool(sessions: sessionmaker[Session], spool_dir: Path, retention: timedelta | None, routing: Routing, now: datetime | None = None,
                actor: str = "mr2ct spool retention", failed_retention: timedelta | None = None) -> dict[str, int]:
    """One round: delete the originals that are due (see the module's doc); returns the counts
    (``failed_instances``: how many of them were a failed or cancelled series')."""
    spool = Spool(spool_dir)
    now = now or utcnow()
    counts = {"instances": 0, "series": 0, "bytes_freed": 0, "kept_resent": 0, "outside_spool": 0, "failed_instances": 0}
    series_done: set[str] = set()
    for rule, query, cutoff in _rules(now, retention, failed_retention, routing):
        purged = _purge_rows(sessions, spool, query, cutoff, now, counts, series_done)
        counts["instances"] += purged
        if rule == "failed":
            counts["failed_instances"] = purged
    counts["series"] = len(series_done)
    if counts["outside_spool"]:
        log.warning("spool retention left %d originals alone: their recorded paths are not under spool_dir %s (was it moved?)",
                    counts["outside_spool"], spool.root)
    if counts["instances"] or counts["kept_resent"] or counts["outside_spool"]:
        hours = {"retention_hours": retention.total_seconds() / 3600 if retention else 0}
        if failed_retention:
            hours["failed_retention_hours"] = failed_retention.total_seconds() / 3600
        audit.record(sessions, SPOOL_PURGED, "success", actor, **hours, **counts)
        log.info("spool purged instances=%d series=%d mib_freed=%.1f kept_resent=%d failed=%d", counts["instances"], counts["series"],
                 counts["bytes_freed"] / 2**20, counts["kept_resent"], counts["failed_instances"])
    return counts


def lock_series(session: Session, series_uid: str) -> None:
    """Hold the series for the rest of ``session``'s transaction: its row lock on PostgreSQL, the
    database's write lock on SQLite (a write is the first statement, so reads after it see every
    commit before it). Retention's check-delete-mark of a series and a retry of one of its jobs
    (POST /jobs/{id}/retry) each take it, so one of them sees what the other did: a retry never
    gets a job whose originals the purge then deletes, and a purge never deletes what a retry
    just asked for."""
    session.execute(update(Series).where(Series.series_instance_uid == series_uid).values(state=Series.state))


def _purge_rows(sessions: sessionmaker[Session], spool: Spool, query: Select[Any], cutoff: datetime, now: datetime,
                counts: dict[str, int], series_done: set[str]) -> int:
    """Delete the files of one rule's rows, batch by batch and series by series, and mark their
    rows; how many were."""
    purged = 0
    while True:
        with sessions() as session:
            due = session.execute(query.order_by(Instance.received_at).limit(BATCH)).all()
        if not due:
            break
        by_series: dict[str, list[Any]] = {}
        for row in due:
            if _in_spool(spool, row):
                by_series.setdefault(row.series_instance_uid, []).append(row)
            else:
                counts["outside_spool"] += 1
        removed = 0
        for series_uid, rows in by_series.items():
            marked = _purge_series(sessions, query, series_uid, rows, cutoff, now, counts)
            removed += marked
            purged += marked
            if marked:
                series_done.add(series_uid)
        if len(due) < BATCH or not removed:
            break
    return purged


def _purge_series(sessions: sessionmaker[Session], query: Select[Any], series_uid: str, rows: list[Any], cutoff: datetime,
                  now: datetime, counts: dict[str, int]) -> int:
    """Delete the files of ``rows`` (one series' rows of a batch) that are still due once the series
    is held (``lock_series``: a retry that came since the batch was read keeps them), and mark
    them, in one transaction; how many rows were marked."""
    folders: set[Path] = set()
    with sessions.begin() as session:
        lock_series(session, series_uid)
        still_due = set(session.scalars(select(query.where(Instance.series_instance_uid == series_uid).subquery().c.sop_instance_uid)))
        removed: list[str] = []
        for row in rows:
            if row.sop_instance_uid not in still_due:
                continue
            size = _remove(Path(row.path), cutoff)
            if size is None:
                counts["kept_resent"] += 1
                continue
            removed.append(row.sop_instance_uid)
            folders.add(Path(row.path).parent)
            counts["bytes_freed"] += size
        marked = 0
        for start in range(0, len(removed), 500):
            chunk = removed[start:start + 500]
            # received_at < cutoff again: a re-send recorded meanwhile is not marked purged
            marked += session.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk), Instance.purged_at.is_(None),
                                                             Instance.received_at < cutoff).values(purged_at=now)).rowcount
    for folder in folders:
        _drop_if_empty(folder)
    return marked


def _drop_if_empty(folder: Path) -> None:
    """The series folder, then its study folder, once they hold nothing (a write racing this makes
    the folder again: Spool.write does on FileNotFoundError)."""
    for level in (folder, folder.parent):
        try:
            os.rmdir(level)
        except OSError:
            return  # not empty (or gone)
        fsync_dir(level.parent)


def retention_loop(sessions: sessionmaker[Session], spool_dir: Path, retention_hours: float, failed_retention_hours: float, routing: Routing,
                   stop: threading.Event, check_seconds: float = CHECK_SECONDS) -> None:
    retention = timedelta(hours=retention_hours) if retention_hours else None
    failed_retention = timedelta(hours=failed_retention_hours) if failed_retention_hours else None
    shortest = min(r.total_seconds() for r in (retention, failed_retention) if r)
    errors = PassErrors(log, "spool retention", "spool retention round failed")
    while not stop.is_set():  # a database or disk hiccup: tried again next round, the node keeps serving
        errors.attempt(lambda: purge_spool(sessions, spool_dir, retention, routing, failed_retention=failed_retention))
        stop.wait(min(check_seconds, max(shortest / 4, 1.0)))
