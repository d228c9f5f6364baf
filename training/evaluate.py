"""Honest quality numbers: MAE (HU, inside the body), PSNR and SSIM of a model's sCT against
ground-truth CT on held-out paired phantom subjects, next to a naive baseline (a linear
MR-to-HU fit made on the very same data, which flatters the baseline, not the model)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from synthesis.errors import ModelMismatch, SeriesNotUsable
from synthesis.infer import synthesize, synthesize_volume
from synthesis.model_file import LoadedModel, load_model, save_model
from synthesis.normalize import HU_MAX, HU_MIN, mr_to_unit
from training import phantoms

HELD_OUT_SEED_BASE = 90_000_000  # far from every seed the trainer uses
DATA_RANGE = HU_MAX - HU_MIN


def mae(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(prediction[mask] - truth[mask]).mean())


def psnr(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((prediction[mask] - truth[mask]) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(DATA_RANGE**2 / mse))


def ssim(prediction: np.ndarray, truth: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM over slices (Gaussian window, Wang et al. 2004 constants, HU data range)."""
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    scores = []
    for p, t in zip(prediction.astype(np.float64), truth.astype(np.float64)):
        mu_p, mu_t = ndimage.gaussian_filter(p, sigma), ndimage.gaussian_filter(t, sigma)
        var_p = ndimage.gaussian_filter(p * p, sigma) - mu_p**2
        var_t = ndimage.gaussian_filter(t * t, sigma) - mu_t**2
        cov = ndimage.gaussian_filter(p * t, sigma) - mu_p * mu_t
        s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


@dataclass(frozen=True)
class Quality:
    subjects: int
    slices: int
    mae_hu: float
    psnr_db: float
    ssim: float
    baseline_mae_hu: float
    baseline_psnr_db: float
    mae_by_tissue: dict[str, float]
    # Mean signed error (sCT - CT) per tissue: a large bias next to its MAE is a level the model
    # gets wrong everywhere (e.g. cortical bone too dim), a small one means errors of both signs (edges, noise).
    bias_by_tissue: dict[str, float]
    # The MAE each tissue would keep if every head's own mean error in it were taken away: what no
    # per-head level correction can fix (edges, misplaced layers, noise). Next to the MAE it splits a
    # tissue's error into a level (e.g. one head's bone denser than the model assumes) and its shape.
    mae_level_removed_by_tissue: dict[str, float]
    grid_floor_mae_hu: float | None = None  # the ground-truth CT taken to the model grid and back: a practical floor for that grid
    # Each head's (or pair's) own MAE, in order: how far the pooled figure moves from one head to the
    # next, i.e. how much a difference of a few HU between two models on 4 heads can be trusted.
    mae_by_subject: list[float] = field(default_factory=list)
    # The body voxels each head's MAE is taken over: what pools the heads again when they are resampled.
    voxels_by_subject: list[int] = field(default_factory=list)
    # The linear baseline's MAE on each head (the one line fitted on all of them).
    baseline_mae_by_subject: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def card_metrics(self, test_time_augmentation: str, slices_per_subject: int, first_subject: int = 0,
                     paired: Quality | None = None, paired_steps: int | None = None) -> dict[str, Any]:
        """The figures a model card keeps as its ``metrics`` (the trainer's export, ``mr2ct evaluate --record``)."""
        figures = self.as_dict()
        held_out, linear = figures.pop("subjects"), figures.pop("baseline_mae_hu")
        return {**figures, "held_out_subjects": held_out, "mae_linear_hu": linear, **linear_figures(self), **paired_figures(paired, self),
                "paired_steps": paired_steps or None, "test_time_augmentation": test_time_augmentation,
                "first_subject": first_subject, "slices_per_subject": slices_per_subject}


def paired_figures(paired: Quality | None, model: Quality) -> dict[str, Any]:
    """The paired upper bound's figures as the JSON report and a card's metrics name them (None: not
    computed): its MAE, the model's over it, and that ratio's interval over the heads (``ratio_interval``)."""
    ratio = round(model.mae_hu / paired.mae_hu, 3) if paired and paired.mae_hu else None
    same_heads = paired is not None and list(paired.voxels_by_subject) == list(model.voxels_by_subject)
    return {"mae_paired_hu": paired.mae_hu if paired else None, "mae_paired_by_tissue": paired.mae_by_tissue if paired else None,
            "mae_paired_by_subject": paired.mae_by_subject if paired else None, "mae_over_paired": ratio,
            "mae_over_paired_interval": ratio_interval(model.mae_by_subject, paired.mae_by_subject, model.voxels_by_subject)
            if paired and same_heads else None}


def linear_figures(model: Quality) -> dict[str, Any]:
    """The model's MAE over the linear baseline's and that ratio's interval over the heads (the
    line stays the one fitted on all of them: a draw does not fit it again)."""
    return {"mae_over_linear": round(model.mae_hu / model.baseline_mae_hu, 3) if model.baseline_mae_hu else None,
            "mae_over_linear_interval": ratio_interval(model.mae_by_subject, model.baseline_mae_by_subject, model.voxels_by_subject)}


RATIO_LEVEL = 0.95  # the share of resampled ratios ``ratio_interval`` spans


def ratio_interval(mae_by_subject: list[float], other_by_subject: list[float], voxels_by_subject: list[int], resamples: int = 10_000,
                   seed: int = 0) -> list[float] | None:
    """How far the model's pooled MAE over another's (the paired bound or the linear baseline,
    scored on the same heads) moves with the heads drawn: the central 95 % of that ratio over
    ``resamples`` draws of as many heads as were scored, with replacement, the same draw for both
    (a percentile bootstrap over heads, the unit that varies: each phantom head has its own anatomy
    and bone density). Each draw pools the drawn heads' absolute errors as the MAE pools them (a
    head's MAE times its body voxels). With four heads it is rough (35 distinct draws), yet it says
    whether a difference between a ratio and a goal such as 1.3 is one the set can tell. None with
    fewer than two heads, or figures not of the same heads."""
    ratios = _resampled_ratios(mae_by_subject, other_by_subject, voxels_by_subject, resamples, seed)
    if ratios is None or len(mae_by_subject) < 2:
        return None
    tail = (1 - RATIO_LEVEL) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return [round(float(low), 3), round(float(high), 3)]


def share_better(mae_by_subject: list[float], other_by_subject: list[float], voxels_by_subject: list[int], resamples: int = 10_000,
                 seed: int = 0) -> float | None:
    """The share of draws of the heads (as ``ratio_interval`` draws them, the same heads for both)
    in which the pooled MAE is below the other's: how sure a set of heads is that one model beats
    another, where the pooled figures alone would take a gain carried by one lucky head (one head
    much better, the rest worse) for a gain. 1.0 or 0.0 with a single head. None when the figures
    are not of the same heads."""
    ratios = _resampled_ratios(mae_by_subject, other_by_subject, voxels_by_subject, resamples, seed)
    return None if ratios is None else round(float((ratios < 1.0).mean()), 4)


def _resampled_ratios(mae_by_subject: list[float], other_by_subject: list[float], voxels_by_subject: list[int], resamples: int,
                      seed: int) -> np.ndarray | None:
    m, b = np.asarray(mae_by_subject, dtype=np.float64), np.asarray(other_by_subject, dtype=np.float64)
    n = np.asarray(voxels_by_subject, dtype=np.float64)
    if len(m) < 1 or len(b) != len(m) or len(n) != len(m) or not (b > 0).all():
        return None
    draws = np.random.default_rng(seed).integers(0, len(m), size=(resamples, len(m)))
    return (m[draws] * n[draws]).sum(axis=1) / (b[draws] * n[draws]).sum(axis=1)


@dataclass(frozen=True)
class Scored:
    """What scoring needs of one head (or one patient's pair), without its whole volumes (a
    cohort of patients need not fit in memory at once): the body's voxels, each tissue's errors,
    and the SSIM of its slices. Made by ``scored``."""

    pred: np.ndarray  # sCT inside the body, HU (1-D)
    truth: np.ndarray  # CT inside the body, HU
    mr_unit: np.ndarray  # the normalised MR inside the body, which the linear baseline is fitted on
    errors_by_class: list[np.ndarray]  # sCT - CT of each tissue's voxels, in the order of the names
    ssim_sum: float  # SSIM summed over the slices
    slices: int


def scored(pred: np.ndarray, truth: np.ndarray, mr_unit: np.ndarray, classes: np.ndarray, body: np.ndarray, classes_count: int) -> Scored:
    """Reduce one set's volumes (slices, rows, columns) to what ``score_sets`` needs. ``classes``
    indexes the tissue names (-1: in no tissue row); ``body`` is where MAE, PSNR and the baseline are taken."""
    error = pred - truth
    return Scored(pred[body], truth[body], mr_unit[body], [error[classes == i] for i in range(classes_count)],
                  float(ssim(pred, truth) * len(pred)), len(pred))


def score_sets(sets: list[Scored], names: list[str]) -> Quality:
    """Score sCTs against their ground-truth CTs (pure: numbers come from the images only). MAE
    and PSNR pool the body voxels of every set; SSIM is the mean over all slices; per tissue, the
    "no level" MAE takes each set's own mean error away."""
    mr_body = np.concatenate([s.mr_unit for s in sets])
    truth_body = np.concatenate([s.truth for s in sets])
    pred_body = np.concatenate([s.pred for s in sets])
    # Naive baseline: least-squares line from normalised MR to HU, fitted inside the body of this very data.
    slope, intercept = np.polyfit(mr_body, truth_body, 1)
    baseline = np.clip(slope * mr_body + intercept, HU_MIN, HU_MAX)
    ends = np.cumsum([len(s.truth) for s in sets])[:-1]  # where each set's voxels end in the pooled arrays
    everywhere = np.ones(len(truth_body), dtype=bool)
    slices = sum(s.slices for s in sets)
    by_tissue, bias, level_removed = {}, {}, {}
    for i, name in enumerate(names):
        errors = [s.errors_by_class[i] for s in sets]
        if any(len(e) for e in errors):
            error = np.concatenate(errors)
            by_tissue[name], bias[name] = round(float(np.abs(error).mean()), 1), round(float(error.mean()), 1)
            spread = [e - e.mean() for e in errors if len(e)]
            level_removed[name] = round(float(np.abs(np.concatenate(spread)).mean()), 1)
    return Quality(
        subjects=len(sets), slices=slices, mae_hu=round(mae(pred_body, truth_body, everywhere), 2),
        psnr_db=round(psnr(pred_body, truth_body, everywhere), 2),
        ssim=round(sum(s.ssim_sum for s in sets) / slices, 4),
        baseline_mae_hu=round(mae(baseline, truth_body, everywhere), 2),
        baseline_psnr_db=round(psnr(baseline, truth_body, everywhere), 2), mae_by_tissue=by_tissue, bias_by_tissue=bias,
        mae_level_removed_by_tissue=level_removed,
        mae_by_subject=[round(mae(s.pred, s.truth, np.ones(len(s.truth), dtype=bool)), 2) for s in sets],
        voxels_by_subject=[len(s.truth) for s in sets],
        baseline_mae_by_subject=[round(float(np.abs(b - t).mean()), 2) for b, t in zip(np.split(baseline, ends), np.split(truth_body, ends))],
    )


def score(pred: np.ndarray, truth: np.ndarray, mr_unit: np.ndarray, labels: np.ndarray, subjects: int) -> Quality:
    """Score phantom heads stacked along slices (the same number each), by their tissue labels."""
    heads = []
    for h in range(subjects):
        p, t, m, lab = (a.reshape(subjects, -1, *a.shape[1:])[h] for a in (pred, truth, mr_unit, labels))
        heads.append(scored(p, t, m, lab, lab != phantoms.AIR, len(phantoms.TISSUE_NAMES)))
    return score_sets(heads, phantoms.TISSUE_NAMES)


def held_out(subjects: int, slices: int, size: int, pixel_spacing: float, first_subject: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired held-out phantoms ``first_subject`` .. ``first_subject + subjects - 1``: (MR stored
    values, CT in HU, labels), subjects stacked along slices. Subject k is always the same head,
    so sets with other first subjects are disjoint (a second set to confirm what was chosen on the first)."""
    mrs, cts, labels = [], [], []
    for s in range(first_subject, first_subject + subjects):
        seed = HELD_OUT_SEED_BASE + s
        grid = phantoms.axial_grid(slices, size, pixel_spacing, 120.0 / slices)
        lab = phantoms.head_labels(seed, grid)
        mrs.append(phantoms.mr_to_stored(phantoms.render_mr(lab, grid, seed)).astype(np.float32))
        cts.append(phantoms.render_ct(lab, grid, seed))
        labels.append(lab)
    return np.stack(mrs), np.stack(cts), np.stack(labels)


def evaluate(model: LoadedModel, subjects: int = 4, slices: int = 24, size: int = 256, pixel_spacing: float = 1.0,
             device: torch.device | None = None, panel: Any = None, first_subject: int = 0, precision: str = "auto") -> Quality:
    """Run the model on held-out paired phantoms (MR and CT of the same anatomy) and score it;
    optionally write a PNG panel (MR, CT, sCT, error map). ``precision``: as the node's setting
    (``synthesis.infer.resolve_precision``; auto: bf16 where ``device`` runs it natively)."""
    device = device or torch.device("cpu")
    mr, ct, lab = held_out(subjects, slices, size, pixel_spacing, first_subject)
    pred = np.stack([synthesize(m, (pixel_spacing, pixel_spacing), model, device, batch_size=8, precision=precision) for m in mr])
    mr_unit = np.stack([mr_to_unit(m) for m in mr])
    quality = score(pred.reshape(-1, size, size), ct.reshape(-1, size, size), mr_unit.reshape(-1, size, size), lab.reshape(-1, size, size), subjects)
    floor = grid_round_trip(ct, mr_unit, pixel_spacing, model)
    quality = replace(quality, grid_floor_mae_hu=round(mae(floor, ct, lab != phantoms.AIR), 2))
    if panel is not None:
        from training.figures import error_panel

        middle = slices // 2
        error_panel(mr_unit[0, middle], ct[0, middle], pred[0, middle], panel)
    return quality


# Tissue classes on a patient's CT (no labels there): HU bands of the ground truth, as sCT papers report them.
CT_BANDS = (("air", -np.inf, -200.0), ("soft tissue", -200.0, 250.0), ("bone", 250.0, np.inf))


@dataclass(frozen=True)
class PairResult:
    """One patient's pair in a ``--pairs`` evaluation (series named by UID: no patient identifiers)."""

    mr_series_uid: str
    ct_series_uid: str
    slices: int
    body_voxels: int
    ct_coverage: float  # share of the MR's voxels the CT reaches
    mae_hu: float
    registration: str | None = None  # the spatial registration series relating the two frames (None: one frame)


def evaluate_pairs(models: list[LoadedModel], pairs: list[Any], device: torch.device | None = None, panel: Any = None,
                   on_skip: Any = None, precision: str = "auto") -> list[tuple[Quality, list[PairResult]]]:
    """Run each model on each MR series of ``pairs`` (``training.pairs.PairFiles``, each read once)
    exactly as the node does, and score the sCT against the CT resampled onto the MR's voxels,
    inside the body. Tissue rows are the CT's HU bands (``CT_BANDS``). Outside the body both images
    read -1000 HU for SSIM, so the couch and what the CT does not reach do not count. A pair that
    cannot be read or matched is passed to ``on_skip(pair, reason)`` and left out. The panel shows
    the first model. One (quality, per-pair results) per model, in order."""
    from training.pairs import load

    device = device or torch.device("cpu")
    sets: list[list[Scored]] = [[] for _ in models]
    results: list[list[PairResult]] = [[] for _ in models]
    floors: list[list[np.ndarray]] = [[] for _ in models]
    shown = None
    for pair in pairs:
        try:
            loaded = load(pair)
        except SeriesNotUsable as exc:
            if on_skip is None:
                raise
            on_skip(pair, str(exc))
            continue
        volume = loaded.mr.volume
        truth = np.where(loaded.body, np.nan_to_num(loaded.ct_hu, nan=-1000.0), -1000.0).astype(np.float32)
        classes = np.where(loaded.body, np.digitize(truth, [high for _, _, high in CT_BANDS[:-1]]), -1)
        coverage = round(float(np.mean(~np.isnan(loaded.ct_hu))), 3)
        mr_unit = mr_to_unit(volume.voxels)  # what the baseline is fitted on and the floor is guided by, as for phantoms
        for m, model in enumerate(models):
            pred, reslice, _plane = synthesize_volume(volume, model, device, batch_size=8, precision=precision)  # in the plane the node would use
            pred = np.where(loaded.body, pred, -1000.0).astype(np.float32)
            sets[m].append(scored(pred, truth, mr_unit, classes, loaded.body, len(CT_BANDS)))
            if reslice is None:
                floor = grid_round_trip(truth[None], mr_unit[None], volume.pixel_spacing, model)[0]
            else:
                floor = reslice.back(grid_round_trip(reslice.forward(truth)[None], reslice.forward(mr_unit)[None], reslice.pixel_spacing, model)[0])
            floors[m].append(np.abs(floor - truth)[loaded.body])
            results[m].append(PairResult(pair.mr.series_uid, pair.ct.series_uid, len(pred), int(loaded.body.sum()), coverage,
                                         round(mae(pred, truth, loaded.body), 2), pair.registration))
            if m == 0 and shown is None:
                k = int(np.argmax(loaded.body.sum(axis=(1, 2))))  # the slice with the most body
                shown = (mr_unit[k], truth[k], pred[k])
    if not sets[0]:
        raise SeriesNotUsable("no pair could be scored")
    if panel is not None and shown is not None:
        from training.figures import error_panel

        error_panel(*shown, panel)
    names = [name for name, _, _ in CT_BANDS]
    return [(replace(score_sets(s, names), grid_floor_mae_hu=round(float(np.concatenate(f).mean()), 2)), r)
            for s, f, r in zip(sets, floors, results)]


def compare_pairs(model: list[PairResult], other: list[PairResult]) -> dict[str, Any]:
    """Per-pair MAE of a model against another on the same pairs: how many pairs it is better on,
    the median difference, and the Wilcoxon signed-rank test's two-sided p (None below 6 pairs,
    where no difference can reach p < 0.05)."""
    from scipy.stats import wilcoxon

    differences = np.array([a.mae_hu - b.mae_hu for a, b in zip(model, other)])
    p = None
    if len(differences) >= 6:
        p = 1.0 if not differences.any() else round(float(wilcoxon(differences).pvalue), 4)
    return {"pairs": len(differences), "better_on_pairs": int((differences < 0).sum()), "worse_on_pairs": int((differences > 0).sum()),
            "median_difference_hu": round(float(np.median(differences)), 2), "wilcoxon_p": p}


def grid_round_trip(ct: np.ndarray, mr_unit: np.ndarray, pixel_spacing: float | tuple[float, float], model: LoadedModel) -> np.ndarray:
    """The ground-truth CT (subjects, slices, rows, cols) as a perfect model on ``model``'s grid
    would deliver it: taken to the grid and back to the MR matrix the way inference goes back,
    within the model's HU range."""
    from synthesis.infer import to_grid, model_grid, to_mr_matrix
    from synthesis.normalize import hu_to_unit, unit_to_hu

    out = np.empty_like(ct)
    for s, (truth, guide) in enumerate(zip(ct, mr_unit)):
        spacing = pixel_spacing if isinstance(pixel_spacing, tuple) else (pixel_spacing, pixel_spacing)
        grid = model_grid(truth.shape[-2:], spacing, model.pixel_spacing_mm)
        mr_t = torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float32))[:, None]
        ct_t = torch.from_numpy(hu_to_unit(truth, model.hu_range))[:, None]
        back = to_mr_matrix(mr_t, to_grid(mr_t, grid), to_grid(ct_t, grid)).clamp(-1.0, 1.0)
        out[s] = unit_to_hu(back[:, 0].numpy(), model.hu_range)
    return out


def _batch(slices: tuple[np.ndarray, ...]) -> torch.Tensor:
    """(batch, 1, rows, columns) with a channel stride of 1, as rows taken from a pool of slices
    (``pool[:, None][index]``) have: torch then runs the same (channels-last) kernels, so a bound
    trains to the same weights as when the whole pool was rendered first."""
    stacked = torch.from_numpy(np.stack(slices)).unsqueeze(1)
    rows, columns = stacked.shape[2:]
    return stacked.as_strided(stacked.shape, (rows * columns, 1, columns, 1))


def paired_upper_bound(model: LoadedModel, steps: int, batch_size: int = 4, seed: int = 0, subjects: int = 40,
                       progress: bool | None = None, device: torch.device | None = None) -> LoadedModel:
    """Train a generator of the same architecture and size, supervised (L1) on *paired* phantom
    slices at the model's grid, for ``steps`` steps: the upper bound an unpaired model should approach.
    It trains on ``device`` (None: the CPU) in fp32 and is returned on the CPU; the slices are
    rendered on the CPU either way (until 2026-12-08 it trained on the CPU whatever the host had:
    a 9,150-step bound took most of an hour beside an idle GPU)."""
    from synthesis.networks import build_generator
    from synthesis.normalize import hu_to_unit
    from synthesis.progress import progress_bar

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = int(model.card.get("input_size", 128))
    spacing = model.pixel_spacing_mm
    per_subject = 24
    grid = phantoms.axial_grid(per_subject, size, spacing, 150.0 / per_subject)
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair(index: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``index`` of the pool of all subjects' slices, its subject rendered when first
        drawn (a short run draws from a few of them; a long one renders them all)."""
        i, k = divmod(int(index), per_subject)
        if i not in rendered:
            subject = 50_000_000 + seed * 1000 + i  # paired training subjects, disjoint from the held-out set
            lab = phantoms.head_labels(subject, grid)
            rendered[i] = (mr_to_unit(phantoms.render_mr(lab, grid, subject)), hu_to_unit(phantoms.render_ct(lab, grid, subject), model.hu_range))
        return rendered[i][0][k], rendered[i][1][k]

    device = device or torch.device("cpu")
    generator = build_generator(model.card["architecture"], dict(model.card["parameters"])).to(device)
    optimiser = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss_fn = torch.nn.L1Loss()
    for _ in progress_bar(range(steps), desc="paired upper bound", show=progress):
        mr, ct = (_batch(half).to(device) for half in zip(*(pair(j) for j in rng.integers(0, subjects * per_subject, batch_size))))
        loss = loss_fn(generator(mr), ct)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    generator.cpu().eval()
    return LoadedModel(generator, {**model.card, "name": "paired-upper-bound"}, model.weights_path)


# The card keys a paired bound shares with the model it bounds (what shapes its training and inference).
_BOUND_CARD_KEYS = ("architecture", "parameters", "input_size", "pixel_spacing_mm", "hu_range", "normalization", "direction")


def _bound_card(model: LoadedModel) -> dict[str, Any]:
    return {k: model.card.get(k) for k in _BOUND_CARD_KEYS}


def paired_bound_recipe(model: LoadedModel, steps: int, batch_size: int = 4, seed: int = 0, subjects: int = 40) -> dict[str, Any]:
    """Everything that decides a paired bound's weights: the same recipe trains the same bound
    (up to the floating-point order of the device), so a stored one can stand in for it."""
    return {**_bound_card(model), "steps": steps, "batch_size": batch_size, "seed": seed,
            "subjects": subjects, "phantoms": phantoms.GENERATOR_VERSION, "optimiser": "Adam lr 2e-4 betas (0.5, 0.999), L1"}


def stored_paired_bound_path(cache: Path, recipe: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache) / f"paired-bound-{key}.safetensors"


def store_paired_bound(path: Path, generator: torch.nn.Module, model: LoadedModel, recipe: dict[str, Any]) -> None:
    save_model(path, generator, {**_bound_card(model), "name": "paired-upper-bound", "paired_bound": recipe, "test_time_augmentation": "none"})


def cached_paired_upper_bound(model: LoadedModel, steps: int, cache: Path | None = None, progress: bool | None = None,
                              device: torch.device | None = None) -> tuple[LoadedModel, bool]:
    """``paired_upper_bound``, kept in ``cache`` (a folder; None: not kept) under a name made from
    its recipe, and taken from there when the same recipe asks again: the bound of a 9,150-step
    model takes most of an hour on two CPU cores, and every model of the same architecture, grid
    and steps shares it. The returned bound runs with ``model``'s test-time views. Returns
    (bound, whether it came from the cache)."""
    if cache is None:
        return paired_upper_bound(model, steps, progress=progress, device=device), False
    recipe = paired_bound_recipe(model, steps)
    path = stored_paired_bound_path(cache, recipe)
    if path.exists():
        stored = load_model(path)
        if stored.card.get("paired_bound") != recipe:
            raise ModelMismatch(f"{path} holds a paired bound of another recipe; delete it to train it again")
        return LoadedModel(stored.generator, {**model.card, "name": "paired-upper-bound"}, path), True
    # Trained from the recipe's own figures, so the name it is kept under cannot drift from them.
    bound = paired_upper_bound(model, steps, batch_size=recipe["batch_size"], seed=recipe["seed"], subjects=recipe["subjects"], progress=progress,
                               device=device)
    store_paired_bound(path, bound.generator, model, recipe)
    return bound, False
