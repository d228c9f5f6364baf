"""An ML engineer promotes a model without touching files by hand: register a run folder (its
losses reach the database), activate it through the API, and the running node uses it for the
next job, recording which model made each sCT."""

from __future__ import annotations

import csv
import subprocess
import sys

import httpx
import pytest
import torch
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from dicom_node.models import ModelVersion
from synthesis.errors import ModelMismatch
from synthesis.model_file import default_model_path, load_model, save_model
from synthesis.networks import ResnetGenerator
from tests.conftest import NODE_AE, SCANNER_AE
from training.phantom_dicom import write_mr_series
from training.trainer import LOSS_NAMES
from tests.helpers import env_without_mr2ct


def _cli(node, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_without_mr2ct()
    env["MR2CT_DATABASE_URL"] = node.database_url
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_register_activate_and_the_next_job_uses_the_new_model(node_factory, tmp_path):
    node = node_factory()
    run = tmp_path / "run-7"
    torch.manual_seed(7)
    card = dict(load_model(default_model_path()).card)
    card.pop("sha256")
    card["name"] = "run-7"
    new = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    with open(run / "losses.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", *LOSS_NAMES, "seconds"])
        writer.writeheader()
        for epoch in (1, 2):
            writer.writerow({"epoch": epoch, **dict.fromkeys(LOSS_NAMES, 0.5 / epoch), "seconds": 10 * epoch})
    registered = _cli(node, "models", "register", str(run))
    assert registered.returncode == 0, registered.stderr
    assert "registered (2 epochs of losses)" in registered.stdout
    with init_db(node.database_url)() as session:
        row = session.scalars(select(ModelVersion).where(ModelVersion.sha256 == new["sha256"])).one()
        assert [e["epoch"] for e in row.losses] == [1, 2] and row.losses[1]["G_loss"] == 0.25
    again = _cli(node, "models", "register", str(run))  # idempotent, and says so
    assert again.returncode == 0 and "already registered; nothing changed" in again.stdout
    inactive = _cli(node, "models", "list").stdout  # registered is not active: the list says what the node runs meanwhile
    assert "run-7" in inactive and f"none active: the node runs model_file {default_model_path()}" in inactive
    assert "learned: T1, HEAD" in inactive  # what its card says it learned: the shipped card's

    first = write_mr_series(tmp_path / "a", seed=1400, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    assert storescu(first.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    before = wait_for_job(node.database_url, first.series_uid, timeout=120)
    assert before.model_sha256 == load_model(default_model_path()).sha256

    token = _cli(node, "tokens", "create", "--role", "admin", "--name", "ml").stdout.strip()
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    headers = {"Authorization": f"Bearer {token}"}
    listed = httpx.get(f"{base}/models", headers=headers).json()["items"]
    model_id = next(m["id"] for m in listed if m["sha256"] == new["sha256"])
    assert httpx.get(f"{base}/models/{model_id}", headers=headers).json()["card"]["name"] == "run-7"
    assert httpx.post(f"{base}/models/{model_id}/activate", headers=headers).status_code == 200
    assert httpx.post(f"{base}/models/999/activate", headers=headers).status_code == 404

    second = write_mr_series(tmp_path / "b", seed=1401, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    assert storescu(second.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    after = wait_for_job(node.database_url, second.series_uid, timeout=120)
    assert after.state == "done" and after.model_sha256 == new["sha256"]
    assert "model switched" in node.log_path.read_text()
    listing = _cli(node, "models", "list").stdout
    assert "* " in listing and "run-7" in listing and "none active" not in listing


def test_a_run_folder_trained_into_again_is_not_used_under_the_registered_models_name(node_factory, tmp_path):
    """A registered model names a file; when a new run overwrites it, the registry's model is not
    there any more: activating it is refused, and a worker told to use it keeps the model it has,
    so no sCT is made by weights nobody registered."""
    node = node_factory()
    run = tmp_path / "run-8"
    card = dict(load_model(default_model_path()).card)
    card.pop("sha256")
    torch.manual_seed(8)
    first = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    assert _cli(node, "models", "register", str(run)).returncode == 0
    assert _cli(node, "models", "activate", first["sha256"][:12]).returncode == 0
    torch.manual_seed(9)  # the same folder trained into again: other weights, a card that matches them
    second = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)

    refused = _cli(node, "models", "activate", first["sha256"][:12])
    assert refused.returncode == 2 and "now holds other weights" in refused.stderr and "register the file again" in refused.stderr
    series = write_mr_series(tmp_path / "a", seed=1402, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done" and job.model_sha256 == load_model(default_model_path()).sha256 != second["sha256"]
    assert "cannot load the active model" in node.log_path.read_text()


def test_a_tampered_model_cannot_be_registered(node_factory, tmp_path):
    node = node_factory()
    run = tmp_path / "bad"
    card = dict(load_model(default_model_path()).card)
    card.pop("sha256")
    save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    with open(run / "model.safetensors", "ab") as fh:
        fh.write(b"tampered")
    result = _cli(node, "models", "register", str(run))
    assert result.returncode == 2 and "card belongs to other weights" in result.stderr


def test_the_nodes_test_time_augmentation_setting_overrides_the_cards() -> None:
    """`test_time_augmentation = "none"` trades the shipped model's 32 views for speed: the worker then
    runs one forward, and its CT UIDs (which follow what made the pixels) are not the 32-view ones."""
    from dicom_node.worker import Worker

    shipped = load_model(default_model_path())
    assert shipped.test_time_augmentation == "dihedral-shift"
    as_card = Worker(None, shipped, None, None, "1.2.3.", 1, test_time_augmentation="model")  # type: ignore[arg-type]
    assert as_card.model is shipped
    fast = Worker(None, shipped, None, None, "1.2.3.", 1, test_time_augmentation="none")  # type: ignore[arg-type]
    assert fast.model.test_time_augmentation == "none" and fast.model.sha256 == shipped.sha256
    assert fast.model.output_key != shipped.output_key
    assert shipped.test_time_augmentation == "dihedral-shift"  # the loaded model itself is left as it was


def test_registering_again_after_the_card_changed_refreshes_the_registry(tmp_path):
    """`models set` and `evaluate --record` change a card, not its weights: registering the weights
    again brings the registry's copy (what GET /models shows) up to date, with an audit row."""
    from dicom_node.models import AuditEvent
    from dicom_node.registry import register
    from synthesis.model_file import record_metrics, set_test_time_augmentation

    sessions = init_db(f"sqlite:///{tmp_path / 'registry.db'}")
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k not in ("sha256", "card_changes")}
    weights = tmp_path / "run" / "model.safetensors"
    card["parameters"] = {"in_channels": 1, "out_channels": 1, "ngf": 4, "n_blocks": 1}
    save_model(weights, ResnetGenerator(ngf=4, n_blocks=1), {**card, "test_time_augmentation": "dihedral"})
    first, outcome = register(sessions, weights.parent)
    assert outcome == "registered"

    def audited() -> list[str]:
        with sessions() as session:
            return [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]

    row, outcome = register(sessions, weights.parent)
    assert (row.id, outcome) == (first.id, "unchanged") and audited() == ["model-registered"]  # nothing new

    set_test_time_augmentation(weights, "mirror")
    record_metrics(weights, {"mae_hu": 12.5, "test_time_augmentation": "mirror"}, first.sha256)
    again, outcome = register(sessions, weights.parent)
    assert outcome == "card-updated"
    assert (again.id, again.name, again.sha256) == (first.id, first.name, first.sha256)
    with sessions() as session:
        row = session.get(ModelVersion, first.id)
        assert row.card["test_time_augmentation"] == "mirror" and row.metrics == {"mae_hu": 12.5, "test_time_augmentation": "mirror"}
    assert audited() == ["model-registered", "model-card-updated"]


def test_an_active_model_that_cannot_be_loaded_is_tried_again_only_once_its_files_change(tmp_path):
    """The active model's file deleted (a disk cleaned by hand): the worker keeps its model and says
    why once, instead of reading the registry's files again and logging the same error for every
    job; once the file is back, the next job uses it."""
    from dicom_node.registry import activate, register
    from dicom_node.worker import Worker

    sessions = init_db(f"sqlite:///{tmp_path / 'registry.db'}")
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k not in ("sha256", "card_changes")}
    card["parameters"] = {"in_channels": 1, "out_channels": 1, "ngf": 4, "n_blocks": 1}
    weights = tmp_path / "run" / "model.safetensors"
    save_model(weights, ResnetGenerator(ngf=4, n_blocks=1), card)
    row, _ = register(sessions, weights.parent)
    activate(sessions, str(row.id))
    shipped = load_model(default_model_path())
    worker = Worker(sessions, shipped, None, None, "1.2.3.", 1)  # type: ignore[arg-type]
    kept = weights.read_bytes()
    weights.unlink()
    with pytest.raises(ModelMismatch, match="not found"):
        worker.refresh_model()
    worker.refresh_model()  # nothing changed: no second attempt, no second error
    assert worker.model is shipped
    weights.write_bytes(kept)
    worker.refresh_model()
    assert worker.model.sha256 == row.sha256


def test_activating_a_model_of_another_contrast_and_anatomy_warns_and_config_check_checks_the_active_one(node_factory, tmp_path):
    """An ML engineer promotes a T2 pelvis model into a node whose selection takes T1 heads: the
    activation warns (CLI and API) that the selection lets through what the model never learned,
    and `config check` checks the registry's active model, which the workers run, not model_file."""
    node = node_factory()
    run = tmp_path / "run-pelvis"
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k != "sha256"}
    card.update(name="run-pelvis", mr_contrasts=["T2"], mr_body_parts=["PELVIS"])
    torch.manual_seed(10)
    new = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    assert _cli(node, "models", "register", str(run)).returncode == 0
    activated = _cli(node, "models", "activate", new["sha256"][:12])
    assert activated.returncode == 0 and "active: " in activated.stdout, activated.stderr
    assert "warning: select_acquisition_contrasts ['T1'] lets through ['T1'], whose sCT the model never learned" in activated.stderr
    assert "select_body_parts ['HEAD', 'BRAIN', 'SKULL', 'UNKNOWN'] lets through ['HEAD', 'BRAIN', 'SKULL']" in activated.stderr

    checked = _cli(node, "config", "check")
    model_line = next(line for line in checked.stdout.splitlines() if line.split()[1:2] == ["model"])
    assert model_line.startswith("warn") and "the registry's active model" in model_line and "'run-pelvis'" in model_line, model_line
    assert new["sha256"][:12] in model_line and "body parts ['PELVIS']" in model_line, model_line

    token = _cli(node, "tokens", "create", "--role", "admin", "--name", "ml").stdout.strip()
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    with init_db(node.database_url)() as session:
        model_id = session.scalars(select(ModelVersion.id).where(ModelVersion.sha256 == new["sha256"])).one()
    answer = httpx.post(f"{base}/models/{model_id}/activate", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    assert answer["active"] and any("select_body_parts" in w and "['HEAD', 'BRAIN', 'SKULL']" in w for w in answer["warnings"]), answer
    assert any("select_acquisition_contrasts" in w for w in answer["warnings"]), answer
