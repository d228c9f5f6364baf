"""Start-up recovery: the spool is the truth. Files the database does not know are recorded
(and so grouped and synthesized); half-written temporaries are removed; jobs a dead process
on this host was running go back to the queue."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.ingest import validate
from dicom_node.models import QUEUED_AGAIN, Instance, Job, utcnow
from dicom_node.recorder import SpooledInstance, hold_unrecorded, record_sorting_out, remove_superseded
from dicom_node.spool import PURGE_SUFFIX, Spool
from synthesis.errors import InvalidInstance

log = logging.getLogger(__name__)

RECOVERY_BATCH = 500


def recover_spool(spool: Spool, sessions: sessionmaker[Session]) -> dict[str, int]:
    removed = 0
    for tmp in spool.stray_temporaries():
        tmp.unlink(missing_ok=True)
        removed += 1
    restored = 0
    for aside in spool.interrupted_purges():  # ".<sop>.dcm.purge": retention was deleting it when the process died
        final = aside.with_name(aside.name[1:-len(PURGE_SUFFIX)])
        if final.exists():  # a re-send is in place: that one stays
            aside.unlink(missing_ok=True)
            continue
        os.replace(aside, final)  # back where it was; retention deletes it again when it is due
        with sessions.begin() as session:
            session.execute(update(Instance).where(Instance.path == str(final)).values(purged_at=None))
        restored += 1
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)).all())
    found: list[tuple[int, SpooledInstance]] = []  # (file modified, ns; the instance)
    unreadable = superseded = 0
    for path in spool.instances():
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path)
            info = validate(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            if Path(spool.path_for(info.study_uid, info.series_uid, info.sop_instance_uid)) != path:
                raise InvalidInstance("file name does not match its UIDs")
        except Exception as exc:  # keep the file for a human; never synthesize it
            unreadable += 1
            log.warning("spool file not recoverable path=%s reason=%s", path.name, exc)
            continue
        with sessions() as session:  # a file the database does not know: rare, one look each
            row = session.execute(select(Instance.path, Instance.received_at)
                                  .where(Instance.sop_instance_uid == info.sop_instance_uid)).first()
        # The instance is recorded under another series or study: this file is the copy an arrival
        # there replaced (a crash came before its deletion), unless it was written after that
        # arrival (the move itself is what the crash left unrecorded).
        if row is not None and remove_superseded(path, Path(row.path), row.received_at):
            superseded += 1
            continue
        stat = path.stat()
        found.append((stat.st_mtime_ns, SpooledInstance(info, path, stat.st_size, str(ds.file_meta.TransferSyntaxUID), "recovered", None, utcnow())))
    # oldest first: of two unrecorded copies of one instance (under two series), the later arrival wins
    found_in_order = [item for _, item in sorted(found, key=lambda pair: pair[0])]
    refused = 0
    for start in range(0, len(found_in_order), RECOVERY_BATCH):  # a transaction per batch, not per file
        for item, reason in record_sorting_out(sessions, found_in_order[start : start + RECOVERY_BATCH]):
            hold_unrecorded(sessions, item, reason, recovered=True)  # kept in the spool for a human, its series held; start-up goes on
            refused += 1
    recovered = len(found) - refused
    counts = {"recovered": recovered, "temporaries_removed": removed, "unrecoverable": unreadable, "purges_undone": restored,
              "superseded_removed": superseded, "not_recorded": refused}
    if recovered or removed or unreadable or restored or superseded or refused:
        audit.record(sessions, "spool-recovery", "warning" if unreadable or refused else "success", "mr2ct start-up", **counts)
        log.info("spool recovery recovered=%d temporaries_removed=%d unrecoverable=%d purges_undone=%d superseded_removed=%d "
                 "not_recorded=%d", recovered, removed, unreadable, restored, superseded, refused)
    return counts


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` of this host exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_orphaned_jobs(sessions: sessionmaker[Session], current_worker: str) -> int:
    """Jobs 'running' under a process of this host that no longer exists died with it: queue them
    again at once (other hosts' jobs come back when their lease runs out)."""
    host = socket.gethostname()
    with sessions.begin() as session:
        running = session.execute(select(Job.id, Job.worker).where(Job.state == "running", Job.worker.like(f"{host}:%"))).all()
        pids = {job_id: worker.rpartition(":")[2] for job_id, worker in running if worker != current_worker}
        dead = [job_id for job_id, pid in pids.items() if pid.isdigit() and not process_alive(int(pid))]
        count = session.execute(update(Job).where(Job.id.in_(dead), Job.state == "running").values(**QUEUED_AGAIN)).rowcount if dead else 0
    if count:
        audit.record(sessions, "job-requeued", "warning", "mr2ct start-up", jobs=count)
        log.info("requeued %d job(s) left running by a process that died", count)
    return int(count or 0)
