"""An ML engineer trains with the project's own command and gets a model file, its card, the losses and figures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthesis.model_file import default_model_path, load_model
from training import phantoms
from training.evaluate import evaluate
from training.trainer import LOSS_NAMES, TrainConfig


def test_train_writes_a_loadable_model_with_its_card_losses_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "train", "--out", str(out), "--epochs", "2", "--steps-per-epoch", "2",
         "--batch-size", "2", "--subjects-per-pool", "2", "--seed", "5", "--threads", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_model(out / "model.safetensors")
    card = model.card
    assert card["training"]["command"].startswith("mr2ct train --out")
    assert card["training"]["seed"] == 5
    assert card["training"]["data"]["generator_version"] == phantoms.GENERATOR_VERSION
    assert len(card["sha256"]) == 64
    with open(out / "losses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(LOSS_NAMES) <= set(rows[0])
    for png in ("losses.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["lambda_ABA"] == 10.0


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"cycle_loss": "l3"}, {"image_size": 130}])
def test_bad_training_parameters_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_shipped_model_beats_a_linear_mr_to_hu_fit_by_half(capsys: pytest.CaptureFixture[str]) -> None:
    """The HU bound is computed from a naive baseline on the same held-out phantoms, never typed in."""
    model = load_model(default_model_path())
    quality = evaluate(model, subjects=3, slices=16)
    print(f"shipped model: MAE {quality.mae_hu} HU, linear baseline {quality.baseline_mae_hu} HU, PSNR {quality.psnr_db} dB, SSIM {quality.ssim}")
    assert quality.mae_hu <= 0.5 * quality.baseline_mae_hu
