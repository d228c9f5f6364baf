"""The journal of what the SCP writes beside the instances (refusals, associations, their audit
rows) while the database is away: kept on disk, written later in order, with the times they
happened; nothing lost by a crash in between."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.deferred import BAD_SUFFIX, Journal, make_entry
from dicom_node.ingest import ReceivedInstance
from dicom_node.models import Association, AuditEvent, Instance, RefusedInstance, as_utc, utcnow
from dicom_node.recorder import SpooledInstance, record_batch

MR = "1.2.840.10008.5.1.4.1.1.4"
SERIES = "1.2.3.4"


def _refused(sop: str, series: str = SERIES) -> dict:
    kept = make_entry("dicom-instance-refused", "failure", "SCANNER", series_uid=series, status="0xA900", sop_instance_uid=sop)
    kept["refusal"] = {"sop_uid": sop, "series_uid": series, "status": 0xA900, "reason": "Pixel Data is missing"}
    return kept


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _as_if_left_by(path: Path, pid: int) -> Path:
    """The journal file as a process ``pid`` of this host would have named it."""
    parts = path.name.split("-")
    moved = path.with_name("-".join([*parts[:-2], str(pid), parts[-1]]))
    path.rename(moved)
    return moved


def test_entries_kept_by_a_process_that_died_are_written_at_the_next_start_with_their_times(tmp_path: Path) -> None:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    dead = _dead_pid()
    first = Journal(tmp_path / "spool", sessions)
    refused = _refused("1.2.3.4.9")
    ended = make_entry("application-activity/association", "success", "SCANNER@127.0.0.1", association_outcome="released",
                  instances_stored=4, instances_refused=1, series=[SERIES])
    started = utcnow() - timedelta(seconds=30)
    ended["association"] = {"id": None, "calling_ae": "SCANNER", "called_ae": "MR2CT", "peer_address": "127.0.0.1:5000",
                            "started_at": started.isoformat(), "outcome": "released", "stored": 4, "refused": 1}
    rejected = make_entry("security-alert", "failure", "INTRUDER@127.0.0.1", reason="calling AE title not allowed from this host")
    files = [_as_if_left_by(first.keep(kept), dead) for kept in (refused, ended, rejected)]
    (first.folder / f".{files[0].stem}ff.json.tmp").write_text("{")  # a half-written one of the dead process: never whole
    assert first.pending_series() == {SERIES}

    later = Journal(tmp_path / "spool", sessions)  # the next start
    assert later.adopt() == 3 and later.pending_series() == {SERIES}
    assert later.write_kept() == 3
    assert later.pending() == 0 and later.pending_series() == set()
    assert sorted(p.name for p in later.folder.iterdir()) == []  # written, temporaries removed
    with sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [e.action for e in events] == ["dicom-instance-refused", "application-activity/association", "security-alert"]
        assert as_utc(events[0].at).isoformat() == refused["at"]  # when it happened, not when it was written
        hold = session.get(RefusedInstance, "1.2.3.4.9")
        assert hold is not None and hold.series_instance_uid == SERIES and hold.status == "0xA900"
        association = session.scalars(select(Association)).one()
        assert (association.calling_ae, association.outcome, association.instances_stored, association.instances_refused) == (
            "SCANNER", "released", 4, 1)
        assert as_utc(association.started_at) == started and association.ended_at is not None
        assert events[1].detail["association_id"] == association.id


def test_a_running_process_s_entries_are_left_to_it_and_another_host_s_are_named(tmp_path: Path, caplog) -> None:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    running = subprocess.Popen(["sleep", "30"])
    try:
        _as_if_left_by(journal.keep(_refused("1.2.3.4.1")), running.pid)
        foreign = journal.keep(_refused("1.2.3.4.2"))
        foreign.rename(foreign.with_name(foreign.name.replace(f"-{journal.owner}-", f"-other-host-{os.getpid()}-")))
        later = Journal(tmp_path / "spool", sessions)
        with caplog.at_level(logging.WARNING, logger="dicom_node.deferred"):
            assert later.adopt() == 0
        assert later.pending() == 0 and len(list(later.folder.iterdir())) == 2
        assert "1 entry of other hosts" in caplog.text
    finally:
        running.kill()
        running.wait()


def test_a_refusal_written_after_its_instance_was_stored_again_holds_nothing(tmp_path: Path) -> None:
    """Refused during the outage, sent again (mended) and stored before the journal is written: the
    audit row says it was refused, and its series waits for nothing."""
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    journal.keep(_refused("1.2.3.4.5"))
    journal.keep(_refused("1.2.3.4.6"))  # not sent again: its series waits for it
    info = ReceivedInstance(MR, "1.2.3.4.5", "1.2.3", SERIES, "MR", "T1", "axial", "patient")
    record_batch(sessions, [SpooledInstance(info, tmp_path / "5.dcm", 100, "1.2.840.10008.1.2.1", "SCANNER", None, utcnow())])
    assert journal.write_kept() == 2
    with sessions() as session:
        assert session.scalar(select(Instance.sop_instance_uid)) == "1.2.3.4.5"
        assert session.scalars(select(RefusedInstance.sop_instance_uid)).all() == ["1.2.3.4.6"]
        assert len(session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused")).all()) == 2


def test_an_association_s_row_written_late_links_its_instances_once_the_recorder_has_recorded_them(tmp_path: Path) -> None:
    """An association whose row could not be written at its start (the database away) names the
    instances stored on it; its entry waits for the recorder's rows (``rows_first``), then links
    them, leaving an instance another association's row already holds as it is."""
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    recorder_done = [False]
    journal.rows_first = lambda seconds: recorder_done[0]
    ended = make_entry("application-activity/association", "success", "SCANNER@127.0.0.1", association_outcome="released",
                       instances_stored=3, instances_refused=0, series=[SERIES])
    ended["association"] = {"id": None, "calling_ae": "SCANNER", "called_ae": "MR2CT", "peer_address": "127.0.0.1:5000",
                            "started_at": utcnow().isoformat(), "outcome": "released", "stored": 3, "refused": 0,
                            "instances": ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"]}
    assert journal.record(ended, "association", rows_recorded=False) is False  # its instances' rows not all in: kept
    assert journal.record(_refused("1.2.3.4.9"), "refusal") is False  # behind it
    assert journal.write_kept() == 0 and journal.pending() == 2  # the recorder not done: nothing written, the order kept
    with sessions.begin() as session:
        other = Association(calling_ae="OTHER", called_ae="MR2CT", peer_address="127.0.0.1:6000")
        session.add(other)
        session.flush()
        other_id = other.id

    def spooled(sop: str, association_id: int | None) -> SpooledInstance:
        info = ReceivedInstance(MR, sop, "1.2.3", SERIES, "MR", "T1", "axial", "patient")
        return SpooledInstance(info, tmp_path / f"{sop}.dcm", 100, "1.2.840.10008.1.2.1", "SCANNER", association_id, utcnow())

    record_batch(sessions, [spooled("1.2.3.4.1", None), spooled("1.2.3.4.2", None), spooled("1.2.3.4.3", other_id)])
    recorder_done[0] = True
    assert journal.write_kept() == 2 and journal.pending() == 0
    with sessions() as session:
        late = session.scalar(select(Association).where(Association.calling_ae == "SCANNER"))
        links = dict(session.execute(select(Instance.sop_instance_uid, Instance.association_id)).all())
    assert links == {"1.2.3.4.1": late.id, "1.2.3.4.2": late.id, "1.2.3.4.3": other_id}
    assert (late.instances_stored, late.outcome) == (3, "released")


def test_a_refusal_on_an_association_whose_row_is_not_written_yet_names_the_row_its_end_then_completes(tmp_path: Path) -> None:
    """A refusal made on an association that began while the database was away inserts its row
    (open), and the association's end, written later, finds that row: one row, which the refusal's
    audit row names."""
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    started = (utcnow() - timedelta(seconds=5)).isoformat()
    fields = {"id": None, "calling_ae": "SCANNER", "called_ae": "MR2CT", "peer_address": "127.0.0.1:5000", "started_at": started}
    refused = _refused("1.2.3.4.9")
    refused["association"] = dict(fields)
    other = _refused("1.2.3.4.8")  # another association from the same AE, begun at the same moment from another port
    other["association"] = fields | {"peer_address": "127.0.0.1:5001"}
    ended = make_entry("application-activity/association", "success", "SCANNER@127.0.0.1", association_outcome="released",
                       instances_stored=0, instances_refused=1, series=[SERIES])
    ended["association"] = fields | {"outcome": "released", "stored": 0, "refused": 1}
    assert journal.record(refused, "refusal") is True
    with sessions() as session:
        assert session.scalar(select(Association.outcome)) == "open"  # begun, not ended yet
    assert journal.record(other, "refusal") is True
    assert journal.record(ended, "association") is True
    with sessions() as session:
        rows = {row.peer_address: row for row in session.scalars(select(Association)).all()}
        refusals = {e.detail["sop_instance_uid"]: e.detail["association_id"]
                    for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused")).all()}
        closing = session.scalar(select(AuditEvent).where(AuditEvent.action == "application-activity/association"))
    assert set(rows) == {"127.0.0.1:5000", "127.0.0.1:5001"}
    first = rows["127.0.0.1:5000"]
    assert (first.outcome, first.instances_refused, as_utc(first.started_at).isoformat()) == ("released", 1, started)
    assert refusals == {"1.2.3.4.9": first.id, "1.2.3.4.8": rows["127.0.0.1:5001"].id}
    assert closing.detail["association_id"] == first.id


def test_record_keeps_entries_while_the_database_cannot_be_opened_and_writes_them_in_order_after(tmp_path: Path) -> None:
    """A real outage of a SQLite database: its folder moved away (opening it fails), then back."""
    home = tmp_path / "db"
    home.mkdir()
    engine_url = f"sqlite:///{home / 'db.sqlite'}"
    sessions = init_db(engine_url)
    journal = Journal(tmp_path / "spool", sessions)
    assert journal.record(_refused("1.2.3.4.1"), "refusal") is True  # the database answers: written now
    home.rename(tmp_path / "away")
    sessions.kw["bind"].dispose()  # the pooled connection closed: the next one must open the file
    assert journal.record(_refused("1.2.3.4.2"), "refusal") is False
    assert journal.record(_refused("1.2.3.4.3", series="1.2.3.5"), "refusal") is False
    assert journal.pending() == 2 and journal.pending_series() == {SERIES, "1.2.3.5"}
    with pytest.raises(Exception):
        journal.write_kept()  # still away: kept, in order
    assert journal.pending() == 2
    (tmp_path / "away").rename(home)
    assert journal.record(_refused("1.2.3.4.4"), "refusal") is False  # behind the kept ones, not before them
    assert journal.write_kept() == 3
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [r.detail["sop_instance_uid"] for r in rows] == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3", "1.2.3.4.4"]


def test_an_entry_the_database_refuses_for_another_reason_is_set_aside_not_retried(tmp_path: Path) -> None:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    broken = journal.keep({"at": utcnow().isoformat(), "audit": {"outcome": "failure"}})  # no action: not an audit row
    journal.keep(_refused("1.2.3.4.1"))
    assert journal.write_kept() == 1
    assert journal.pending() == 0
    assert broken.with_name(broken.name + BAD_SUFFIX).exists()
    assert json.loads(broken.with_name(broken.name + BAD_SUFFIX).read_text())["audit"]["outcome"] == "failure"



def test_with_the_database_away_and_the_journal_not_writable_the_handler_hears_false_not_an_exception(tmp_path: Path, caplog) -> None:
    home = tmp_path / "db"
    home.mkdir()
    sessions = init_db(f"sqlite:///{home / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)
    journal.folder.rmdir()
    journal.folder.write_text("not a folder")  # every write into it fails (root ignores permissions)
    home.rename(tmp_path / "away")
    sessions.kw["bind"].dispose()
    with caplog.at_level(logging.ERROR, logger="dicom_node.deferred"):
        assert journal.record(_refused("1.2.3.4.1"), "C-STORE refusal assoc=7") is False
    assert journal.pending() == 0
    assert "C-STORE refusal assoc=7 neither recorded nor kept" in caplog.text


def test_an_administrator_sees_the_journal_and_writes_what_was_set_aside_once_mended(tmp_path: Path) -> None:
    """`mr2ct spool journal` lists what waits and what was set aside (the database refused it, not
    for an outage); `--retry` writes the set-aside entries once the cause is mended; `spool status`
    says the journal is not empty."""
    import sys

    from sqlalchemy import text

    from tests.helpers import env_without_mr2ct

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:  # a defect's stand-in: the database refuses refusals for now
        session.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON refused_instances BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    journal = Journal(tmp_path / "spool", sessions)
    kept = journal.keep(_refused("1.2.3.4.1"))
    assert journal.write_kept() == 0 and kept.with_name(kept.name + BAD_SUFFIX).exists()
    env = env_without_mr2ct() | {"MR2CT_DATABASE_URL": str(sessions.kw["bind"].url), "MR2CT_SPOOL_DIR": str(tmp_path / "spool")}

    def mr2ct(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "spool", *args], capture_output=True, text=True, env=env, timeout=120)

    shown = mr2ct("journal")
    assert shown.returncode == 0 and "0 waiting for the database, 1 set aside" in shown.stdout, shown.stderr
    assert "set aside" in shown.stdout and "dicom-instance-refused + the refusal its series waits for" in shown.stdout
    assert "series=1.2.3.4" in shown.stdout
    assert "journal: 0 entries kept while the database was away still to write, 1 set aside" in mr2ct("status").stdout
    still = mr2ct("journal", "--retry")  # not mended yet: said, kept, a failing exit
    assert still.returncode == 1 and "not written" in still.stderr and kept.with_name(kept.name + BAD_SUFFIX).exists()
    with sessions.begin() as session:
        session.execute(text("DROP TRIGGER refuse"))
    mended = mr2ct("journal", "--retry")
    assert mended.returncode == 0 and "written 1 set-aside entry" in mended.stdout, mended.stderr
    assert list(journal.folder.iterdir()) == []
    with sessions() as session:
        assert session.scalars(select(RefusedInstance.sop_instance_uid)).all() == ["1.2.3.4.1"]
        assert session.scalars(select(AuditEvent.action)).all() == ["dicom-instance-refused"]


def test_an_administrator_takes_over_the_waiting_entries_of_a_retired_host_and_no_other_s(tmp_path: Path) -> None:
    """Hosts sharing a spool_dir write their own entries; one retired (or renamed) during an outage
    leaves its entries to no one. `mr2ct spool journal` names each entry's host, and `--take-over
    HOST` writes that host's waiting entries, oldest first, leaving the others; this host's are
    refused (its start-up takes them over)."""
    import socket
    import sys

    from tests.helpers import env_without_mr2ct

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    journal = Journal(tmp_path / "spool", sessions)

    def kept_by(host: str, sop: str) -> Path:
        path = journal.keep(_refused(sop))
        moved = path.with_name(path.name.replace(f"-{journal.owner}-", f"-{host}-4242-"))
        path.rename(moved)
        return moved

    retired = [kept_by("old-node-7", "1.2.3.4.1"), kept_by("old-node-7", "1.2.3.4.2")]
    other = kept_by("node-8", "1.2.3.4.3")
    env = env_without_mr2ct() | {"MR2CT_DATABASE_URL": str(sessions.kw["bind"].url), "MR2CT_SPOOL_DIR": str(tmp_path / "spool")}

    def mr2ct(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "spool", "journal", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    shown = mr2ct()
    assert shown.returncode == 0 and "3 waiting for the database" in shown.stdout, shown.stderr
    assert shown.stdout.count("host=old-node-7") == 2 and shown.stdout.count("host=node-8") == 1
    mine = mr2ct("--take-over", socket.gethostname())
    assert mine.returncode == 2 and "is this host" in mine.stderr, mine.stderr
    taken = mr2ct("--take-over", "old-node-7")
    assert taken.returncode == 0 and "written 2 waiting entries of old-node-7" in taken.stdout, taken.stderr
    assert not any(path.exists() for path in retired) and other.exists()
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [row.detail["sop_instance_uid"] for row in rows] == ["1.2.3.4.1", "1.2.3.4.2"]
        assert sorted(session.scalars(select(RefusedInstance.sop_instance_uid)).all()) == ["1.2.3.4.1", "1.2.3.4.2"]


def test_an_entry_the_database_refuses_at_once_is_set_aside_for_a_human_not_lost(tmp_path: Path, caplog) -> None:
    from sqlalchemy import text

    from dicom_node.deferred import journal_counts

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:  # a defect's stand-in (no outage): the database refuses audit rows
        session.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    journal = Journal(tmp_path / "spool", sessions)
    with caplog.at_level(logging.ERROR, logger="dicom_node.deferred"):
        assert journal.record(_refused("1.2.3.4.1"), "C-STORE refusal assoc=3") is False
    assert "C-STORE refusal assoc=3 not recorded, set aside in the journal" in caplog.text
    assert journal.pending() == 0 and journal_counts(tmp_path / "spool") == (0, 1)  # not this process's to retry: a human's
    assert journal.record(_refused("1.2.3.4.2"), "C-STORE refusal assoc=3") is False  # the next is tried at once, not held behind it
    assert journal_counts(tmp_path / "spool") == (0, 2)


def test_two_processes_writing_one_instance_s_refusal_at_the_same_moment_both_write_it(tmp_path: Path) -> None:
    """Two SCP processes refuse the same instance at the same moment (a scanner's re-send to
    another host): both insert the refusal its series waits for, and PostgreSQL refuses the second
    (duplicate key). A race, not an entry the database refuses: written, not set aside."""
    import threading

    from sqlalchemy.orm import sessionmaker

    from dicom_node.db import make_engine
    from dicom_node.deferred import journal_counts
    from dicom_node.local_stack import PostgresServer, free_port

    with PostgresServer(tmp_path / "pg", free_port()) as postgres:
        init_db(postgres.url)
        engines = [make_engine(postgres.url) for _ in range(2)]
        try:
            journals = [Journal(tmp_path / "spool", sessionmaker(engine, expire_on_commit=False)) for engine in engines]
            written: list[bool] = []
            for round_ in range(12):
                barrier = threading.Barrier(2)

                def refuse(n: int, sop: str = f"1.2.3.4.{round_}") -> None:
                    barrier.wait()
                    written.append(journals[n].record(_refused(sop), "refusal"))

                threads = [threading.Thread(target=refuse, args=(n,)) for n in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
            assert written == [True] * 24 and journal_counts(tmp_path / "spool") == (0, 0)
            with journals[0].sessions() as session:
                assert len(session.scalars(select(RefusedInstance.sop_instance_uid)).all()) == 12
                assert len(session.scalars(select(AuditEvent.id)).all()) == 24  # each process's refusal audited
        finally:
            for engine in engines:
                engine.dispose()
