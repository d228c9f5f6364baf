"""Rows the SCP writes beside the instances, kept in a journal while the database is away.

During a database outage the instances are safe (the spool, then the recorder's group commit);
what an association's handlers write beside them was only logged until 2026-12-07, and lost: the
refusal a series waits for and its audit row (so a series with an instance refused during the
outage was completed, and synthesized, with the gap), a rejected association's security alert,
an association's own row and its audit row. Each is now an entry: written at once when the
database answers, otherwise kept in a journal beside the spool (one small JSON file, written to a
temporary name, fsynced and renamed into place) and written, in the order it happened and with the
times it happened, as soon as the database answers again. A crash in between loses nothing:
start-up writes what a process that is gone left (``adopt``).

An entry is a dict of JSON values:

- ``at``: when it happened (ISO 8601, UTC);
- ``audit``: the audit row (``action``, ``outcome``, ``actor``, ``study_uid``, ``series_uid``,
  ``detail``);
- ``refusal`` (optional): ``sop_uid``, ``series_uid``, ``status``, ``reason``: the instance its
  series waits for (``ingest.record_refusal``), unless the instance was stored after it;
- ``association`` (optional): the association's row: updated when it has an ``id``; when the
  database was away at its start, found by (``started_at``, ``peer_address``, ``calling_ae``) or
  inserted with them and ``called_ae``, so that a refusal made on it and its end share one row.
  With ``outcome``, ``stored``, ``refused``: it ended at the entry's ``at`` (without: a refusal's
  entry, the association still open). Its id goes into the audit row's ``association_id``.
  ``instances`` (optional): the SOP Instance UIDs stored on it while its row could not be written;
  their rows, recorded by then (the journal writes such an entry only after the recorder's rows,
  ``Journal.rows_first``), get its id, unless another association's is already theirs.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit import event as audit_event
from dicom_node.db import PassErrors, cannot_reach, driver_message
from dicom_node.ingest import record_refusal
from dicom_node.models import Association, Instance, as_utc, utcnow
from dicom_node.recovery import process_alive
from dicom_node.spool import fsync_dir

log = logging.getLogger(__name__)

FOLDER = ".deferred"  # under spool_dir: a leading dot, so no spool walk (three UID levels) takes it for a study
RECORDER_WAIT_SECONDS = 10.0  # how long writing the journal waits for the recorder's rows in one pass
BAD_SUFFIX = ".bad"  # an entry the database refused for a reason other than an outage: kept for a human


def make_entry(action: str, outcome: str, actor: str, *, study_uid: str | None = None, series_uid: str | None = None,
               **detail: Any) -> dict[str, Any]:
    """An entry with its audit row, happening now (``audit.event``'s fields); the caller adds a
    ``refusal`` or ``association`` to write in the same transaction."""
    return {"at": utcnow().isoformat(), "audit": {"action": action, "outcome": outcome, "actor": actor, "study_uid": study_uid,
                                                  "series_uid": series_uid, "detail": detail}}


def apply_entry(session: Session, entry: dict[str, Any]) -> None:
    """Write one entry's rows in ``session`` (the caller's transaction: all of them or none)."""
    at = as_utc(datetime.fromisoformat(entry["at"]))
    audit = entry["audit"]
    detail = dict(audit.get("detail") or {})
    association = entry.get("association")
    if association is not None:
        row = _association_row(session, association)
        if "outcome" in association:  # its end
            row.ended_at, row.outcome = at, association["outcome"]
            row.instances_stored, row.instances_refused = association["stored"], association["refused"]
        detail["association_id"] = row.id
        stored_on_it = list(association.get("instances") or [])
        for start in range(0, len(stored_on_it), 500):  # bound the statement's parameters
            session.execute(update(Instance).where(Instance.sop_instance_uid.in_(stored_on_it[start : start + 500]),
                                                   Instance.association_id.is_(None)).values(association_id=row.id))
    refusal = entry.get("refusal")
    if refusal is not None:
        stored = session.scalar(select(Instance.received_at).where(Instance.sop_instance_uid == refusal["sop_uid"]))
        if stored is None or as_utc(stored) < at:  # stored since (sent again, mended): its series waits for nothing
            record_refusal(session, refusal["sop_uid"], refusal["series_uid"], refusal["status"], refusal["reason"], at)
    row = audit_event(audit["action"], audit["outcome"], audit["actor"], study_uid=audit.get("study_uid"),
                      series_uid=audit.get("series_uid"), job_id=audit.get("job_id"), **detail)
    row.at = at  # when it happened, not when it is written
    session.add(row)


def write_entry(sessions: sessionmaker[Session], entry: dict[str, Any]) -> None:
    """``apply_entry`` in a transaction of its own. A duplicate key is tried once more: another
    process (a spool shared by hosts) wrote the same refusal at the same moment, a race, not an
    entry the database refuses."""
    try:
        with sessions.begin() as session:
            apply_entry(session, entry)
    except IntegrityError:
        with sessions.begin() as session:
            apply_entry(session, entry)


def _association_row(session: Session, association: dict[str, Any]) -> Association:
    """The row of the association an entry names: by its id, or, when the database was away at its
    start, the one an earlier entry of it inserted (the same start, peer and calling AE), or a new
    one (open until its end's entry)."""
    if association.get("id") is not None:
        row = session.get(Association, association["id"])
        if row is not None:
            return row
    started_at = as_utc(datetime.fromisoformat(association["started_at"]))
    row = session.scalar(select(Association).where(Association.started_at == started_at,
                                                   Association.peer_address == association["peer_address"],
                                                   Association.calling_ae == association["calling_ae"]).limit(1))
    if row is None:
        row = Association(calling_ae=association["calling_ae"], called_ae=association["called_ae"], peer_address=association["peer_address"],
                          started_at=started_at, outcome="open")
        session.add(row)
        session.flush()
    return row


def journal_counts(spool_dir: Path) -> tuple[int, int]:
    """(entries waiting for the database, entries set aside for a human) in a spool's journal, all
    processes' (the admin API's /health)."""
    folder = Path(spool_dir) / FOLDER
    if not folder.is_dir():
        return 0, 0
    names = [path.name for path in folder.iterdir() if not path.name.startswith(".")]
    return sum(name.endswith(".json") for name in names), sum(name.endswith(".json" + BAD_SUFFIX) for name in names)


def listed(spool_dir: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every entry in a spool's journal, waiting and set aside, oldest first, with what it holds
    (None: unreadable). ``mr2ct spool journal``."""
    folder = Path(spool_dir) / FOLDER
    if not folder.is_dir():
        return []
    found: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or not path.name.endswith((".json", ".json" + BAD_SUFFIX)):
            continue
        try:
            found.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            found.append((path, None))
    return found


def entry_host(name: str) -> str | None:
    """The host whose process kept the entry file ``name`` (``<ns>-<host>-<pid>-<random>.json``,
    a host name may hold dashes; ``.bad`` allowed); None for a name not of that form."""
    if name.endswith(BAD_SUFFIX):
        name = name[:-len(BAD_SUFFIX)]
    parts = name[:-len(".json")].split("-") if name.endswith(".json") else []
    return "-".join(parts[1:-2]) if len(parts) >= 4 else None


def retry_set_aside(spool_dir: Path, sessions: sessionmaker[Session]) -> tuple[int, list[tuple[str, str]]]:
    """Write the entries set aside (the database refused them once, not for an outage: mended
    since, say a migration run), one transaction each; each written is removed. (How many written,
    [(file, why not)] for the others, which stay.)"""
    return _write_listed([(path, entry) for path, entry in listed(spool_dir) if path.name.endswith(BAD_SUFFIX)], sessions)


def take_over_host(spool_dir: Path, sessions: sessionmaker[Session], host: str) -> tuple[int, list[tuple[str, str]]]:
    """Write the waiting entries a host kept that will not write them itself: one retired, or
    renamed, that shared this spool_dir (a process's own start-up takes over only its own host's).
    The caller vouches that no process of ``host`` runs; this host's are refused (start-up adopts
    them, and a running process's are its own to write). Oldest first, one transaction each."""
    if host == socket.gethostname():
        raise ValueError(f"{host} is this host: its entries are taken over by the node's own start-up")
    return _write_listed([(path, entry) for path, entry in listed(spool_dir)
                          if not path.name.endswith(BAD_SUFFIX) and entry_host(path.name) == host], sessions)


def _write_listed(found: list[tuple[Path, dict[str, Any] | None]], sessions: sessionmaker[Session]) -> tuple[int, list[tuple[str, str]]]:
    """Write ``found`` (``listed``'s pairs) in order, one transaction each, removing each written.
    (How many written, [(file, why not)] for the others, which stay.)"""
    written, failed = 0, []
    for path, entry in found:
        if entry is None:
            failed.append((path.name, "unreadable"))
            continue
        try:
            write_entry(sessions, entry)
        except (SQLAlchemyError, KeyError, ValueError, TypeError) as exc:
            failed.append((path.name, driver_message(exc) if isinstance(exc, SQLAlchemyError) else f"{type(exc).__name__}: {exc}"))
            continue
        path.unlink(missing_ok=True)
        written += 1
    return written, failed


class Journal:
    """The entries of one process: written now when the database answers, kept until it does.

    Its files are ``<spool_dir>/.deferred/<time ns>-<host>-<pid>-<random>.json``: a process writes
    only its own (others may share the spool), and takes over those of a process of this host that
    is gone at its start (``adopt``).
    """

    def __init__(self, spool_dir: Path, sessions: sessionmaker[Session]) -> None:
        self.folder = Path(spool_dir).resolve() / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sessions = sessions
        self.owner = f"{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        self._kept: dict[Path, str | None] = {}  # this process's entries not written yet: file -> the series a refusal holds
        # the recorder's flush (the SCP sets it): an association's entry that links its instances is
        # written only once their rows are (a wait of at most the given seconds; False: not yet)
        self.rows_first: Callable[[float], bool] | None = None

    # -- the handlers' side ---------------------------------------------------------------
    def record(self, entry: dict[str, Any], what: str, rows_recorded: bool = True) -> bool:
        """Write ``entry`` now; when the database cannot be reached, keep it for later. True when
        written now. ``what`` names it in the log (no patient identifiers). ``rows_recorded``
        False: rows the entry refers to (an association's instances) are not all recorded yet, so it
        is kept and written after them."""
        refused: str | None = None
        if rows_recorded and not self.pending():  # entries kept before this one are written first: the order holds
            try:
                write_entry(self.sessions, entry)
                return True
            except SQLAlchemyError as exc:
                if not cannot_reach(exc):  # a defect: kept for a human (`mr2ct spool journal --retry` once mended)
                    refused = driver_message(exc)
        try:
            self.keep(entry, set_aside=refused is not None)
        except (OSError, TypeError, ValueError) as exc:  # the spool's disk full or failing as well: said, and the handler goes on
            log.error("%s neither recorded nor kept (the database away, the journal not writable: %s)", what, exc)
            return False
        if refused is not None:
            log.error("%s not recorded, set aside in the journal: %s", what, refused)
            return False
        waiting = self.pending()
        if waiting == 1 or waiting % 100 == 0:  # a line when the journal begins to fill, then one per hundred
            log.warning("%s kept in the journal until the database answers (%d waiting)", what, waiting)
        return False

    def keep(self, entry: dict[str, Any], set_aside: bool = False) -> Path:
        """Write ``entry`` durably to the journal: a temporary name, fsync, rename, fsync of the folder.
        ``set_aside``: straight to the entries a human writes (``retry_set_aside``), not this process's."""
        name = f"{time.time_ns():020d}-{self.owner}-{secrets.token_hex(4)}.json" + (BAD_SUFFIX if set_aside else "")
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        text = json.dumps(entry, separators=(",", ":"))
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.folder)
        if not set_aside:
            with self._lock:
                self._kept[final] = (entry.get("refusal") or {}).get("series_uid")
        return final

    def pending(self) -> int:
        with self._lock:
            return len(self._kept)

    def pending_series(self) -> set[str]:
        """Series a kept refusal will hold: not to be completed before it is written."""
        with self._lock:
            return {uid for uid in self._kept.values() if uid}

    # -- writing what was kept --------------------------------------------------------------
    def adopt(self) -> int:
        """Take over the entries of processes of this host that are gone (a crash, a kill) and
        remove their temporaries (never renamed into place, so never whole). How many adopted."""
        host = socket.gethostname()
        adopted = elsewhere = 0
        for path in sorted(self.folder.iterdir()):
            temporary = path.name.startswith(".") and path.name.endswith(".tmp")
            name = path.name[1:-len(".tmp")] if temporary else path.name
            if temporary and name.endswith(BAD_SUFFIX):  # one being set aside when the process died
                name = name[:-len(BAD_SUFFIX)]
            if not name.endswith(".json"):
                continue
            kept_by = entry_host(name)
            if kept_by is None:
                continue
            pid = name[:-len(".json")].split("-")[-2]
            mine = kept_by == host and pid == str(os.getpid())
            if not mine and (kept_by != host or not pid.isdigit() or process_alive(int(pid))):
                elsewhere += kept_by != host and not temporary
                continue  # another host's, or a running process's: theirs to write
            if temporary:
                path.unlink(missing_ok=True)
                continue
            try:
                series = (json.loads(path.read_text(encoding="utf-8")).get("refusal") or {}).get("series_uid")
            except (OSError, ValueError) as exc:
                log.error("journal entry unreadable, set aside path=%s: %s", path.name, exc)
                path.rename(path.with_name(path.name + BAD_SUFFIX))
                continue
            with self._lock:
                self._kept[path] = series
            adopted += not mine
        if adopted:
            log.info("journal: %d entr%s left by a process that is gone taken over", adopted, "y" if adopted == 1 else "ies")
        if elsewhere:  # a spool_dir shared by hosts: the SCP on that host writes them (one retired or renamed since: nobody does)
            log.warning("journal: %d entr%s of other hosts in %s left to them (a host retired: mr2ct spool journal --take-over HOST)",
                        elsewhere, "y" if elsewhere == 1 else "ies", self.folder)
        return adopted

    def write_kept(self) -> int:
        """Write the kept entries in the order they happened, one transaction each; stops at the
        first the database cannot take for an outage (raised), sets aside one it refuses for
        another reason. How many were written."""
        with self._lock:
            kept = sorted(self._kept, key=lambda path: path.name)
        written = 0
        rows_recorded = self.rows_first is None
        for path in kept:
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
                if not rows_recorded and (entry.get("association") or {}).get("instances"):
                    with self.sessions() as session:  # the database away: raised here, not waited for below
                        session.execute(select(1))
                    rows_recorded = self.rows_first(RECORDER_WAIT_SECONDS)  # type: ignore[misc]
                    if not rows_recorded:  # the recorder still waits for the database: this entry and those after, next pass
                        break
                write_entry(self.sessions, entry)
            except FileNotFoundError:
                pass  # removed by hand: nothing left to write
            except SQLAlchemyError as exc:
                if cannot_reach(exc):
                    raise
                log.error("journal entry not recorded, set aside path=%s: %s", path.name, driver_message(exc))
                path.rename(path.with_name(path.name + BAD_SUFFIX))
            except (OSError, ValueError, KeyError, TypeError) as exc:  # not an entry this code can write: never blocks the rest
                log.error("journal entry unreadable, set aside path=%s: %s", path.name, exc)
                path.rename(path.with_name(path.name + BAD_SUFFIX))
            else:
                path.unlink(missing_ok=True)
                written += 1
            with self._lock:
                self._kept.pop(path, None)
        if written:
            log.info("journal: %d entr%s written to the database", written, "y" if written == 1 else "ies")
        return written

    def loop(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Write what was kept as soon as the database answers (a thread of the SCP's process)."""
        errors = PassErrors(log, "the journal of kept rows", "writing the journal's entries failed")
        while not stop.wait(min(max(poll_seconds, 0.5), 5.0)):  # entries are rare: no busy loop, no minute's wait
            if self.pending():
                errors.attempt(self.write_kept)
