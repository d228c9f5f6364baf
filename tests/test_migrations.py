"""The schema comes only from Alembic migrations (``init_db`` runs them): a column added to the models
without its migration would exist in no deployed database, and a site that upgrades would fail at
its first query. Checked on SQLite and on a real PostgreSQL, as the two deployments have them."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from dicom_node.db import alembic_config, init_db, make_engine
from dicom_node.local_stack import PostgresServer, free_port
from dicom_node.models import Base
from tests.helpers import env_without_mr2ct


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    with PostgresServer(tmp_path / "pg", free_port()) as server:
        yield server.url


def _differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


def test_the_migrations_make_exactly_the_schema_the_models_describe_and_undo_it(database_url: str) -> None:
    init_db(database_url)
    assert _differences(database_url) == []
    config = alembic_config(database_url)
    command.downgrade(config, "base")  # every migration can be taken back...
    engine = make_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    command.upgrade(config, "head")  # ...and applied again
    assert _differences(database_url) == []


def test_the_database_refuses_to_change_or_delete_an_audit_row(database_url: str) -> None:
    """The audit trail is append-only in the database itself (migration 0035), not only by the
    code having no such path: an UPDATE or DELETE of its rows, from any client, is refused with a
    message that says why, and the row stays as written. Rows of other tables change as before."""
    from sqlalchemy import delete, select, update
    from sqlalchemy.exc import DBAPIError

    from dicom_node import audit
    from dicom_node.models import AuditEvent, Series, utcnow

    sessions = init_db(database_url)
    audit.record(sessions, "job-finished", "success", "worker-1", series_uid="1.2.3", job_id=7)
    for statement in (update(AuditEvent).values(outcome="failure"), delete(AuditEvent)):
        with pytest.raises(DBAPIError, match="audit_events is append-only"):
            with sessions.begin() as session:
                session.execute(statement)
    with sessions() as session:
        assert session.execute(select(AuditEvent.action, AuditEvent.outcome, AuditEvent.job_id)).all() == [("job-finished", "success", 7)]
    with sessions.begin() as session:
        session.add(Series(series_instance_uid="1.2.3", study_instance_uid="1.2", modality="MR", calling_ae="SCANNER", instance_count=1,
                           state="receiving", first_received_at=utcnow(), last_received_at=utcnow()))
    with sessions.begin() as session:
        session.execute(update(Series).values(state="stable"))
        session.execute(delete(Series))


def test_a_command_says_in_one_line_what_it_did_to_the_schema(tmp_path: Path) -> None:
    """A new database, or one a new version upgrades, is one log line naming the revisions, not
    Alembic's line per migration (36 on a new database, each with its docstring: the first screen
    an administrator read of a node's log or of a `mr2ct pull`). A database already at head: no
    line."""
    import subprocess
    import sys

    from alembic.script import ScriptDirectory

    url = f"sqlite:///{tmp_path / 'mr2ct.db'}"
    env = {**env_without_mr2ct(), "MR2CT_DATABASE_URL": url}
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()

    def schema_lines() -> list[str]:  # a pull from a PACS that is not there: it opens the database, then fails
        done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "pull", "--url", f"http://127.0.0.1:{free_port()}/dicom-web",
                               "--cache", str(tmp_path / "cache"), "--attempts", "1"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and "is not reachable" in done.stderr, done.stderr[-2000:]
        assert "Running upgrade" not in done.stderr
        return [line.split(" INFO ", 1)[1] for line in done.stderr.splitlines() if "schema" in line]

    assert schema_lines() == [f"dicom_node.db database {url}: schema created at revision {head}"]
    command.downgrade(alembic_config(url), "0032")
    assert schema_lines() == [f"dicom_node.db database {url}: schema upgraded from revision 0032 to {head}"]
    assert schema_lines() == []
