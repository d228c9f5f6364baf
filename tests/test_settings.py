"""A PACS administrator configures the node by file and MR2CT_* variables; mistakes stop start-up by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.settings import ConfigError, load_settings
from tests.helpers import env_without_mr2ct

MR2CT = [sys.executable, "-m", "dicom_node.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = env_without_mr2ct()
    env.update(extra)
    return env


def _without_mr2ct_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MR2CT_")]:
        monkeypatch.delenv(key)


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "mr2ct.toml"
    config.write_text('ae_title = "FROMFILE"\ndicom_port = 11200\nstable_seconds = 3\n')
    _without_mr2ct_settings(monkeypatch)
    monkeypatch.setenv("MR2CT_DICOM_PORT", "11300")
    monkeypatch.setenv("MR2CT_ALLOWED_AES", "SCANNER1, SCANNER2,")
    settings = load_settings(config)
    assert settings.ae_title == "FROMFILE"
    assert settings.dicom_port == 11300
    assert settings.stable_seconds == 3
    assert settings.allowed_aes == ["SCANNER1", "SCANNER2"]


def test_config_show_masks_secrets() -> None:
    result = subprocess.run(
        [*MR2CT, "config", "show"], capture_output=True, text=True,
        env=_env(MR2CT_ORTHANC_PASSWORD="s3cret-value", MR2CT_DATABASE_URL="postgresql://mr2ct:dbpass@127.0.0.1/mr2ct"),
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert "s3cret-value" not in result.stdout and "dbpass" not in result.stdout
    assert shown["orthanc_password"] == "********"
    assert shown["database_url"] == "postgresql://mr2ct:********@127.0.0.1/mr2ct"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MR2CT_DICOM_PORT", "70000"),
        ("MR2CT_STABLE_SECONDS", "-1"),
        ("MR2CT_AE_TITLE", "A\\B"),
        ("MR2CT_DEVICE", "tpu"),
        ("MR2CT_UID_ROOT", "1.2.abc."),
        ("MR2CT_ALLOWED_AES", "GOOD,THIS_TITLE_IS_FAR_TOO_LONG"),
        ("MR2CT_FORWARD_TO", "PACS:104"),
        ("MR2CT_DICOM_POLL_MS", "0"),
        ("MR2CT_TEST_TIME_AUGMENTATION", "all"),
        ("MR2CT_SELECT_IMAGE_TYPE_EXCLUDE", "LOCALIZER,ORIGINAL\\PRIMARY"),
    ],
)
def test_a_bad_setting_stops_serve_with_a_message_naming_the_key(key: str, value: str) -> None:
    result = subprocess.run([*MR2CT, "serve"], capture_output=True, text=True, env=_env(**{key: value}), timeout=60)
    assert result.returncode == 2
    assert key in result.stderr, result.stderr


def test_a_failed_series_kept_less_long_than_a_series_done_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_mr2ct_settings(monkeypatch)
    monkeypatch.setenv("MR2CT_SPOOL_RETENTION_HOURS", "48")
    monkeypatch.setenv("MR2CT_SPOOL_FAILED_RETENTION_HOURS", "24")
    with pytest.raises(ConfigError, match="spool_failed_retention_hours .24. is shorter than spool_retention_hours .48."):
        load_settings(None)
    monkeypatch.setenv("MR2CT_SPOOL_FAILED_RETENTION_HOURS", "72")
    assert load_settings(None).spool_failed_retention_hours == 72


def test_an_axial_sct_from_a_node_that_never_reslices_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_mr2ct_settings(monkeypatch)
    monkeypatch.setenv("MR2CT_CT_PLANE", "axial")
    monkeypatch.setenv("MR2CT_SYNTHESIS_PLANE", "acquired")
    with pytest.raises(ConfigError, match="ct_plane axial needs synthesis_plane auto or axial"):
        load_settings(None)
    monkeypatch.setenv("MR2CT_SYNTHESIS_PLANE", "auto")
    assert load_settings(None).ct_plane == "axial"


def test_an_unknown_key_in_the_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "mr2ct.toml"
    config.write_text('ae_titel = "TYPO"\n')
    with pytest.raises(ConfigError, match="ae_titel"):
        load_settings(config)


def test_a_missing_model_file_stops_serve_naming_model_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MR2CT, "serve"], capture_output=True, text=True, timeout=60,
        env=_env(MR2CT_MODEL_FILE=str(tmp_path / "nope.safetensors"), MR2CT_DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite"),
    )
    assert result.returncode == 2
    assert "model_file" in result.stderr and "nope.safetensors" in result.stderr
