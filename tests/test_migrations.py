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
