"""Figures people would rather look at than read: loss curves and MR/CT image grids (PNG)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def run_losses(run: Path) -> Path:
    """The ``losses.csv`` of a training run folder; ValueError when ``run`` is no run (yet)."""
    losses = run / "losses.csv"
    if not losses.is_file():
        raise ValueError(f"{run} has no losses.csv: not a training run folder, or its first epoch has not ended yet")
    return losses


def loss_plot(losses_csv: Path, out: Path) -> Path:
    """Losses of the paper's Table 2 over epochs, as the paper's figure 3."""
    with open(losses_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{losses_csv} has no epochs yet")
    return loss_curves(rows, out)


def loss_curves(rows: list[dict[str, Any]], out: Any, caption: str | None = None) -> Any:
    """The loss plot of ``rows`` (one per epoch: ``epoch`` and the Table 2 losses, as losses.csv
    or a training run in the database holds them) into a path or a binary file."""
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    groups = {
        "reconstruction (cycle)": ["ABA_reconstruction_loss", "BAB_reconstruction_loss", "reconstruction_loss"],
        "discriminators": ["DA_loss", "DB_loss", "D_loss"],
        "generators": ["G_AB_adversarial_loss", "G_BA_adversarial_loss", "G_loss"],
    }
    for ax, (title, names) in zip(axes, groups.items()):
        for name in names:
            ax.plot(epochs, [float(r[name]) for r in rows], label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if caption:
        fig.suptitle(caption)
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return out


def image_grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], out: Path, hu_window: tuple[float, float] = (-200, 1600)) -> Path:
    """Columns: real MR, real CT, synthetic CT, synthetic MR (as the paper's figure 4). MR in [-1, 1], CT in HU."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    titles = ["real MR", "real CT", "synthetic CT", "synthetic MR"]
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            is_ct = c in (1, 2)
            ax.imshow(image, cmap="gray", vmin=hu_window[0] if is_ct else -1, vmax=hu_window[1] if is_ct else 1)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c])
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return out


def mr_sct_preview(mr: np.ndarray, sct_hu: np.ndarray, out: Any) -> Any:
    """One MR slice next to its sCT in brain (40/80) and bone (600/2800) windows (a path or a binary file)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow(mr, cmap="gray")
    axes[0].set_title("MR")
    for ax, (name, centre, width) in zip(axes[1:], (("brain", 40, 80), ("bone", 600, 2800))):
        ax.imshow(sct_hu, cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2)
        ax.set_title(f"sCT ({name} {centre}/{width})")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return out


def error_panel(mr_unit: np.ndarray, ct_hu: np.ndarray, sct_hu: np.ndarray, out: Any) -> Any:
    """MR, ground-truth CT, sCT and the error map (sCT - CT, HU) of one slice."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].imshow(mr_unit, cmap="gray", vmin=-1, vmax=1)
    axes[0].set_title("MR")
    for ax, image, title in ((axes[1], ct_hu, "CT (ground truth)"), (axes[2], sct_hu, "sCT")):
        ax.imshow(image, cmap="gray", vmin=-200, vmax=1600)
        ax.set_title(title)
    error = axes[3].imshow(sct_hu - ct_hu, cmap="coolwarm", vmin=-500, vmax=500)
    axes[3].set_title("sCT - CT (HU)")
    fig.colorbar(error, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return out
