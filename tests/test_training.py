"""An ML engineer trains with the project's own command and gets a model file, its card, the losses and figures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dicom_node.models import TrainingRun
from synthesis.model_file import default_model_path, load_model
from tests.helpers import cli_with_imports
from training import phantoms
from training.evaluate import evaluate
from training.trainer import LOSS_NAMES, TrainConfig


def test_train_writes_a_loadable_model_with_its_card_losses_and_figures(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "train", "--out", str(out), "--epochs", "2", "--steps-per-epoch", "2",
         "--batch-size", "2", "--subjects-per-pool", "2", "--seed", "5", "--threads", "2"],
        capture_output=True, text=True, timeout=600, env=_database(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_model(out / "model.safetensors")
    card = model.card
    # The run is in the database with every epoch's Table 2 losses, as in losses.csv, and the model it made.
    (run,) = _runs(tmp_path)
    assert (run.state, run.epochs_planned, run.epochs_completed, run.model_sha256) == ("finished", 2, 2, card["sha256"])
    assert run.out_dir == str(out.resolve()) and run.config["seed"] == 5 and run.ended_at is not None
    with open(out / "losses.csv") as fh:
        logged = list(csv.DictReader(fh))
    assert [e["epoch"] for e in run.losses] == [1, 2]
    assert all(e[name] == pytest.approx(float(row[name]), abs=1e-6) for e, row in zip(run.losses, logged) for name in LOSS_NAMES)
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


@pytest.mark.parametrize("bad", [
    {"batch_size": 0}, {"cycle_loss": "l3"}, {"image_size": 130}, {"d_layers": 0}, {"ema_decay": 1.0}, {"pixel_spacing_mm": 0.0},
    {"lr_G": -1e-4}, {"lr_D": -1e-4}, {"beta1": 1.0}, {"beta2": -0.1}, {"synthetic_pool_size": -1}, {"lambda_ABA": -1.0},
    {"max_minutes": 0.0}, {"ngf": 0}, {"image_size": 16}, {"image_size": 64, "crop_size": 16},
], ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()))
def test_bad_training_parameters_are_refused_naming_the_parameter(bad: dict) -> None:
    """Each is refused before any training, naming the parameter (not a division by zero, a torch
    error in the first step, or an empty random range when the pool is first full)."""
    with pytest.raises(ValueError, match=list(bad)[-1]):
        TrainConfig(**bad)


@pytest.mark.parametrize("smallest", [["--image-size", "24"], ["--image-size", "16", "--discriminator", "paper"],
                                      ["--image-size", "64", "--crop-size", "16", "--d-layers", "2"]], ids=" ".join)
def test_the_smallest_sizes_allowed_train(tmp_path: Path, smallest: list[str]) -> None:
    """The size limit is the discriminator's, not a guess: at the smallest size it allows, a step trains."""
    done = _train(tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "1", "--subjects-per-pool", "1", "--no-record",
                  "--checkpoint-every", "0", *smallest)  # after TINY's: the last --image-size counts
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == int(smallest[1])


# The shipped model must clearly beat a linear MR-to-HU fit made on the very phantoms it is scored
# on (which flatters the baseline): at most half its MAE, the synthesis issue's example bound (the
# training issue's goal, a third, is reported by `mr2ct evaluate`, not asserted: README "Quality").
BASELINE_FRACTION = 0.5  # measured 0.31 here (3 subjects x 16 slices; 1 mm model, dihedral test-time augmentation)


def test_shipped_model_beats_a_linear_mr_to_hu_fit(capsys: pytest.CaptureFixture[str]) -> None:
    """The HU bound is computed from a naive baseline on the same held-out phantoms, never typed in.
    The shipped weights run with 8 views here (56.7 HU on the report set against 54.4 with the card's
    32): 48 slices with 32 views are 3 minutes of fp32 forwards on 2 cores without bf16."""
    model = load_model(default_model_path()).with_views("dihedral")
    quality = evaluate(model, subjects=3, slices=16)
    print(f"shipped model: MAE {quality.mae_hu} HU, linear baseline {quality.baseline_mae_hu} HU, PSNR {quality.psnr_db} dB, SSIM {quality.ssim}")
    assert quality.mae_hu <= BASELINE_FRACTION * quality.baseline_mae_hu
    assert quality.mae_by_tissue["air"] < 50  # the background stays air


TINY = ["--steps-per-epoch", "2", "--batch-size", "2", "--subjects-per-pool", "2", "--image-size", "64", "--threads", "1"]


def _database(folder: Path) -> dict[str, str]:
    """The environment of a `mr2ct train` that records into a SQLite database of its own in ``folder``."""
    return {**os.environ, "MR2CT_DATABASE_URL": f"sqlite:///{folder / 'mr2ct.db'}"}


def _runs(folder: Path) -> list[TrainingRun]:
    from sqlalchemy import select

    from dicom_node.db import init_db

    with init_db(f"sqlite:///{folder / 'mr2ct.db'}")() as session:
        return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id)))


def _train(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(out), *TINY, *args],
                          capture_output=True, text=True, timeout=timeout, env=_database(out.parent))


@pytest.mark.parametrize("extra", [[], ["--ema-decay", "0.7"]], ids=["last-weights", "ema"])
def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path: Path, extra: list[str]) -> None:
    straight = _train(tmp_path / "straight", "--epochs", "2", "--seed", "3", *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = _train(tmp_path / "resumed", "--epochs", "1", "--seed", "3", *extra)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _train(tmp_path / "resumed", "--epochs", "2", "--seed", "3", "--resume", *extra)
    assert second.returncode == 0, second.stderr[-2000:]
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert a == b
    with open(tmp_path / "resumed" / "losses.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]


def test_ema_exports_the_average_of_the_generator_weights_not_the_last_ones(tmp_path: Path) -> None:
    result = _train(tmp_path / "run", "--epochs", "2", "--ema-decay", "0.7", "--checkpoint-every", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_model(tmp_path / "run" / "model.safetensors")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    exported = model.generator.state_dict()
    averaged, last = state["ema_g_ab"], state["nets"]["g_ab"]
    assert all(torch.equal(exported[k].float(), averaged[k].float()) for k in averaged)
    moved = [k for k in last if last[k].is_floating_point() and not torch.equal(last[k], averaged[k])]
    assert moved, "the average equals the last weights: it was never averaged"
    assert model.card["training"]["exported_weights"] == "exponential moving average, decay 0.7"


def test_resume_refuses_a_checkpoint_made_with_other_parameters(tmp_path: Path) -> None:
    assert _train(tmp_path / "run", "--epochs", "1").returncode == 0
    refused = _train(tmp_path / "run", "--epochs", "2", "--lambda-ABA", "5", "--resume")
    assert refused.returncode == 2 and "lambda_ABA" in refused.stderr


def test_the_structure_loss_sees_moved_edges_not_contrast() -> None:
    """MIND compares where edges are, whichever side is bright: an MR slice and its own CT read
    closer than the same CT moved by 2 mm; an image and its contrast inversion read the same."""
    from synthesis.normalize import hu_to_unit
    from training.trainer import mind_loss, mr_to_unit

    grid = phantoms.axial_grid(4, 128, 1.0, 30.0)
    labels = phantoms.head_labels(11, grid)
    mr = torch.from_numpy(mr_to_unit(phantoms.render_mr(labels, grid, 11))[:, None]).float()
    ct = torch.from_numpy(hu_to_unit(phantoms.render_ct(labels, grid, 11), (-1024.0, 2048.0))[:, None]).float()
    aligned = mind_loss(mr, ct).item()
    for moved in (torch.roll(ct, 2, dims=3), torch.roll(ct, -2, dims=2)):
        assert mind_loss(mr, moved).item() > 1.05 * aligned
    assert mind_loss(ct, -ct).item() < 1e-6 < mind_loss(ct, torch.roll(ct, 1, dims=3)).item()


def test_init_from_fine_tunes_another_run_on_another_grid_and_refuses_other_shapes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    assert _train(tmp_path / "base", "--epochs", "1", "--seed", "3").returncode == 0
    # Learning rates 0: the fine-tuned model must be exactly the base's generator, whatever the grid.
    tuned = _train(tmp_path / "tuned", "--epochs", "1", "--seed", "4", "--pixel-spacing", "4.0", "--lr-G", "0", "--lr-D", "0",
                   "--init-from", str(tmp_path / "base"))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    base, fine = load_file(tmp_path / "base" / "model.safetensors"), load_file(tmp_path / "tuned" / "model.safetensors")
    assert base.keys() == fine.keys() and all(torch.equal(base[k], fine[k]) for k in base)
    source = load_model(tmp_path / "tuned" / "model.safetensors").card["training"]["initialized_from"]
    assert source["networks"] == ["d_a", "d_b", "g_ab", "g_ba"] and source["path"].endswith("checkpoint.pt")
    # From a model file only the MR->CT generator comes; a fresh seed's run differs from it elsewhere.
    from_model = _train(tmp_path / "from-model", "--epochs", "1", "--init-from", str(tmp_path / "base" / "model.safetensors"))
    assert from_model.returncode == 0, from_model.stderr[-2000:]
    assert load_model(tmp_path / "from-model" / "model.safetensors").card["training"]["initialized_from"]["networks"] == ["g_ab"]
    refused = _train(tmp_path / "other", "--epochs", "1", "--ngf", "8", "--init-from", str(tmp_path / "base"))
    assert refused.returncode == 2 and "another architecture" in refused.stderr and "--ngf" in refused.stderr
    missing = _train(tmp_path / "none", "--epochs", "1", "--init-from", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "--init-from" in missing.stderr


@pytest.mark.parametrize("args", [
    ["--adversarial-loss", "wgan-gp"],
    ["--adversarial-loss", "bce", "--discriminator", "paper", "--cycle-loss", "mse"],
    ["--generator", "unet", "--identity-weight", "0.5", "--lr-decay-start", "1", "--generator-iterations", "2", "--discriminator-iterations", "2"],
    ["--precision", "bf16", "--d-layers", "4", "--structure-weight", "5"],
    ["--generator", "fcn", "--adversarial-loss", "bce", "--discriminator", "paper"],  # the paper's set-up throughout
])
def test_loss_and_architecture_options_train_to_a_loadable_model(tmp_path: Path, args: list[str]) -> None:
    result = _train(tmp_path / "run", "--epochs", "2", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_model(tmp_path / "run" / "model.safetensors")
    with open(tmp_path / "run" / "losses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["G_loss"]) == float(r["G_loss"]) for r in rows)  # finite, not NaN
    assert model.card["training"]["config"]["adversarial_loss"] in ("lsgan", "bce", "wgan-gp")
    assert model.card["architecture"] == model.card["training"]["config"]["generator"]
    if "bf16" in args:  # said where the CPU only emulates bf16 (far slower than fp32), not where it is native
        from synthesis.infer import cpu_has_bf16

        assert ("bf16 on a device without native bf16" in result.stderr) == (not cpu_has_bf16())


def test_ctrl_c_saves_a_checkpoint_figures_on_demand_and_resume_finishes(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    # Ctrl-C as in a terminal: a suite started in the background (`cmd &` without job control) hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(out), *TINY, "--epochs", "500",
                             "--checkpoint-every", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_database(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "losses.csv").exists():
        time.sleep(0.5)
    while time.monotonic() < deadline and len((out / "losses.csv").read_text().splitlines()) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists()
    assert not (out / "samples.png").exists()
    (stopped,) = _runs(tmp_path)
    assert stopped.state == "interrupted" and stopped.epochs_completed >= 1 and stopped.model_sha256 is None
    # Figures on demand for the stopped run: losses so far and samples from its checkpoint.
    early = _figures_cli(out, "--out", str(tmp_path / "early"))
    assert early.returncode == 0, early.stderr[-2000:]
    assert early.stdout.split() == [str(tmp_path / "early" / "losses.png"), str(tmp_path / "early" / "samples.png")]
    finished = _train(out, "--epochs", "3", "--resume", "--checkpoint-every", "0")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert load_model(out / "model.safetensors").card["training"]["epochs_completed"] == 3
    (resumed,) = _runs(tmp_path)  # the same run goes on
    assert (resumed.id, resumed.state, [e["epoch"] for e in resumed.losses]) == (stopped.id, "finished", [1, 2, 3])
    # Drawn from the final checkpoint, the samples are the run's own end-of-run grid; from the early one, not.
    final = _figures_cli(out, "--out", str(tmp_path / "final"))
    assert final.returncode == 0, final.stderr[-2000:]
    from matplotlib.image import imread

    own, on_demand, before = (imread(p) for p in (out / "samples.png", tmp_path / "final" / "samples.png", tmp_path / "early" / "samples.png"))
    assert own.shape == on_demand.shape == before.shape
    assert abs(own - on_demand).max() < 0.02 < abs(own - before).max()


def _figures_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "figures", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_figures_on_demand_say_what_they_cannot_draw(tmp_path: Path) -> None:
    empty = _figures_cli(tmp_path)
    assert empty.returncode == 2 and "no losses.csv" in empty.stderr
    # A run whose first epochs are logged but which has not checkpointed yet: the losses, not the samples.
    (tmp_path / "losses.csv").write_text("epoch," + ",".join(LOSS_NAMES) + ",seconds\n1," + ",".join("0.5" for _ in LOSS_NAMES) + ",1.0\n")
    losses_only = _figures_cli(tmp_path)
    assert losses_only.returncode == 0, losses_only.stderr
    assert losses_only.stdout.split() == [str(tmp_path / "losses.png")] and "no checkpoint.pt" in losses_only.stderr
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    broken = _figures_cli(tmp_path)
    assert broken.returncode == 2 and "not a training checkpoint" in broken.stderr


def test_torchrun_trains_with_two_cpu_processes(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "dicom_node.cli", "train", "--out", str(out), *TINY, "--epochs", "1"],
        capture_output=True, text=True, timeout=600, env=_database(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs(tmp_path)  # rank 0 records the run, once
    assert run.state == "finished" and run.epochs_completed == 1
    card = load_model(out / "model.safetensors").card
    assert card["training"]["world_size"] == 2
    assert (out / "rank0-weights.sha256").read_text() == (out / "rank1-weights.sha256").read_text()


def test_evaluation_numbers_come_from_the_images() -> None:
    import numpy as np

    from training.evaluate import held_out, score
    from synthesis.normalize import mr_to_unit

    mr, ct, labels = held_out(1, 4, 128, 2.0)
    mr_unit = np.stack([mr_to_unit(m) for m in mr])[0]
    perfect = score(ct[0], ct[0], mr_unit, labels[0], 1)
    assert perfect.mae_hu == 0.0 and perfect.ssim == 1.0
    shifted = score(ct[0] + 50.0, ct[0], mr_unit, labels[0], 1)
    assert shifted.mae_hu == pytest.approx(50.0, abs=0.01)
    assert shifted.psnr_db < 100 and shifted.mae_by_tissue["white matter"] == pytest.approx(50.0, abs=0.1)
    # Bias tells a level wrong everywhere (bone too dim) from errors of both signs (edges, noise).
    bone = labels[0] == phantoms.CORTICAL
    dim_bone = score(np.where(bone, ct[0] - 300.0, ct[0]), ct[0], mr_unit, labels[0], 1)
    assert dim_bone.bias_by_tissue["cortical bone"] == pytest.approx(-300.0, abs=0.1) == -dim_bone.mae_by_tissue["cortical bone"]
    assert dim_bone.bias_by_tissue["white matter"] == 0.0
    checker = np.where(np.indices(ct[0].shape).sum(axis=0) % 2 == 0, 80.0, -80.0)
    scattered = score(ct[0] + checker, ct[0], mr_unit, labels[0], 1)
    assert scattered.mae_by_tissue["white matter"] == pytest.approx(80.0, abs=0.1)
    assert abs(scattered.bias_by_tissue["white matter"]) < 5.0
    assert scattered.mae_level_removed_by_tissue["white matter"] == pytest.approx(80.0, abs=5.0)  # no level to take away
    # Two heads, the second's bone 300 HU too dim: a per-head level, which the "no level" MAE takes away
    # (only the first head's untouched, zero error is left), while MAE and bias read half of it.
    mr2, ct2, labels2 = held_out(2, 4, 128, 2.0)
    mr2_unit = np.stack([mr_to_unit(m) for m in mr2])
    second_dim = np.where((labels2 == phantoms.CORTICAL) & (np.arange(2)[:, None, None, None] == 1), ct2 - 300.0, ct2)
    per_head = score(second_dim.reshape(8, 128, 128), ct2.reshape(8, 128, 128), mr2_unit.reshape(8, 128, 128), labels2.reshape(8, 128, 128), 2)
    share = (labels2[1] == phantoms.CORTICAL).sum() / (labels2 == phantoms.CORTICAL).sum()
    assert per_head.bias_by_tissue["cortical bone"] == pytest.approx(-300.0 * share, abs=0.1) == -per_head.mae_by_tissue["cortical bone"]
    assert per_head.mae_level_removed_by_tissue["cortical bone"] == 0.0
    assert per_head.mae_level_removed_by_tissue.keys() == per_head.mae_by_tissue.keys()
    # Per head: the first untouched, the second off by 300 HU on its share of the body.
    body_share = (labels2[1] == phantoms.CORTICAL).sum() / (labels2[1] != phantoms.AIR).sum()
    assert per_head.mae_by_subject[0] == 0.0 and per_head.mae_by_subject[1] == pytest.approx(300.0 * body_share, abs=0.01)
    assert shifted.mae_by_subject == [shifted.mae_hu]


def test_the_ratio_to_the_bound_comes_with_its_spread_over_the_heads() -> None:
    """The paired goal is a ratio of two pooled MAEs on a few heads; how far it moves with the heads
    drawn is computed from the same heads' errors: a model twice the bound on every head has no
    spread, one that is far worse on one head spans the ratios the heads allow, around the pooled one."""
    import numpy as np

    from synthesis.normalize import mr_to_unit
    from training.evaluate import held_out, linear_figures, paired_figures, ratio_interval, score

    mr, ct, labels = held_out(3, 4, 96, 2.5)
    flat = [a.reshape(-1, 96, 96) for a in (ct, np.stack([mr_to_unit(m) for m in mr]), labels)]

    def scored_with(errors: list[float]):
        off = np.concatenate([np.full((4, 96, 96), e) for e in errors])
        return score(flat[0] + off, flat[0], flat[1], flat[2], 3)

    bound = scored_with([30.0, 30.0, 30.0])
    even = scored_with([60.0, 60.0, 60.0])
    assert paired_figures(bound, even)["mae_over_paired_interval"] == [2.0, 2.0]
    uneven = scored_with([60.0, 240.0, 60.0])
    low, high = ratio_interval(uneven.mae_by_subject, bound.mae_by_subject, uneven.voxels_by_subject)
    pooled = uneven.mae_hu / bound.mae_hu
    assert 2.0 <= low < pooled < high <= 8.0
    figures = paired_figures(bound, uneven)
    assert figures["mae_over_paired"] == pytest.approx(pooled, abs=0.001) and figures["mae_over_paired_interval"] == [low, high]
    one_head = score(flat[0][:4] + 60.0, flat[0][:4], flat[1][:4], flat[2][:4], 1)
    assert paired_figures(score(flat[0][:4] + 30.0, flat[0][:4], flat[1][:4], flat[2][:4], 1), one_head)["mae_over_paired_interval"] is None
    assert paired_figures(None, uneven)["mae_over_paired_interval"] is None
    # The linear baseline's line is fitted on all three heads; each head's share of its error pools back to its MAE.
    linear = linear_figures(uneven)
    pooled_linear = sum(m * n for m, n in zip(uneven.baseline_mae_by_subject, uneven.voxels_by_subject)) / sum(uneven.voxels_by_subject)
    assert pooled_linear == pytest.approx(uneven.baseline_mae_hu, abs=0.01)
    assert linear["mae_over_linear"] == pytest.approx(uneven.mae_hu / uneven.baseline_mae_hu, abs=0.001)
    assert linear["mae_over_linear_interval"][0] <= linear["mae_over_linear"] <= linear["mae_over_linear_interval"][1]


def test_the_grid_floor_is_zero_on_the_mr_grid_and_grows_with_coarser_grids() -> None:
    """The floor is computed from the ground truth: a model on the MR's own 1 mm grid loses only its
    HU range; a 2 mm and a 4 mm grid lose the thin skull, more the coarser."""
    import numpy as np
    from torch import nn

    from synthesis.model_file import LoadedModel
    from synthesis.normalize import mr_to_unit
    from training.evaluate import grid_round_trip, held_out, mae

    mr, ct, labels = held_out(1, 4, 128, 1.0)
    mr_unit = np.stack([mr_to_unit(m) for m in mr])
    body = labels != 0
    floors = {}
    for spacing in (1.0, 2.0, 4.0):
        model = LoadedModel(nn.Identity(), {"pixel_spacing_mm": spacing, "hu_range": [-1024.0, 3071.0]}, Path("unused"))
        floors[spacing] = mae(grid_round_trip(ct, mr_unit, 1.0, model), ct, body)
    assert floors[1.0] < 0.01
    assert 20 < floors[2.0] < floors[4.0]


def test_held_out_subjects_are_the_same_heads_whatever_the_set() -> None:
    """`mr2ct evaluate --first-subject 100` scores four other heads; subject k is the same head in every set."""
    import numpy as np

    from training.evaluate import held_out

    mr_two, ct_two, _ = held_out(2, 3, 64, 2.0)
    mr_second, ct_second, _ = held_out(1, 3, 64, 2.0, first_subject=1)
    assert np.array_equal(mr_two[1], mr_second[0]) and np.array_equal(ct_two[1], ct_second[0])
    assert not np.array_equal(mr_two[0], mr_second[0])


def test_evaluate_cli_writes_json_and_a_panel(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--json", "--subjects", "2", "--slices", "4",
                             "--panel", str(tmp_path / "panel.png"), "--paired-steps", "3", "--test-time-augmentation", "dihedral"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"mae_hu", "psnr_db", "ssim", "mae_paired_hu", "mae_linear_hu"} <= set(report)
    assert report["mae_paired_hu"] > 0 and 0 <= report["grid_floor_mae_hu"] < report["mae_hu"]
    assert report["mae_paired_by_tissue"].keys() == report["mae_by_tissue"].keys() == report["bias_by_tissue"].keys()
    assert report["mae_over_linear_interval"][0] <= report["mae_over_linear"] <= report["mae_over_linear_interval"][1]
    low, high = report["mae_over_paired_interval"]  # two heads: the ratio's spread over them
    assert report["mae_over_paired"] == pytest.approx(report["mae_hu"] / report["mae_paired_hu"], abs=0.001)
    assert low <= report["mae_over_paired"] <= high
    assert (tmp_path / "panel.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_says_where_and_in_which_precision_it_ran_and_naming_them_gives_the_same_figures() -> None:
    """`mr2ct evaluate` runs where the node would (a CUDA GPU when torch sees one; bf16 where the
    device runs it natively): its report names the device and the precision, so a figure taken on a
    CPU with AVX-512 BF16 (bf16) is not read as one taken in fp32, and naming them again elsewhere
    gives the same figures. A GPU asked for where there is none is refused, naming --device."""

    def cli(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--json", "--subjects", "2", "--slices", "2",
                               "--test-time-augmentation", "none", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    auto = cli()
    assert auto["device"].startswith("cuda" if torch.cuda.is_available() else "cpu (") and auto["precision"] in ("fp32", "bf16", "fp16")
    named = cli("--device", auto["device"].split()[0], "--precision", auto["precision"])
    assert (named["device"], named["precision"]) == (auto["device"], auto["precision"])
    assert (named["mae_hu"], named["mae_by_subject"], named["ssim"]) == (auto["mae_hu"], auto["mae_by_subject"], auto["ssim"])
    fp32 = auto if auto["precision"] == "fp32" else cli("--precision", "fp32")
    assert fp32["precision"] == "fp32" and abs(fp32["mae_hu"] - auto["mae_hu"]) < 2.0  # the node's bf16 bound: within 2 HU
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--device", "cuda"],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "--device: device is 'cuda' but torch sees no CUDA GPU" in refused.stderr


def test_evaluate_keeps_the_paired_bound_and_reuses_it_for_the_same_recipe(tmp_path: Path) -> None:
    """`--paired-cache`: the first run trains the bound and keeps it; the second (other views, same
    architecture and steps) takes it from there, and the bound then scores as a freshly trained one
    run with those views would; another step count trains its own."""
    from dataclasses import replace

    from training.evaluate import paired_upper_bound

    cache = tmp_path / "bounds"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--subjects", "1", "--slices", "2",
                               "--paired-cache", str(cache), *args], capture_output=True, text=True, timeout=300)

    first = cli("--paired-steps", "3", "--test-time-augmentation", "dihedral")  # 8 views: the bound's key is architecture and steps
    assert first.returncode == 0, first.stderr
    assert "trained before" not in first.stdout and len(list(cache.glob("paired-bound-*.safetensors"))) == 1
    second = cli("--paired-steps", "3", "--test-time-augmentation", "none")
    assert second.returncode == 0, second.stderr
    assert "paired supervised upper bound: the one trained before" in second.stdout
    shipped = load_model(default_model_path())
    fresh = evaluate(replace(paired_upper_bound(shipped, 3), card={**shipped.card, "test_time_augmentation": "none"}), subjects=1, slices=2)
    assert abs(json.loads(second.stdout.strip().splitlines()[-1])["mae_paired_hu"] - fresh.mae_hu) < 0.05
    assert cli("--paired-steps", "4", "--test-time-augmentation", "none").returncode == 0
    assert len(list(cache.glob("paired-bound-*.safetensors"))) == 2
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--paired-cache", str(cache)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--paired-cache goes with --paired-steps" in refused.stderr


def test_train_evaluate_and_figures_refuse_what_they_cannot_do_before_they_load_torch(tmp_path: Path) -> None:
    """A mistyped path, a card that belongs to other weights, a parameter out of range or flags that
    do not go together are refused with the reason, before torch is imported and a model built (a
    fraction of a second, not the seconds those take)."""
    shipped = default_model_path()
    other = tmp_path / "other.safetensors"
    shutil.copy(shipped, other)
    other.with_suffix(".json").write_text(json.dumps({**json.loads(shipped.with_suffix(".json").read_text()), "sha256": "0" * 64}))
    (tmp_path / "pairs").mkdir()
    cases = {
        ("evaluate", tmp_path / "no-such.safetensors"): "no-such.safetensors not found; give a .safetensors file",
        ("evaluate", other): "card other.json says 000000000000...: the card belongs to other weights",
        ("evaluate", "--test-time-augmentation", "rot45"): "--test-time-augmentation must be one of none, mirror",
        ("evaluate", "--against", shipped): "--against goes with --pairs",
        ("evaluate", "--pairs", tmp_path / "pairs", "--record"): "--record and --paired-steps belong to the phantom evaluation",
        ("evaluate", "--pairs", tmp_path / "pairs", "--against", tmp_path / "typo"): "--against: model weights",
        ("evaluate", "--pairs", tmp_path / "pairs", "--registry", "--label", "x" * 129): "--label is 129 characters long",
        ("evaluate", "--pairs", tmp_path / "pairs"): "no MR series in",
        ("evaluate", "--pairs", tmp_path / "no-such-folder"): "error: --pairs:",
        ("evaluate", "--device", "tpu"): "--device must be auto, cpu or cuda, got 'tpu'",
        ("evaluate", "--precision", "fp8"): "--precision must be auto, fp32, bf16 or fp16, got 'fp8'",
        ("figures", tmp_path): "has no losses.csv: not a training run folder",
        ("train", "--out", tmp_path / "run", "--epochs", "0"): "epochs must be >= 1, got 0",
        ("train", "--out", tmp_path / "run", "--preset", "pix2pix"): "unknown preset 'pix2pix'",
        ("train", "--out", tmp_path / "run", "--data", tmp_path / "pairs"): "is not a dataset cache of `mr2ct pull`",
    }
    for args, reason in cases.items():
        refused, loaded = cli_with_imports(*args)
        assert refused.returncode == 2 and reason in refused.stderr, (args, refused.stderr[-2000:])
        assert "torch" not in loaded, (args, loaded)


def test_a_few_training_steps_reduce_the_cycle_loss_and_the_card_holds_metrics(tmp_path: Path) -> None:
    result = _train(tmp_path / "run", "--epochs", "3", "--steps-per-epoch", "6", "--seed", "11")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "run" / "losses.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["reconstruction_loss"]) < float(rows[0]["reconstruction_loss"])
    metrics = load_model(tmp_path / "run" / "model.safetensors").card["metrics"]
    assert metrics["mae_hu"] > 0 and metrics["mae_linear_hu"] > 0


def test_evaluate_record_puts_the_evaluation_into_the_card_and_keeps_the_weights(tmp_path: Path) -> None:
    """After a change of views the card's figures are stale; `mr2ct evaluate --record` replaces them
    with what the model scores as its card runs it, and the card keeps the replaced ones."""
    shipped = default_model_path()
    weights = tmp_path / "model.safetensors"
    shutil.copy(shipped, weights)
    shutil.copy(shipped.with_suffix(".json"), weights.with_suffix(".json"))
    before = load_model(weights).card

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", str(weights), "--json", "--subjects", "1",
                               "--slices", "2", *args], capture_output=True, text=True, timeout=300)

    refused = cli("--record", "--test-time-augmentation", "none" if before["test_time_augmentation"] != "none" else "mirror")
    assert refused.returncode == 2 and "--record scores the model as its card runs it" in refused.stderr
    assert load_model(weights).card == before

    done = cli("--record")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    after = load_model(weights)  # the card still belongs to the weights
    assert after.sha256 == before["sha256"]
    metrics = after.card["metrics"]
    assert metrics["mae_hu"] == report["mae_hu"] and metrics["mae_linear_hu"] == report["mae_linear_hu"]
    assert (metrics["test_time_augmentation"], metrics["held_out_subjects"], metrics["slices_per_subject"]) == (
        before["test_time_augmentation"], 1, 2)
    assert (metrics["device"], metrics["precision"]) == (report["device"], report["precision"])  # the figure with how it ran
    assert after.card["card_changes"][-1]["metrics_replaced"] == before["metrics"]


def test_a_training_run_whose_database_does_not_open_stops_before_training_and_no_record_trains(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the database's folder should be")
    env = {**os.environ, "MR2CT_DATABASE_URL": f"sqlite:///{blocked / 'mr2ct.db'}"}
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(tmp_path / "run"), *TINY, "--epochs", "1"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "database_url" in refused.stderr and "--no-record" in refused.stderr
    assert not (tmp_path / "run" / "losses.csv").exists()
    trained = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(tmp_path / "run"), *TINY, "--epochs", "1", "--no-record"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_mistyped_data_or_out_path_stops_training_before_a_run_is_recorded_or_a_folder_made(tmp_path: Path) -> None:
    """`--data` must be a cache `mr2ct pull` made, and `--out` a folder: neither mistake leaves a
    failed run in the database, nor a new folder (with a salt) where the cache was expected."""
    wrong = _train(tmp_path / "run", "--epochs", "1", "--data", str(tmp_path / "no-such-cache"))
    assert wrong.returncode == 2 and "--data" in wrong.stderr and "is not a dataset cache of `mr2ct pull`" in wrong.stderr
    assert not (tmp_path / "no-such-cache").exists() and not (tmp_path / "run").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    refused = _train(a_file, "--epochs", "1")
    assert refused.returncode == 2 and f"--out: {a_file} is a file, not a folder" in refused.stderr
    assert not (tmp_path / "mr2ct.db").exists()  # stopped before the run's database was opened


def test_an_output_path_that_cannot_be_written_stops_the_command_before_its_work(tmp_path: Path) -> None:
    """A panel, a statement or figures written where a file stands in the way is refused at once,
    naming the option, not after the evaluation (a traceback that threw the scores away)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cli = [sys.executable, "-m", "dicom_node.cli"]
    for args, said in (
        (["evaluate", "--subjects", "1", "--slices", "1", "--panel", str(a_file / "panel.png")], f"--panel: {a_file} is a file, not a folder"),
        (["evaluate", "--subjects", "1", "--slices", "1", "--panel", str(tmp_path)], f"--panel: {tmp_path} is a folder; give a file name"),
        (["conformance", "--output", str(a_file / "conformance.md")], f"--output: {a_file} is a file, not a folder"),
        (["figures", str(tmp_path), "--out", str(a_file)], f"--out: {a_file} is a file, not a folder"),
    ):
        refused = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120, env=_database(tmp_path))
        assert refused.returncode == 2 and said in refused.stderr, (args, refused.stderr[-2000:])
        assert "Traceback" not in refused.stderr
    panel = tmp_path / "new" / "folder" / "panel.png"  # a folder that is not there yet is made
    made = subprocess.run([*cli, "evaluate", "--subjects", "1", "--slices", "1", "--test-time-augmentation", "none", "--panel", str(panel)],
                          capture_output=True, text=True, timeout=300, env=_database(tmp_path))
    assert made.returncode == 0, made.stderr[-2000:]
    assert panel.stat().st_size > 0


def test_phantom_commands_refuse_a_spacing_that_is_not_positive(tmp_path: Path) -> None:
    """Zero or negative spacing was a division by zero (sample-mr) or DICOM with a negative Pixel
    Spacing (phantoms): both refused, naming the option, nothing written."""
    cli = [sys.executable, "-m", "dicom_node.cli"]
    for args in (["sample-mr", "--out", str(tmp_path / "s"), "--pixel-spacing", "0"], ["sample-mr", "--out", str(tmp_path / "s"), "--slice-spacing", "-3"],
                 ["phantoms", "--out", str(tmp_path / "p"), "--pixel-spacing", "-2"]):
        refused = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and args[-2] in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()


def test_ctrl_c_during_a_database_write_arrives_right_after_it() -> None:
    """The run's database writes hold Ctrl-C back (a KeyboardInterrupt inside SQLAlchemy or sqlite3
    could leave the database locked); it still stops the run, at the next step."""
    import signal

    from dicom_node.training_runs import uninterrupted

    reached = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when the suite runs in the background
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("the write finished")
            reached.append("not reached")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached == ["the write finished"]


def _on_a_terminal(args: list[str], columns: int, env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a pseudo-terminal ``columns`` wide (0: one
    nobody sized, as `docker exec -t` and `kubectl exec -t` give); its exit code and all it wrote."""
    import fcntl
    import select
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other end has closed it
                    break
                if not chunk:
                    break
                written += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, written.decode(errors="replace")


@pytest.mark.parametrize("columns", [0, 100], ids=["unsized-terminal", "sized-terminal"])
def test_training_on_a_terminal_shows_its_progress_bars_with_losses_even_when_the_terminal_says_it_has_no_width(
        tmp_path: Path, columns: int) -> None:
    code, shown = _on_a_terminal([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(tmp_path / "run"), *TINY, "--epochs", "2",
                                  "--no-record"], columns, _database(tmp_path))
    assert code == 0, shown[-2000:]
    assert "phantoms: 100%" in shown and "2/2" in shown
    for epoch in ("epoch 1/2: 100%", "epoch 2/2: 100%"):
        assert epoch in shown, shown[-2000:]
    assert "G=" in shown and "D=" in shown and "rec=" in shown  # the losses ride on the bar
    drawn = [line for line in shown.replace("\r", "\n").splitlines() if "epoch 2/2: 100%" in line]
    assert max(len(line) for line in drawn) <= (columns or 80)  # as wide as the terminal, or 80 where it says 0


def test_a_training_run_s_epochs_the_database_missed_are_written_with_the_next_it_takes(tmp_path: Path, caplog) -> None:
    """`mr2ct train` records each epoch's losses in the run's row; an epoch that ends while the
    database is away is written with the next one it takes (or with the run's end), so the run's
    row and its loss plot have no gap."""
    import logging

    from dicom_node.db import init_db
    from dicom_node.models import TrainingRun
    from dicom_node.training_runs import RunRecorder

    home = tmp_path / "db"
    home.mkdir()
    sessions = init_db(f"sqlite:///{home / 'db.sqlite'}")
    recorder = RunRecorder(sessions)
    run_id = recorder.start(tmp_path / "run", "mr2ct train", {"epochs": 5})
    recorder.epoch(1, {"G_loss": 1.0}, 2.0)
    home.rename(tmp_path / "away")
    sessions.kw["bind"].dispose()
    with caplog.at_level(logging.INFO, logger="dicom_node.training_runs"):
        recorder.epoch(2, {"G_loss": 0.5}, 2.0)
        recorder.epoch(3, {"G_loss": 0.25}, 2.0)
        (tmp_path / "away").rename(home)
        recorder.epoch(4, {"G_loss": 0.125}, 2.0)
        home.rename(tmp_path / "away")
        sessions.kw["bind"].dispose()
        recorder.epoch(5, {"G_loss": 0.0625}, 2.0)
        (tmp_path / "away").rename(home)
        recorder.end("finished")
    with sessions() as session:
        row = session.get(TrainingRun, run_id)
        assert [e["epoch"] for e in row.losses] == [1, 2, 3, 4, 5] and row.epochs_completed == 5
        assert [e["G_loss"] for e in row.losses] == [1.0, 0.5, 0.25, 0.125, 0.0625] and row.state == "finished"
    assert caplog.text.count("did not take an update") == 1  # warned once per run
    assert "took the 2 epoch(s) it had missed" in caplog.text
