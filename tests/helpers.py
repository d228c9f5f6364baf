"""Small helpers shared by tests: Orthanc look-ups, dciodvfy, admin API tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.local_stack import OrthancServer
from dicom_node.models import AuditEvent

# Debian's dicom3tools (1.00~20220618) predates Synthetic Data (0008,001C), added to
# PS3.6 later; its dictionary reports the standard tag as unknown. Only this line is
# set aside, and tests print it; any other Error line fails.
KNOWN_STALE_DICTIONARY_ERRORS = ("(0x0008,0x001c)",)


def study_series(orthanc: OrthancServer, study_uid: str) -> list[dict]:
    lookup = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, auth=orthanc.auth, timeout=30).json()
    study_ids = [r["ID"] for r in lookup if r["Type"] == "Study"]
    assert len(study_ids) == 1, f"study {study_uid} not in Orthanc"
    return orthanc.get(f"/studies/{study_ids[0]}/series")


def series_datasets(orthanc: OrthancServer, series: dict) -> list[Dataset]:
    out = []
    for instance_id in series["Instances"]:
        raw = httpx.get(f"{orthanc.url}/instances/{instance_id}/file", auth=orthanc.auth, timeout=30).content
        out.append(pydicom.dcmread(BytesIO(raw)))
    return out


def dciodvfy(path: Path) -> tuple[list[str], list[str], list[str]]:
    """Run dciodvfy; return (errors, set-aside stale-dictionary errors, warnings)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [l for l in lines if l.startswith("Error")]
    stale = [l for l in errors if any(tag in l for tag in KNOWN_STALE_DICTIONARY_ERRORS)]
    warnings = [l for l in lines if l.startswith("Warning")]
    return [e for e in errors if e not in stale], stale, warnings


def audit_events(database_url: str, matching: Callable[[AuditEvent], bool], timeout: float = 15.0) -> list[AuditEvent]:
    """The audit events that ``matching`` accepts, waiting up to ``timeout`` for the first: the
    node writes some after its answer has left (pynetdicom sends an A-ASSOCIATE-RJ before its
    EVT_REJECTED handlers run), so a client that has its answer may look before the row is there."""
    sessions = init_db(database_url)
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            found = [e for e in session.scalars(select(AuditEvent)).all() if matching(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def api_token(database_url: str, role: str, name: str) -> str:
    """A fresh admin API token, made with the CLI as an administrator would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MR2CT_")}
    env["MR2CT_DATABASE_URL"] = database_url
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "tokens", "create", "--role", role, "--name", name],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
