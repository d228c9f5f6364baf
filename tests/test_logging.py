"""The node's log as a collector reads it: with ``log_format = "json"`` every line `mr2ct serve`
writes is one JSON object, and the patient identifiers stay out of it as out of the text log."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from dicom_node.demo import wait_for_job
from dicom_node.local_stack import echoscu, storescu
from tests.conftest import NODE_AE, SCANNER_AE
from training.phantom_dicom import write_mr_series


def test_json_log_lines(node_factory, tmp_path):
    node = node_factory(log_format="json")
    series = write_mr_series(tmp_path / "mr", seed=451, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0, patient_id="PATLOG01")
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    assert echoscu(node.port, NODE_AE, "NOT_ALLOWED").returncode != 0  # a rejection: a warning line
    node.stop()
    lines = [line for line in node.log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, or this fails naming it
    assert all({"time", "level", "logger", "message", "process", "thread"} <= set(e) for e in entries)
    assert all(datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0 for e in entries)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("SCP listening") for m in messages) and any(m.startswith("job done") for m in messages)
    assert any(e["level"] == "WARNING" and "association rejected" in e["message"] for e in entries)
    assert "PATLOG01" not in node.log_path.read_text()


def test_pydicoms_warnings_and_a_traceback_through_it_withhold_the_values_they_quote():
    """pydicom's warning of a value that breaks its VR's rules quotes it, and so does the message of
    an exception it raises ("Unable to convert '1970-02-03' to 'DA' object") in a failed job's
    traceback: a birth date, or a name. In both log formats the node's handlers keep the line, the
    traceback and its code lines, and withhold the quoted value; a traceback not through pydicom or
    highdicom is written whole."""
    import io
    import logging

    from pydicom import config
    from pydicom.valuerep import DA, validate_value

    from dicom_node.cli import JsonLines, WithholdQuotedValues

    log, birth_date = logging.getLogger("dicom_node.worker"), "1970-02-03"  # as a header holds it: code lines do not show it
    for formatter in (logging.Formatter("%(levelname)s %(name)s %(message)s"), JsonLines()):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(WithholdQuotedValues())
        log.addHandler(handler)
        try:
            try:
                DA(birth_date)
            except ValueError:
                log.exception("job failed job=%d", 7)
            try:
                raise OSError("spool '/var/lib/mr2ct/spool' is full")
            except OSError:
                log.exception("spool retention round failed")
            logging.getLogger("pydicom").addHandler(handler)  # pydicom's own line of a value it doubts
            validate_value("DA", birth_date, config.WARN)
        finally:
            log.removeHandler(handler)
            logging.getLogger("pydicom").removeHandler(handler)
        written = stream.getvalue()
        assert "job failed job=7" in written and "Unable to convert <value withheld>" in written, written
        assert "Invalid value for VR DA: <value withheld>" in written, written
        assert "1970-02-03" not in written and "valuerep.py" in written  # the traceback is there, less the value
        assert "spool '/var/lib/mr2ct/spool' is full" in written.replace("\\'", "'")


def test_a_failed_statement_never_carries_its_parameters_into_an_error_text(tmp_path):
    """The engines hide a statement's parameters: an error a log line or a traceback carries names
    the statement, never the patient ID it was asked with (until 2026-12-07 SQLAlchemy's text had
    ``[parameters: {... 'PAT-4711' ...}]``, and the background loops logged it whole)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from dicom_node.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no schema: the statement fails
    with pytest.raises(OperationalError) as failed, engine.connect() as connection:
        connection.execute(text("SELECT * FROM series WHERE patient_id = :patient"), {"patient": "PAT-4711"})
    assert "no such table" in str(failed.value) and "PAT-4711" not in str(failed.value)
    engine.dispose()


def test_a_statement_sqlite_refuses_is_no_outage_and_a_locked_or_stopped_database_is():
    """``db.cannot_reach``: what the background loops wait out in a line (and the API answers 503
    for) against what they log whole (and the API answers 500 for): SQLite's OperationalError names
    both a locked file and a missing table."""
    import sqlite3

    from sqlalchemy.exc import IntegrityError, OperationalError

    from dicom_node.db import cannot_reach

    def sqlite_says(message: str) -> OperationalError:
        return OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))

    assert cannot_reach(sqlite_says("database is locked")) and cannot_reach(sqlite_says("unable to open database file"))
    assert not cannot_reach(sqlite_says("no such table: series")) and not cannot_reach(sqlite_says('near "SELEC": syntax error'))
    assert cannot_reach(OperationalError("SELECT 1", {}, Exception("connection failed: Connection refused")))  # PostgreSQL's driver
    assert not cannot_reach(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not cannot_reach(ValueError("a defect"))


def test_a_database_outage_is_one_line_for_a_loop_then_one_when_it_ends_and_other_errors_stay_whole(caplog, monkeypatch):
    """A background loop's failed passes (``db.PassErrors``): an unreachable database is said when
    the outage begins, as a reminder every minute and when a pass succeeds again, without a
    traceback; an error that is no outage (a defect) is logged with its traceback every time."""
    import logging

    from sqlalchemy.exc import OperationalError

    from dicom_node import db

    clock = [1000.0]
    monkeypatch.setattr(db.time, "monotonic", lambda: clock[0])
    errors = db.PassErrors(logging.getLogger("mr2ct.test.loop"), "the test loop", "test pass failed")
    down = OperationalError("SELECT 1", {}, Exception("connection refused\n\tIs the server running?"))
    with caplog.at_level(logging.INFO, logger="mr2ct.test.loop"):
        for _ in range(100):  # 100 passes half a second apart
            errors.failed(down)
            clock[0] += 0.5
        clock[0] += 11
        errors.failed(down)  # a minute and more since it began: a reminder
        assert errors.attempt(lambda: None) is True  # a pass that runs through: the outage is over
        errors.succeeded()  # nothing more to say
        errors.failed(ValueError("a defect"))

        def defect() -> None:
            raise ValueError("a defect")

        assert errors.attempt(defect) is False  # reported, not raised
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert said == [
        ("ERROR", "the test loop: the database cannot be reached (OperationalError: connection refused); trying again", False),
        ("ERROR", "the test loop: the database still cannot be reached after 61 s, 101 passes (OperationalError: connection refused)", False),
        ("INFO", "the test loop: the database answers again after 61 s", False),
        ("ERROR", "test pass failed", True),
        ("ERROR", "test pass failed", True),
    ]


def test_a_loop_says_whether_the_database_is_away_read_only_or_a_write_conflict_rolled_a_pass_back(caplog):
    """The driver's own errors (psycopg's classes, wrapped as SQLAlchemy wraps them): a read-only
    server (a failover's demoted primary) is an outage that says so; a deadlock or serialization
    failure rolled one pass back, a warning with no outage begun (until 2026-12-08 all read "the
    database cannot be reached", and a deadlock then "answers again after 0 s")."""
    import logging

    import psycopg.errors
    from sqlalchemy.exc import InternalError, OperationalError

    from dicom_node import db

    errors = db.PassErrors(logging.getLogger("mr2ct.test.loop"), "the test loop", "test pass failed")
    deadlock = OperationalError("UPDATE jobs", {}, psycopg.errors.DeadlockDetected("deadlock detected"))
    conflict = OperationalError("UPDATE jobs", {}, psycopg.errors.SerializationFailure("could not serialize access"))
    read_only = InternalError("INSERT INTO instances", {}, psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute INSERT in a read-only transaction"), connection_invalidated=True)  # as the engine's handle_error marks it
    with caplog.at_level(logging.INFO, logger="mr2ct.test.loop"):
        errors.failed(deadlock)
        errors.failed(conflict)
        assert errors.down_since is None
        errors.failed(read_only)
        assert errors.attempt(lambda: None) is True
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said[:3] == [
        ("WARNING", "the test loop: a write conflict with another process rolled this pass back (OperationalError: deadlock detected); trying again"),
        ("WARNING", "the test loop: a write conflict with another process rolled this pass back (OperationalError: could not serialize access); trying again"),
        ("ERROR", "the test loop: the database takes no writes (read-only: a standby, or a primary a failover demoted?) "
                  "(InternalError: cannot execute INSERT in a read-only transaction); trying again"),
    ]
    assert said[3][1].startswith("the test loop: the database answers again after")
    assert db.cannot_reach(deadlock) and db.cannot_reach(read_only)  # both waited out: nothing held, nothing set aside
