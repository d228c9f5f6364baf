"""An ML engineer runs the fine-tune search recipe: chains of `mr2ct train --init-from` stages,
each kept only if it beats its parent on the validation set, never on the sets it is reported on."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from synthesis.model_file import load_model
from training.evaluate import evaluate, share_better

ROOT = Path(__file__).resolve().parent.parent
GRID = ["--pixel-spacing", "4", "--image-size", "64"]
SMALL = ["--steps-per-epoch", "2", "--batch-size", "2", "--subjects-per-pool", "2", "--threads", "1"]


def test_search_keeps_a_stage_only_when_it_beats_its_parent_on_validation(tmp_path: Path) -> None:
    start = tmp_path / "start"
    made = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--no-record", "--out", str(start), "--epochs", "1",
                           "--checkpoint-every", "0", "--test-time-augmentation", "dihedral-shift", *GRID, *SMALL],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    work = tmp_path / "search"
    result = subprocess.run(
        [sys.executable, str(ROOT / "training/recipes/finetune_search.py"), "--start", str(start), "--work", str(work),
         "--minutes", "0.4", "--chains", "2", "--device", "cpu", "--first-stage-estimate-s", "1", "--epochs", "1",
         "--lr-decay-start", "0", "--ema-decay", "0", "--test-time-augmentation", "none", "--validation-subjects", "2",
         "--slices", "4", "--report-subjects", "0", "--top", "1", *GRID, *SMALL],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((work / "search.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert report["device"] == "cpu" and report["precision"] in ("fp32", "bf16")  # what its scores were taken in
    assert not [s for s in stages.values() if s["error"]], result.stderr[-3000:]
    assert {s["chain"] for s in stages.values()} == {0, 1}, "each chain ran at least one stage"
    start_mae = report["start_scores"]["validation"]["mae_hu"]
    # The start is scored with the search's views (one), not its card's 32: a stage beats its parent, not fewer views.
    start_model = load_model(start / "model.safetensors")
    assert start_model.test_time_augmentation == "dihedral-shift"
    one_view = replace(start_model, card={**start_model.card, "test_time_augmentation": "none"})
    assert abs(evaluate(one_view, subjects=2, slices=4, first_subject=200).mae_hu - start_mae) < 0.05
    voxels = report["start_scores"]["validation"]["voxels_by_subject"]
    for chain in (0, 1):
        parent, parent_mae, parent_heads = "start", start_mae, report["start_scores"]["validation"]["mae_by_subject"]
        for s in sorted((s for s in stages.values() if s["chain"] == chain), key=lambda s: int(s["name"].split("-")[1])):
            # Each stage starts from the last kept stage of its chain (its card says which checkpoint).
            assert s["parent"] == parent and s["parent_validation_mae_hu"] == parent_mae
            card = json.loads((work / s["name"] / "model.json").read_text())
            source = Path(card["training"]["initialized_from"]["path"])
            assert source == (start if parent == "start" else work / parent) / "checkpoint.pt"
            # Kept: better pooled, and in at least 90 % of the draws of the two heads (the paired rule).
            assert s["better_than_parent_share"] == share_better(s["validation_mae_by_subject"], parent_heads, voxels)
            assert s["kept"] == (s["validation_mae_hu"] < parent_mae and s["better_than_parent_share"] >= 0.9)
            if s["kept"]:
                parent, parent_mae, parent_heads = s["name"], s["validation_mae_hu"], s["validation_mae_by_subject"]
    best = stages[report["best"]]
    assert best["validation_mae_hu"] == min(s["validation_mae_hu"] for s in stages.values())
    assert summary["best"] == report["best"] and summary["best_validation_mae_hu"] == best["validation_mae_hu"]
    # The figures are the model's own, on the validation heads (first subject 200), not the report set (0).
    model = load_model(work / best["name"] / "model.safetensors")
    assert abs(evaluate(model, subjects=2, slices=4, first_subject=200).mae_hu - best["validation_mae_hu"]) < 0.05
    assert abs(evaluate(model, subjects=2, slices=4, first_subject=0).mae_hu - best["report"]["0"]["mae_hu"]) < 0.05
    assert (work / "search.png").stat().st_size > 5_000


def test_a_gain_that_one_lucky_head_carries_is_not_kept() -> None:
    """Twelve validation heads: a stage far better on one head and a little worse on the eleven
    others has the lower pooled MAE, yet loses in the draws without that head; the paired rule
    drops it (the pooled rule would keep it) and keeps a stage a little better on every head."""
    sys.path.insert(0, str(ROOT / "training/recipes"))
    import finetune_search

    voxels = [10_000] * 12
    parent = {"mae_hu": 50.0, "mae_by_subject": [50.0] * 12, "voxels_by_subject": voxels}
    lucky = {"mae_hu": 49.25, "mae_by_subject": [30.0] + [51.0] * 11, "voxels_by_subject": voxels}
    steady = {"mae_hu": 49.0, "mae_by_subject": [49.0] * 12, "voxels_by_subject": voxels}
    paired = finetune_search.Search(finetune_search.parser().parse_args(["--start", "x", "--minutes", "1", "--device", "cpu"]))
    pooled = finetune_search.Search(finetune_search.parser().parse_args(["--start", "x", "--minutes", "1", "--device", "cpu",
                                                                         "--keep-rule", "pooled"]))
    kept, share = paired.keeps(lucky, parent)
    assert not kept and 0.5 < share < 0.8  # the lucky head is in about 1 - (11/12)^12 = 65 % of the draws
    assert pooled.keeps(lucky, parent) == (True, share)
    assert paired.keeps(steady, parent) == (True, 1.0)
    refused = subprocess.run([sys.executable, str(ROOT / "training/recipes/finetune_search.py"), "--start", "x", "--minutes", "1",
                              "--keep-confidence", "90"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--keep-confidence: 90.0 is not a share in (0, 1]" in refused.stderr
