"""Fine-tune search: chains of short `mr2ct train --init-from` stages, kept by a validation set.

GAN stages are noisy: the same settings from the same start end several HU apart with another
seed (another draw of phantom subjects and batches). This recipe runs several chains side by
side from one start (a run folder or checkpoint with all four networks), scores every stage on
held-out phantoms that are *not* the sets the model is reported on (the validation set:
first subject 200), and lets a chain go on from a stage only if it beat its parent there. At the
end the best stages by validation are scored on the report sets (0, 100) too; search.json holds
every stage, search.png shows the chains. Each set is 12 heads by default: 4 proved too few to
pick by (a CPU search of 2026-12-01 kept stages whose validation gain did not carry over).
"Beat" is judged head by head (``--keep-rule paired``, the default since 2026-12-07): a stage is
kept when its pooled validation MAE is below its parent's and stays below in at least
``--keep-confidence`` of the draws of the validation heads (``training.evaluate.share_better``,
the same heads for both); a gain that one lucky head carries while the others got worse is not
kept. ``--keep-rule pooled`` keeps any stage whose pooled MAE is lower, as before.

Made for a GPU (the chains share it; each stage is a subprocess); on CPU it works, slowly.
The model shipped on 2026-11-30 came out of its first form on one H200 (the same selection, with
each chain's settings written into the script; here every chain takes the flags): 6 chains with
mixed settings (plain, learning rate 2e-5, batch 8, EMA 0.995) for 8 minutes, then 12 more EMA
stages from the best; the EMA chain won, so EMA 0.995 is the default (README, "The shipped model"). A stage's card records its own command, and the
run folders hold each stage's checkpoint for the next.

    .venv/bin/python training/recipes/finetune_search.py --start runs/ft-mix/b --minutes 30 \
        [--work runs/finetune-search] [--chains 6] [--ema-decay 0.995] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@dataclass
class Stage:
    name: str
    chain: int
    parent: str
    seed: int
    seconds: float = 0.0
    validation_mae_hu: float | None = None
    parent_validation_mae_hu: float | None = None
    validation_mae_by_subject: list[float] = field(default_factory=list)
    # The share of draws of the validation heads in which this stage's pooled MAE is below its parent's.
    better_than_parent_share: float | None = None
    kept: bool = False
    error: str = ""
    report: dict = field(default_factory=dict)


def stage_command(args: argparse.Namespace, out: Path, parent: Path, seed: int, device: torch.device) -> list[str]:
    """A stage's `mr2ct train`: bf16 forwards where the device runs bf16 natively, fp32 elsewhere
    (an AVX2 CPU emulates bf16 at a small fraction of its fp32 speed)."""
    from synthesis.infer import native_bf16

    precision = "bf16" if native_bf16(device) else "fp32"
    return [sys.executable, "-m", "dicom_node.cli", "train", "--no-record",
            "--out", str(out), "--init-from", str(parent), "--seed", str(seed), "--device", device.type,
            "--precision", precision, "--checkpoint-every", "0", "--pixel-spacing", str(args.pixel_spacing),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
            "--lr-decay-start", str(args.lr_decay_start), "--lr-G", str(args.lr), "--lr-D", str(args.lr),
            "--lambda-ABA", str(args.cycle_lambda), "--lambda-BAB", str(args.cycle_lambda),
            "--structure-weight", str(args.structure_weight), "--batch-size", str(args.batch_size),
            "--ema-decay", str(args.ema_decay), "--subjects-per-pool", str(args.subjects_per_pool),
            "--test-time-augmentation", args.test_time_augmentation, "--threads", str(args.threads)]


class Search:
    def __init__(self, args: argparse.Namespace) -> None:
        from synthesis.infer import choose_device

        self.args = args
        try:
            self.device = choose_device(args.device).device  # the stages train on the same device
        except ValueError as exc:
            raise SystemExit(f"--device: {exc}") from exc
        self.scoring = threading.Lock()  # one evaluation at a time: they share the device with the stages
        self.stages: list[Stage] = []
        self.durations: list[float] = []

    def score(self, model: Path, first_subject: int) -> dict:
        """Every model of the search (the start, whatever its card says, and each stage) scored
        with the same views, ``--test-time-augmentation``: a stage is compared with its parent, not
        with more views."""
        from synthesis.model_file import load_model
        from training.evaluate import evaluate

        loaded = load_model(model).with_views(self.args.test_time_augmentation)
        with self.scoring:
            q = evaluate(loaded, subjects=self.args.validation_subjects, slices=self.args.slices,
                         device=self.device, first_subject=first_subject)
        return {"mae_hu": q.mae_hu, "psnr_db": q.psnr_db, "ssim": q.ssim, "mae_by_subject": q.mae_by_subject,
                "voxels_by_subject": q.voxels_by_subject}

    def keeps(self, scores: dict, parent: dict) -> tuple[bool, float | None]:
        """Whether a stage scored ``scores`` on the validation heads goes on in place of its parent
        (``--keep-rule``), and the share of draws of the heads in which it is the better of the two."""
        from training.evaluate import share_better

        share = share_better(scores["mae_by_subject"], parent["mae_by_subject"], scores["voxels_by_subject"])
        better = scores["mae_hu"] < parent["mae_hu"]
        if self.args.keep_rule == "pooled" or share is None:
            return better, share
        return better and share >= self.args.keep_confidence, share

    def chain(self, index: int, start: Path, start_scores: dict, deadline: float) -> None:
        a = self.args
        parent, parent_scores, parent_name = start, start_scores, "start"
        for k in range(1, 10_000):
            expected = max(self.durations, default=a.first_stage_estimate_s)
            if time.time() + expected > deadline:
                return
            stage = Stage(f"chain{index}-{k}", index, parent_name, a.seed_base + 100 * index + k)
            out = a.work / stage.name
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(out / "train.log", "w") as log:
                proc = subprocess.Popen(stage_command(a, out, parent, stage.seed, self.device), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
                while proc.poll() is None:
                    if time.time() > deadline + a.grace_s:
                        proc.kill()
                        proc.wait()
                        return
                    time.sleep(0.5)
            stage.seconds = round(time.time() - t0, 1)
            self.stages.append(stage)
            if proc.returncode != 0 or not (out / "model.safetensors").exists():
                stage.error = f"exit {proc.returncode}: " + (out / "train.log").read_text()[-800:]
                print(f"{stage.name}: failed ({stage.error.splitlines()[0]}); see {out / 'train.log'}", file=sys.stderr)
                return
            self.durations.append(stage.seconds)
            scores = self.score(out / "model.safetensors", a.validation_subject)
            stage.validation_mae_hu, stage.validation_mae_by_subject = scores["mae_hu"], scores["mae_by_subject"]
            stage.parent_validation_mae_hu = parent_scores["mae_hu"]
            stage.kept, stage.better_than_parent_share = self.keeps(scores, parent_scores)
            share = "" if stage.better_than_parent_share is None else f", better in {stage.better_than_parent_share:.0%} of draws of the heads"
            print(f"{stage.name} (from {parent_name}, seed {stage.seed}, {stage.seconds:.0f} s): validation {stage.validation_mae_hu} HU "
                  f"vs {parent_scores['mae_hu']}{share} -> {'kept' if stage.kept else 'dropped'}", file=sys.stderr, flush=True)
            if stage.kept:
                parent, parent_scores, parent_name = out, scores, stage.name

    def run(self) -> dict:
        a = self.args
        a.work.mkdir(parents=True, exist_ok=True)
        start_model = a.start / "model.safetensors" if a.start.is_dir() else a.start_model
        if start_model is None or not start_model.exists():
            raise SystemExit(f"--start-model: the start's model file is needed to score it (not found next to {a.start})")
        deadline = time.time() + a.minutes * 60
        start = {"validation": self.score(start_model, a.validation_subject)}
        print(f"start {start_model}: validation {start['validation']['mae_hu']} HU on {self.device}", file=sys.stderr, flush=True)
        threads = [threading.Thread(target=self.chain, args=(i, a.start, start["validation"], deadline)) for i in range(a.chains)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        scored = sorted((s for s in self.stages if s.validation_mae_hu is not None), key=lambda s: s.validation_mae_hu)
        for first in a.report_subjects:
            start[f"report_{first}"] = self.score(start_model, first)
        for s in scored[: a.top]:
            s.report = {str(first): self.score(a.work / s.name / "model.safetensors", first) for first in a.report_subjects}
        from synthesis.infer import precision_name, resolve_precision

        # the precision the scores were taken in (bf16 where the device runs it natively): report figures of fp32 runs differ a little
        result = {"start": str(a.start), "device": str(self.device), "precision": precision_name(resolve_precision("auto", self.device)),
                  "validation_first_subject": a.validation_subject,
                  "report_first_subjects": a.report_subjects, "start_scores": start,
                  "best": scored[0].name if scored else None, "stages": [asdict(s) for s in self.stages]}
        (a.work / "search.json").write_text(json.dumps(result, indent=1))
        plot(self.stages, start["validation"]["mae_hu"], a.work / "search.png")
        return result


def plot(stages: list[Stage], start_mae: float, path: Path) -> None:
    """Validation MAE of every stage by its place in its chain, a colour per chain, kept stages filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(start_mae, color="grey", linestyle="--", label=f"start ({start_mae} HU)")
    for chain in sorted({s.chain for s in stages}):
        mine = [s for s in stages if s.chain == chain and s.validation_mae_hu is not None]
        ax.scatter(range(1, len(mine) + 1), [s.validation_mae_hu for s in mine], marker="o",
                   facecolors=["C%d" % chain if s.kept else "none" for s in mine], edgecolors="C%d" % chain, label=f"chain {chain}")
    ax.set_xlabel("stage of the chain (filled: kept)")
    ax.set_ylabel("validation MAE (HU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", type=Path, required=True, help="run folder (checkpoint.pt with all four networks, model.safetensors) or a checkpoint")
    p.add_argument("--start-model", type=Path, help="the start's model file, when --start is a checkpoint file")
    p.add_argument("--work", type=Path, default=ROOT / "runs/finetune-search")
    p.add_argument("--minutes", type=float, required=True, help="no stage is started that would end after this")
    p.add_argument("--chains", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per stage")
    p.add_argument("--validation-subject", type=int, default=200, help="first held-out subject of the validation set")
    p.add_argument("--validation-subjects", type=int, default=12,
                   help="heads per scored set (validation and report sets alike). 12: on 4 heads a stage's 1-1.5 HU "
                        "gain did not carry over to the report set (2026-12-01, a CPU search; head-by-head ratios to "
                        "the paired bound spread 1.08-1.92x over 16 heads)")
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--keep-rule", choices=["paired", "pooled"], default="paired",
                   help="paired: a stage is kept when its pooled validation MAE is below its parent's and stays below in at least "
                        "--keep-confidence of the draws of the validation heads; pooled: whenever its pooled MAE is below")
    p.add_argument("--keep-confidence", type=float, default=0.9, help="the share of draws of the heads a kept stage must win (paired rule)")
    p.add_argument("--report-subjects", type=lambda s: [int(x) for x in s.split(",")], default=[0, 100])
    p.add_argument("--top", type=int, default=3, help="stages scored on the report sets")
    p.add_argument("--seed-base", type=int, default=300)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--lr-decay-start", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--cycle-lambda", type=float, default=40.0)
    p.add_argument("--structure-weight", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--subjects-per-pool", type=int, default=40)
    p.add_argument("--pixel-spacing", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--test-time-augmentation", default="dihedral", help="the views every model of the search is scored with "
                   "(the start's card may say more: the shipped card's 32 views score ~2 HU better than its 8)")
    p.add_argument("--first-stage-estimate-s", type=float, default=90.0, help="how long a stage is taken to last until one has")
    p.add_argument("--grace-s", type=float, default=60.0, help="a stage still running this long after the deadline is stopped")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if not 0 < args.keep_confidence <= 1:
        p.error(f"--keep-confidence: {args.keep_confidence} is not a share in (0, 1]")
    result = Search(args).run()
    if result["best"] is None:
        failed = [s["name"] for s in result["stages"] if s["error"]]
        raise SystemExit(f"no stage was scored ({len(failed)} failed: {', '.join(failed) or 'none started before --minutes'}); "
                         "see each stage's train.log")
    print(json.dumps({"best": result["best"], "stages": len(result["stages"]),
                      "start_validation_mae_hu": result["start_scores"]["validation"]["mae_hu"],
                      "best_validation_mae_hu": next(s["validation_mae_hu"] for s in result["stages"] if s["name"] == result["best"])}))


if __name__ == "__main__":
    main()
