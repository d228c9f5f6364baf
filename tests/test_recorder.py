"""Database rows follow the durable spool by group commit: none lost, re-sends counted once."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from dicom_node.db import init_db
from dicom_node.ingest import ReceivedInstance
from dicom_node.models import Instance, Series, utcnow
from dicom_node.recorder import Recorder, SpooledInstance

MR = "1.2.840.10008.5.1.4.1.1.4"


def _item(sop: str, series: str = "1.2.3.4") -> SpooledInstance:
    info = ReceivedInstance(MR, sop, "1.2.3", series, "MR", "T1", "axial", "patient")
    return SpooledInstance(info, Path(f"/spool/{sop}.dcm"), 100, "1.2.840.10008.1.2.1", "SCANNER", None, utcnow())


def test_flush_returns_once_every_submitted_row_is_committed_and_resends_count_once(tmp_path: Path) -> None:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    recorder = Recorder(sessions, window_seconds=30)  # a long window: only flush commits here
    try:
        for i in range(300):
            recorder.submit(_item(f"1.2.3.4.{i}"))
        recorder.submit(_item("1.2.3.4.7"))  # a re-send of an instance already waiting
        recorder.submit(_item("1.2.3.5.1", series="1.2.3.5"))
        assert recorder.flush(timeout=60)
        assert recorder.backlog == 0
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 301
            counts = dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
        assert counts == {"1.2.3.4": 300, "1.2.3.5": 1}
        recorder.submit(_item("1.2.3.4.0"))  # re-sent after it was committed: still one row
        assert recorder.flush(timeout=60)
        with sessions() as session:
            assert session.get(Series, "1.2.3.4").instance_count == 300
    finally:
        recorder.stop()


def test_rows_are_committed_within_the_window_without_a_flush(tmp_path: Path) -> None:
    """During a long association nothing calls flush: each row must still reach the database
    about a window after its instance (the stability monitor reads last_received_at from it)."""
    import time

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    recorder = Recorder(sessions, window_seconds=0.2)
    try:
        for i in range(3):
            recorder.submit(_item(f"1.2.3.4.{i}"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with sessions() as session:
                    if session.scalar(select(func.count()).select_from(Instance)) == i + 1:
                        break
                time.sleep(0.05)
            else:
                raise AssertionError(f"row {i} not committed without a flush")
    finally:
        recorder.stop()


def test_stop_commits_what_is_still_waiting(tmp_path: Path) -> None:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    recorder = Recorder(sessions, window_seconds=30)
    for i in range(20):
        recorder.submit(_item(f"1.2.3.4.{i}"))
    recorder.stop()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 20


def test_a_row_the_database_refuses_holds_back_no_other_and_its_series_waits_for_it(tmp_path: Path, caplog) -> None:
    """The database refuses one series' row and one instance's (here by triggers; on PostgreSQL a
    value too long for its column did it): every other row of the batch is recorded, the refused
    ones are audited and their series wait for them as for refused instances, and the log names no
    patient. Until 2026-12-07 the batch was retried for ever and every row after it waited."""
    import logging

    from sqlalchemy import text

    from dicom_node.models import AuditEvent, RefusedInstance

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:
        session.execute(text("CREATE TRIGGER refuse_series BEFORE INSERT ON series WHEN NEW.series_instance_uid = '1.2.3.9' "
                             "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        session.execute(text("CREATE TRIGGER refuse_instance BEFORE INSERT ON instances WHEN NEW.sop_instance_uid = '1.2.3.4.3' "
                             "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    recorder = Recorder(sessions, window_seconds=30)  # one batch, at the flush
    items = [_item(f"1.2.3.4.{i}") for i in range(1, 7)]
    items.insert(2, SpooledInstance(ReceivedInstance(MR, "1.2.3.9.1", "1.2.3", "1.2.3.9", "MR", "T1", "axial", "PAT-SECRET-42"),
                                    Path("/spool/x.dcm"), 100, "1.2.840.10008.1.2.1", "SCANNER", None, utcnow()))
    with caplog.at_level(logging.ERROR, logger="dicom_node.recorder"):
        for item in items:
            recorder.submit(item)
        assert recorder.flush(timeout=30)  # done with: recorded, or held for a human
        recorder.stop(timeout=5)
    assert recorder.backlog == 0
    with sessions() as session:
        recorded = session.scalars(select(Instance.sop_instance_uid).order_by(Instance.sop_instance_uid)).all()
        assert recorded == ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.4", "1.2.3.4.5", "1.2.3.4.6"]
        held = dict(session.execute(select(RefusedInstance.sop_instance_uid, RefusedInstance.series_instance_uid)).all())
        assert held == {"1.2.3.4.3": "1.2.3.4", "1.2.3.9.1": "1.2.3.9"}
        audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-not-recorded")).all()
        assert sorted(e.detail["sop_instance_uid"] for e in audited) == ["1.2.3.4.3", "1.2.3.9.1"]
        assert all("refused" in e.detail["reason"] for e in audited)
    assert caplog.text.count("instance spooled but not recorded") == 2
    assert "PAT-SECRET-42" not in caplog.text and "Traceback" not in caplog.text


def test_a_series_sent_again_has_its_headers_read_again_from_the_spool_and_keeps_them_where_a_file_cannot_be_read(
        tmp_path: Path, caplog) -> None:
    """What the selection judges (here the body part) is folded from each instance as it arrives; a
    re-send marks it stale and ``refresh_headers`` reads the spooled files again, in the order
    received. A file that cannot be read, or one spool retention deleted, leaves the answers as
    folded (nothing guessed) and still stale, for the next completion."""
    import pydicom

    from dicom_node.ingest import header_facts, refresh_headers
    from dicom_node.recorder import record_batch
    from training.phantom_dicom import write_mr_series

    made = write_mr_series(tmp_path / "mr", seed=5, slices=3, size=16, pixel_spacing=10.0)
    files = sorted(made.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")

    def received(path: Path) -> SpooledInstance:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        info = ReceivedInstance(MR, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "MR", "T1", "axial", "patient",
                                **header_facts([ds]))
        return SpooledInstance(info, Path(path), 100, "1.2.840.10008.1.2.1", "SCANNER", None, utcnow())

    def says(path: Path, part: str) -> None:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = part
        ds.save_as(path)

    def row() -> Series:
        with sessions() as session:
            return session.get(Series, made.series_uid)

    says(files[2], "NECK")
    record_batch(sessions, [received(path) for path in files])
    assert (row().body_part, row().headers_stale) == ("HEAD\\NECK", False)
    assert not refresh_headers(sessions, made.series_uid)  # nothing sent again: nothing read
    says(files[2], "HEAD")
    record_batch(sessions, [received(files[2])])  # sent again, corrected
    assert (row().body_part, row().headers_stale, row().instance_count) == ("HEAD\\NECK", True, 3)
    Path(files[1]).rename(tmp_path / "away.dcm")
    assert not refresh_headers(sessions, made.series_uid)
    assert (row().body_part, row().headers_stale) == ("HEAD\\NECK", True)
    assert "its headers not read again (FileNotFoundError" in caplog.text
    (tmp_path / "away.dcm").rename(files[1])
    with sessions.begin() as session:
        session.get(Instance, pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID).purged_at = utcnow()
    assert not refresh_headers(sessions, made.series_uid) and row().headers_stale
    with sessions.begin() as session:
        session.get(Instance, pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID).purged_at = None
    assert refresh_headers(sessions, made.series_uid)
    assert (row().body_part, row().headers_stale, row().contrast) == ("HEAD", False, "T1")


def test_start_up_recovery_goes_on_past_a_file_whose_row_the_database_refuses(tmp_path: Path) -> None:
    """Spooled files the database does not know are recorded at start-up; one whose row it refuses
    is kept in the spool and held (its series waits for it), and start-up goes on. Until 2026-12-07
    the error stopped the node's start."""
    import pydicom
    from sqlalchemy import text

    from dicom_node.models import RefusedInstance
    from dicom_node.recovery import recover_spool
    from dicom_node.spool import Spool
    from training.phantom_dicom import write_mr_series

    series = write_mr_series(tmp_path / "mr", seed=21, slices=3, size=16, pixel_spacing=8.0, slice_spacing=10.0)
    spool = Spool(tmp_path / "spool")
    sops = []
    for path in series.files:
        ds = pydicom.dcmread(path)
        sops.append(str(ds.SOPInstanceUID))
        spool.write(series.study_uid, series.series_uid, sops[-1], path.read_bytes())
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:
        session.execute(text(f"CREATE TRIGGER refuse BEFORE INSERT ON instances WHEN NEW.sop_instance_uid = '{sops[1]}' "
                             "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    counts = recover_spool(spool, sessions)
    assert (counts["recovered"], counts["not_recorded"]) == (2, 1)
    assert len(spool.instances()) == 3  # nothing deleted
    with sessions() as session:
        assert sorted(session.scalars(select(Instance.sop_instance_uid)).all()) == sorted([sops[0], sops[2]])
        assert session.scalars(select(RefusedInstance.sop_instance_uid)).all() == [sops[1]]
    # The next start finds the file again: still not recorded, still kept, but audited once (the
    # metric counts audit rows: one file must not add one at every start), and a hold an
    # administrator lifted meanwhile stays lifted.
    from dicom_node.ingest import lift_refusals
    from dicom_node.models import AuditEvent

    assert lift_refusals(sessions, series.series_uid) == 1
    for _ in range(2):
        again = recover_spool(spool, sessions)
        assert (again["recovered"], again["not_recorded"]) == (0, 1)
    assert len(spool.instances()) == 3
    with sessions() as session:
        audited = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "dicom-instance-not-recorded")).all()
        assert [detail["sop_instance_uid"] for detail in audited] == [sops[1]]
        assert session.scalars(select(RefusedInstance.sop_instance_uid)).all() == []


def test_two_processes_recording_a_new_series_at_the_same_moment_both_record_it(tmp_path: Path) -> None:
    """Two SCP processes (scale-out: a scanner's parallel associations behind a load balancer) take
    the first instances of one new series at the same moment, each a batch of one: both insert the
    series' row, and PostgreSQL refuses the second (duplicate key). That is a race, not a row the
    database refuses: the loser records its instance on the row the winner made. Until 2026-12-07
    night the loser held its instance as unrecordable, and the series with it (every round below)."""
    import threading

    from sqlalchemy.orm import sessionmaker

    from dicom_node.db import make_engine
    from dicom_node.local_stack import PostgresServer, free_port
    from dicom_node.recorder import record_sorting_out

    with PostgresServer(tmp_path / "pg", free_port()) as postgres:
        init_db(postgres.url)
        engines = [make_engine(postgres.url) for _ in range(2)]  # two processes' own engines and pools
        try:
            processes = [sessionmaker(engine, expire_on_commit=False) for engine in engines]
            refused: list[tuple[SpooledInstance, str]] = []
            for round_ in range(12):
                barrier = threading.Barrier(2)

                def take(n: int, series: str = f"1.2.3.{round_}") -> None:
                    item = _item(f"{series}.{n}", series=series)
                    barrier.wait()
                    refused.extend(record_sorting_out(processes[n], [item]))

                threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
            assert refused == []
            with processes[0]() as session:
                counts = dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
                assert counts == {f"1.2.3.{round_}": 2 for round_ in range(12)}
                assert session.scalar(select(func.count()).select_from(Instance)) == 24
        finally:
            for engine in engines:
                engine.dispose()


def test_two_processes_taking_two_series_in_opposite_orders_do_not_deadlock_and_both_are_counted(tmp_path: Path) -> None:
    """Two SCP processes each take instances of the same two series (a study's series spread over
    parallel associations behind a load balancer), one in the order A, B, the other B, A. Each
    batch locks its series' rows; in arrival order the two waited on each other in a circle, and
    PostgreSQL broke it after its deadlock_timeout (1 s) by failing one batch (40P01), to be
    recorded again: until 2026-12-08, 17 of 20 rounds, existing series or new. Now the series are
    locked in one order, and every batch goes through the first time, counted right."""
    import threading

    from sqlalchemy.orm import sessionmaker

    from dicom_node.db import make_engine, sqlstate
    from dicom_node.local_stack import PostgresServer, free_port
    from dicom_node.recorder import record_sorting_out

    with PostgresServer(tmp_path / "pg", free_port()) as postgres:
        init_db(postgres.url)
        engines = [make_engine(postgres.url) for _ in range(2)]
        try:
            processes = [sessionmaker(engine, expire_on_commit=False) for engine in engines]
            failed: list[str] = []
            done: list[int] = []  # each batch that returned, whichever way
            rounds = 10
            for round_ in range(rounds):
                first, second = f"1.2.4.{round_}.1", f"1.2.4.{round_}.2"
                if round_ % 2:  # odd rounds: both series exist already (a row each); even rounds: both new
                    assert record_sorting_out(processes[0], [_item(f"{first}.0", series=first), _item(f"{second}.0", series=second)]) == []
                barrier = threading.Barrier(2)

                def take(n: int, first: str = first, second: str = second) -> None:
                    order = (first, second) if n == 0 else (second, first)
                    items = [_item(f"{uid}.{n}.{k}", series=uid) for uid in order for k in range(3)]
                    barrier.wait()
                    try:
                        assert record_sorting_out(processes[n], items) == []
                    except Exception as exc:  # a deadlock reads as an outage: raised, the batch to record again
                        failed.append(sqlstate(exc) or repr(exc))
                    done.append(n)

                threads = [threading.Thread(target=take, args=(n,)) for n in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
            assert failed == [] and len(done) == 2 * rounds, (failed, done)  # a deadlock: 40P01, after ~1 s
            with processes[0]() as session:
                counts = dict(session.execute(select(Series.series_instance_uid, Series.instance_count)).all())
            assert counts == {f"1.2.4.{r}.{k}": 6 + r % 2 for r in range(rounds) for k in (1, 2)}
        finally:
            for engine in engines:
                engine.dispose()
