"""Schemathesis against the admin API's OpenAPI schema: generated requests (with an admin token)
never get a server error, and responses match the schema's status codes."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from dicom_node.api.app import create_app
from dicom_node.api.auth import create_token
from dicom_node.db import init_db

DB = Path(__file__).resolve().parent.parent / "test-artifacts" / "schemathesis.db"
DB.parent.mkdir(exist_ok=True)
for leftover in (DB, DB.with_name(DB.name + "-wal"), DB.with_name(DB.name + "-shm")):
    leftover.unlink(missing_ok=True)  # a run that was killed leaves its WAL behind
SESSIONS = init_db(f"sqlite:///{DB}")
TOKEN = create_token(SESSIONS, "admin", "schemathesis")
APP = create_app(SESSIONS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
