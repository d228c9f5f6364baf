"""Schemathesis against the admin API's OpenAPI schema: generated requests (with an admin token)
never get a server error, and every status code an answer has is one the schema documents.

One plain pytest test per operation (not ``schema.parametrize()``, whose per-operation results
live inside one item: under pytest-xdist, which the test command uses, a failing operation there
was reported as a pass)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import status_code_conformance

from dicom_node.api.app import create_app
from dicom_node.tokens import create_token
from dicom_node.db import init_db

# one database per pytest-xdist worker: each imports this module
DB = Path(__file__).resolve().parent.parent / "test-artifacts" / f"schemathesis-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.db"
DB.parent.mkdir(exist_ok=True)
for leftover in (DB, DB.with_name(DB.name + "-wal"), DB.with_name(DB.name + "-shm")):
    leftover.unlink(missing_ok=True)  # a run that was killed leaves its WAL behind
SESSIONS = init_db(f"sqlite:///{DB}")
TOKEN = create_token(SESSIONS, "admin", "schemathesis")
APP = create_app(SESSIONS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


def test_the_schema_has_the_admin_operations() -> None:
    labels = {operation.label for operation in OPERATIONS}
    assert len(OPERATIONS) >= 15 and {"GET /jobs", "POST /jobs/{job_id}/cancel", "GET /audit"} <= labels, sorted(labels)


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.label)
def test_no_request_gets_a_server_error_or_an_undocumented_status(operation) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
        response = case.call()
        assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        case.validate_response(response, checks=(status_code_conformance,))

    check()
