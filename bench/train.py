"""Training throughput: images/s of the `paper` and `zhu2017` presets through `training.trainer`
(its data pipeline, pools, logging, progress) as a ratio to a bare PyTorch loop of the same
networks and losses fed from memory, in the same run.

Last line: one JSON object with paper_over_bare, zhu2017_over_bare (and the images/s).
On a CPU the presets' batch sizes are heavy; --paper-batch and --zhu-size scale them down
(the ratio compares like with like).

    .venv/bin/python bench/train.py [--steps 3] [--paper-batch 16] [--zhu-size 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthesis.networks import PaperDiscriminator, PatchDiscriminator, ResnetGenerator  # noqa: E402
from training.trainer import PRESETS, TrainConfig, train  # noqa: E402


def trainer_rate(cfg: TrainConfig, work: Path) -> float:
    """images/s over the last epoch of a 2-epoch run (the first warms up)."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    train(cfg, out, command="bench", device="cpu")
    with open(out / "losses.csv") as fh:
        seconds = [float(r["seconds"]) for r in csv.DictReader(fh)]
    return cfg.steps_per_epoch * cfg.batch_size / (seconds[-1] - seconds[-2])


def bare_rate(cfg: TrainConfig, steps: int) -> float:
    """The same networks, losses and optimiser steps on random tensors already in memory."""
    torch.manual_seed(0)
    g_ab, g_ba = ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks), ResnetGenerator(ngf=cfg.ngf, n_blocks=cfg.n_blocks)
    make_d = (lambda: PaperDiscriminator(ndf=cfg.ndf)) if cfg.discriminator == "paper" else (lambda: PatchDiscriminator(ndf=cfg.ndf))
    d_a, d_b = make_d(), make_d()
    opt_g = torch.optim.Adam(list(g_ab.parameters()) + list(g_ba.parameters()), lr=cfg.lr_G, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=cfg.lr_D, betas=(cfg.beta1, cfg.beta2))
    adv = nn.MSELoss() if cfg.adversarial_loss == "lsgan" else nn.BCEWithLogitsLoss()
    l1 = nn.L1Loss()
    size = cfg.crop_size or cfg.image_size
    a, b = torch.rand(cfg.batch_size, 1, size, size) * 2 - 1, torch.rand(cfg.batch_size, 1, size, size) * 2 - 1

    def step() -> None:
        fake_b, fake_a = g_ab(a), g_ba(b)
        pb, pa = d_b(fake_b), d_a(fake_a)
        loss = adv(pb, torch.ones_like(pb)) + adv(pa, torch.ones_like(pa)) + 10 * (l1(g_ba(fake_b), a) + l1(g_ab(fake_a), b))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        ra, fa, rb, fb = d_a(a), d_a(fake_a.detach()), d_b(b), d_b(fake_b.detach())
        loss_d = 0.5 * (adv(ra, torch.ones_like(ra)) + adv(fa, torch.zeros_like(fa)) + adv(rb, torch.ones_like(rb)) + adv(fb, torch.zeros_like(fb)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * cfg.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--paper-batch", type=int, default=16)
    parser.add_argument("--zhu-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    configs = {
        "paper": replace(PRESETS["paper"], batch_size=args.paper_batch, epochs=2, steps_per_epoch=args.steps, subjects_per_pool=2, checkpoint_every=0),
        "zhu2017": replace(PRESETS["zhu2017"], image_size=args.zhu_size, pixel_spacing_mm=256 / args.zhu_size, epochs=2,
                           steps_per_epoch=args.steps, subjects_per_pool=2, lr_decay_start=None, checkpoint_every=0),
    }
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-train-"))
    result: dict[str, float] = {}
    try:
        for name, cfg in configs.items():
            through_trainer = trainer_rate(cfg, work)
            bare = bare_rate(cfg, args.steps)
            result[f"{name}_over_bare"] = round(through_trainer / bare, 3)
            result[f"{name}_images_per_s"] = round(through_trainer, 2)
            result[f"{name}_bare_images_per_s"] = round(bare, 2)
            print(f"{name:8s} batch {cfg.batch_size:3d} at {cfg.image_size}px: trainer {through_trainer:6.2f} images/s, bare {bare:6.2f} -> {through_trainer / bare:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
