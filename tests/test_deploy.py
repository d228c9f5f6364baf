"""deploy/: the systemd units are valid for systemd, with their paths made real."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import env_without_mr2ct

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed")
    mr2ct = Path(sys.executable).parent / "mr2ct"
    env_file = tmp_path / "mr2ct.env"
    env_file.write_text((DEPLOY / "systemd" / "mr2ct.env.example").read_text())
    text = unit.read_text().replace("/opt/mr2ct/.venv/bin/mr2ct", str(mr2ct)).replace("/etc/mr2ct/mr2ct.env", str(env_file))
    text = text.replace("User=mr2ct", "User=root").replace("Group=mr2ct", "Group=root").replace("User=orthanc", "User=root").replace("Group=orthanc", "Group=root")
    target = tmp_path / unit.name
    target.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "postgresql.service" not in line and "network-online" not in line]
    assert result.returncode == 0 and not problems, "\n".join(problems)


def test_example_config_is_accepted_by_mr2ct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.settings import load_settings

    config = tmp_path / "mr2ct.toml"
    config.write_text((DEPLOY / "systemd" / "mr2ct.toml.example").read_text())
    tomllib.loads(config.read_text())
    settings = load_settings(config)
    assert settings.allowed_aes[0] == "SCANNER1@10.0.0.21"


@pytest.mark.parametrize("unit", [u for u in UNITS if "/bin/mr2ct serve" in u.read_text()], ids=lambda u: u.name)
def test_the_nodes_units_wait_for_the_node_to_say_it_is_ready(unit: Path) -> None:
    """`systemctl start` of a node's unit returns once the node listens (Type=notify), not when its
    process begins: a unit ordered after it, or an administrator's next command, finds it taking traffic."""
    assert "Type=notify" in unit.read_text().splitlines()


def test_under_systemd_a_node_says_ready_once_it_answers_and_stopping_when_it_stops(tmp_path: Path) -> None:
    """sd_notify(3) as systemd's manager receives it: a datagram on NOTIFY_SOCKET saying READY=1
    once the node's API answers, and STOPPING=1 on SIGTERM."""
    import socket
    import tempfile

    import httpx

    from dicom_node.local_stack import NodeServer, free_port

    folder = tempfile.mkdtemp(prefix="sd", dir="/tmp")  # a unix socket path has at most 107 bytes
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        manager.bind(f"{folder}/notify")
        manager.settimeout(60)
        env = env_without_mr2ct()
        api_port = free_port()
        env.update(MR2CT_DATABASE_URL=f"sqlite:///{tmp_path / 'mr2ct.db'}", MR2CT_SPOOL_DIR=str(tmp_path / "spool"),
                   MR2CT_API_PORT=str(api_port), NOTIFY_SOCKET=f"{folder}/notify")
        node = NodeServer(tmp_path / "api", env, free_port(), role="api")
        with node:
            assert manager.recv(4096).decode().split("\n") == ["READY=1", "STATUS=node started role=api"]
            assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=5).status_code == 200
        assert manager.recv(4096) == b"STOPPING=1"
    finally:
        manager.close()
        shutil.rmtree(folder, ignore_errors=True)
