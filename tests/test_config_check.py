"""`mr2ct config check`: a PACS administrator checks a deployment before the node takes traffic.
The node itself takes scanner traffic whatever Orthanc answers (jobs retry), so a wrong login
showed only as jobs retrying for an hour."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dicom_node.local_stack import free_port, start_storescp, stop_process
from tests.conftest import node_env


def _check(env: dict[str, str], **changes: str) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MR2CT_")}
    run_env.update(env)
    run_env.update({f"MR2CT_{k.upper()}": v for k, v in changes.items()})
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check"], capture_output=True, text=True, env=run_env,
                          timeout=120)


def _lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each check's line by its name: 'status message'."""
    found = {}
    for line in result.stdout.splitlines():
        status, rest = line[:5].strip(), line[6:]
        name, message = rest[:11].strip(), rest[12:]
        found[name] = f"{status} {message}"
    return found


def test_a_good_deployment_passes_and_each_fault_names_its_setting(orthanc, tmp_path):
    env = node_env(tmp_path / "node", free_port(), orthanc)
    good = _check(env)
    assert good.returncode == 0, good.stdout + good.stderr
    lines = _lines(good)
    assert list(lines) == ["database", "orthanc", "model", "spool", "dicom port", "api port"]
    assert all(line.startswith("ok ") for line in lines.values()), lines
    assert "login accepted" in lines["orthanc"] and "Orthanc 1." in lines["orthanc"]
    assert "SHA-256" in lines["model"] and "writable" in lines["spool"]
    assert "the node brings it to revision" in lines["database"]  # read, not migrated
    assert orthanc.password not in good.stdout + good.stderr

    wrong_login = _check(env, orthanc_password="not-the-password")
    assert wrong_login.returncode == 1
    assert _lines(wrong_login)["orthanc"].startswith("FAIL") and "HTTP 401" in _lines(wrong_login)["orthanc"]
    assert "orthanc_password" in _lines(wrong_login)["orthanc"] and "not-the-password" not in wrong_login.stdout
    assert "1 check(s) failed: orthanc" in wrong_login.stderr

    unreachable = _check(env, orthanc_url=f"http://127.0.0.1:{free_port()}", orthanc_timeout_seconds="5")
    assert unreachable.returncode == 1 and "check orthanc_url" in _lines(unreachable)["orthanc"]

    full = _check(env, spool_min_free_mb=str(2**40))
    assert full.returncode == 1 and "spool_min_free_mb" in _lines(full)["spool"]

    no_model = _check(env, model_file=str(tmp_path / "missing.safetensors"))
    assert no_model.returncode == 1 and _lines(no_model)["model"].startswith("FAIL model_file")

    with socket.socket() as taken:  # a node already running, or another program on the port
        taken.bind(("127.0.0.1", int(env["MR2CT_DICOM_PORT"])))
        taken.listen()
        busy = _check(env)
    assert busy.returncode == 0 and _lines(busy)["dicom port"].startswith("warn") and "dicom_port" in _lines(busy)["dicom port"]


def test_the_routing_destination_is_asked_for_a_c_echo(orthanc, tmp_path):
    env = node_env(tmp_path / "node", free_port(), orthanc)
    port = free_port()
    (tmp_path / "archive").mkdir()
    archive = start_storescp(tmp_path / "archive", port, "ARCHIVE")
    try:
        answered = _check(env, forward_originals="true", forward_to=f"ARCHIVE@127.0.0.1:{port}")
    finally:
        stop_process(archive)
    assert answered.returncode == 0 and _lines(answered)["routing"] == f"ok forward_to ARCHIVE@127.0.0.1:{port} answered C-ECHO"
    silent = _check(env, forward_originals="true", forward_to=f"ARCHIVE@127.0.0.1:{free_port()}")
    assert silent.returncode == 1 and _lines(silent)["routing"].startswith("FAIL forward_to")
