"""deploy/: the systemd units are valid for systemd, with their paths made real."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
