"""sCT quality by the plane the generator sees, against a peer in the same run.

The shipped model learnt axial slices. A 3D sagittal acquisition of a held-out phantom head is
synthesized as acquired (`synthesis_plane = "acquired"`) and as axial slices resliced from it
(`"axial"`; what `"auto"` does for a 3D series), and the same head acquired axially on the same
points is the peer: the plane the model knows. A 2D sagittal series with thick slices is run
both ways too (why `"auto"` leaves such a series as acquired), and the same head acquired tilted
(axial tilted 20 degrees about x and 10 about z, as an AC-PC aligned series is: the generator
sees it tilted, its slices nearest axial). MAE in HU inside the body, over
the whole head and over its middle (|z| <= 60 mm, the held-out evaluation's slab).

Last line: one JSON object with sagittal_acquired_mae_hu, sagittal_resliced_mae_hu,
axial_peer_mae_hu, resliced_over_acquired, thick_acquired_mae_hu, thick_resliced_mae_hu,
oblique_acquired_mae_hu, oblique_over_axial_peer.

    .venv/bin/python bench/plane.py [--heads 2] [--views dihedral] [--pixel-mm 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthesis.infer import synthesize_volume  # noqa: E402
from synthesis.model_file import TEST_TIME_AUGMENTATIONS, load_model  # noqa: E402
from synthesis.volume import Volume  # noqa: E402
from training import phantoms  # noqa: E402
from training.evaluate import HELD_OUT_SEED_BASE  # noqa: E402

MODEL = ROOT / "synthesis" / "models" / "mr2ct-phantom.safetensors"


def head(seed: int, grid: phantoms.Grid) -> tuple[Volume, np.ndarray, np.ndarray, np.ndarray]:
    """(MR volume, CT in HU, body mask, z of every voxel) of one phantom head on ``grid``."""
    labels = phantoms.head_labels(seed, grid)
    volume = grid.volume(phantoms.mr_to_stored(phantoms.render_mr(labels, grid, seed)))
    return volume, phantoms.render_ct(labels, grid, seed), labels != phantoms.AIR, grid.coordinates()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--views", default="dihedral", choices=TEST_TIME_AUGMENTATIONS, help="test-time augmentation (the card's: slower)")
    parser.add_argument("--pixel-mm", type=float, default=1.0, help="voxel size of the 3D series (isotropic; 1 mm: ~5 min on 2 cores)")
    parser.add_argument("--thick-mm", type=float, default=5.0, help="slice spacing of the 2D sagittal series")
    args = parser.parse_args()
    model = load_model(MODEL).with_views(args.views)
    device = torch.device("cpu")
    mm = args.pixel_mm
    fov = 240.0  # mm: the whole head in every direction
    n, thick_n = round(fov / mm), round(185.0 / args.thick_mm)
    grids = {
        "sagittal": phantoms.oriented_grid("sagittal", round(184.0 / mm), n, n, mm, mm),
        "axial": phantoms.oriented_grid("axial", n, n, round(184.0 / mm), mm, mm),  # the same points, in the model's plane
        "thick": phantoms.oriented_grid("sagittal", thick_n, n, n, mm, args.thick_mm),
        "oblique": phantoms.oriented_grid("oblique", round(184.0 / mm), n, n, mm, mm),
    }
    runs = {"sagittal_acquired": ("sagittal", "acquired"), "sagittal_resliced": ("sagittal", "axial"), "axial_peer": ("axial", "acquired"),
            "thick_acquired": ("thick", "acquired"), "thick_resliced": ("thick", "axial"), "oblique_acquired": ("oblique", "auto")}
    errors: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    middle: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    seconds: dict[str, float] = {name: 0.0 for name in runs}
    for h in range(args.heads):
        seed = HELD_OUT_SEED_BASE + h
        made = {name: head(seed, grid) for name, grid in grids.items()}
        for name, (grid_name, plane) in runs.items():
            volume, ct, body, z = made[grid_name]
            started = time.perf_counter()
            hu, _reslice, why = synthesize_volume(volume, model, device, plane, batch_size=8)
            seconds[name] += time.perf_counter() - started
            error = np.abs(hu - ct)
            errors[name].append(error[body])
            middle[name].append(error[body & (np.abs(z) <= 60.0)])
            print(f"head {h}: {name:18s} {why}: MAE {errors[name][-1].mean():.1f} HU, middle {middle[name][-1].mean():.1f} HU", flush=True)
    figures = {name: round(float(np.concatenate(errors[name]).mean()), 2) for name in runs}
    middles = {name: round(float(np.concatenate(middle[name]).mean()), 2) for name in runs}
    print(f"\n{'run':18s} {'MAE HU':>8s} {'middle':>8s} {'seconds':>8s}")
    for name in runs:
        print(f"{name:18s} {figures[name]:8.2f} {middles[name]:8.2f} {seconds[name]:8.1f}")
    print(f"\n{args.heads} heads, {args.views} views, 3D series at {mm:g} mm, 2D series {args.thick_mm:g} mm apart; "
          f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    print(json.dumps({
        "sagittal_acquired_mae_hu": figures["sagittal_acquired"], "sagittal_resliced_mae_hu": figures["sagittal_resliced"],
        "axial_peer_mae_hu": figures["axial_peer"],
        "resliced_over_acquired": round(figures["sagittal_resliced"] / figures["sagittal_acquired"], 3),
        "resliced_over_axial_peer": round(figures["sagittal_resliced"] / figures["axial_peer"], 3),
        "middle_mae_hu": middles,
        "thick_acquired_mae_hu": figures["thick_acquired"], "thick_resliced_mae_hu": figures["thick_resliced"],
        "oblique_acquired_mae_hu": figures["oblique_acquired"],
        "oblique_over_axial_peer": round(figures["oblique_acquired"] / figures["axial_peer"], 3),
        "views": args.views, "pixel_mm": mm, "thick_mm": args.thick_mm, "heads": args.heads,
    }))


if __name__ == "__main__":
    main()
