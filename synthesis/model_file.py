"""Model files: safetensors weights plus a JSON card that describes them.

``<name>.safetensors`` holds the generator's state dict; ``<name>.json`` (the
card) names the architecture and its parameters, the model grid (pixel
spacing), the MR normalisation, the HU range, how it was trained, and the
SHA-256 of the weights file. Loading refuses a card that does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from synthesis import default_model_path  # noqa: F401  (where callers have always found it)
from synthesis.errors import ModelMismatch
from synthesis.networks import build_generator

REQUIRED_CARD_KEYS = ("architecture", "parameters", "pixel_spacing_mm", "normalization", "hu_range", "sha256")
# Test-time augmentation (card key ``test_time_augmentation``, absent: "none"): the generator runs
# on these views of each slice and the outputs, mapped back, are averaged.
# mirror: identity, left-right, up-down, both (4 forwards); dihedral: those and their transposes (8);
# dihedral-shift: the dihedral views of the slice and of it moved by half the generator's stride
# along rows, columns and both (32): the generator's downsampling makes its output depend on where
# the image sits on its stride grid, and averaging over those offsets takes that pattern out.
TEST_TIME_AUGMENTATIONS = {"none": 1, "mirror": 4, "dihedral": 8, "dihedral-shift": 32}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_path_for(weights: Path) -> Path:
    return weights.with_suffix(".json")


@dataclass(frozen=True)
class LoadedModel:
    generator: nn.Module
    card: dict[str, Any]
    weights_path: Path

    @property
    def sha256(self) -> str:
        return str(self.card["sha256"])

    @property
    def short_digest(self) -> str:
        return self.sha256[:12]

    @property
    def hu_range(self) -> tuple[float, float]:
        lo, hi = self.card["hu_range"]
        return float(lo), float(hi)

    @property
    def pixel_spacing_mm(self) -> float:
        return float(self.card["pixel_spacing_mm"])

    @property
    def test_time_augmentation(self) -> str:
        return str(self.card.get("test_time_augmentation", "none"))

    def with_views(self, mode: str) -> "LoadedModel":
        """The same weights run with another test-time augmentation (``mode``), written into a copy
        of the card so that everything downstream (UIDs, derivation text, SR) says what was run."""
        if mode == self.test_time_augmentation:
            return self
        return replace(self, card={**self.card, "test_time_augmentation": mode})

    @property
    def output_key(self) -> str:
        """What decides the sCT's pixels besides the input: the weights, and the test-time
        augmentation when there is one (derived UIDs come from it)."""
        tta = self.test_time_augmentation
        return self.sha256 if tta == "none" else f"{self.sha256}+tta-{tta}"


def save_model(weights: Path, generator: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """Write weights and card; the card gets the weights' SHA-256. Returns the card written."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(weights))
    full = dict(card)
    full["sha256"] = sha256_of(weights)
    full["weights_file"] = weights.name
    card_path_for(weights).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def load_model(weights: Path) -> LoadedModel:
    """Load a generator from its weights file and card, checking one against the other."""
    weights = Path(weights)
    card_file = card_path_for(weights)
    if not weights.is_file():
        raise ModelMismatch(f"model weights {weights} not found; give a .safetensors file made by `mr2ct train`, with its .json card beside it")
    if not card_file.is_file():
        raise ModelMismatch(f"model card {card_file} not found next to {weights.name}; every model file needs its JSON card")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelMismatch(f"model card {card_file} is not valid JSON: {exc}") from exc
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ModelMismatch(f"model card {card_file} lacks {', '.join(missing)}")
    tta = card.get("test_time_augmentation", "none")
    if tta not in TEST_TIME_AUGMENTATIONS:
        raise ModelMismatch(
            f"model card {card_file} has test_time_augmentation {tta!r}; expected one of {', '.join(TEST_TIME_AUGMENTATIONS)}"
        )
    actual = sha256_of(weights)
    if actual != card["sha256"]:
        raise ModelMismatch(
            f"weights {weights.name} have SHA-256 {actual[:12]}..., but card {card_file.name} says "
            f"{str(card['sha256'])[:12]}...: the card belongs to other weights"
        )
    try:
        generator = build_generator(card["architecture"], dict(card["parameters"]))
        generator.load_state_dict(load_file(str(weights)), strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelMismatch(f"weights {weights.name} do not fit the architecture in {card_file.name}: {exc}") from exc
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return LoadedModel(generator=generator, card=card, weights_path=weights)


def set_test_time_augmentation(weights: Path, mode: str) -> dict[str, Any]:
    """Change the test-time augmentation a model's card asks inference for (weights untouched,
    so its SHA-256 stays); the card keeps a dated record of each change. Returns the new card."""
    if mode not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"test_time_augmentation must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, got {mode!r}")
    model = load_model(weights)  # the card must belong to the weights before it is changed
    if model.test_time_augmentation == mode:
        return model.card
    return _change_card(weights, model.card, {"test_time_augmentation": mode},
                        {"test_time_augmentation": [model.test_time_augmentation, mode]})


def record_metrics(weights: Path, metrics: dict[str, Any], sha256: str) -> dict[str, Any]:
    """Replace the quality figures in a model's card by a new evaluation's (``mr2ct evaluate
    --record``), so the card says what the model scores as it runs now, e.g. after its test-time
    augmentation changed. ``sha256``: of the weights that were evaluated; refused if the file now
    holds others. The weights stay; the card's dated record keeps the figures replaced."""
    model = load_model(weights)
    if model.sha256 != sha256:
        raise ModelMismatch(f"{Path(weights).name} changed while it was evaluated (SHA-256 {model.sha256[:12]}..., "
                            f"evaluated {sha256[:12]}...); nothing recorded")
    return _change_card(weights, model.card, {"metrics": metrics}, {"metrics_replaced": model.card.get("metrics", {})})


def _change_card(weights: Path, card: dict[str, Any], changes: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Write ``card`` with ``changes`` next to ``weights`` (atomically), noting ``record`` with the time in ``card_changes``."""
    from datetime import datetime, timezone

    card = {**card, **changes}
    card["card_changes"] = [*card.get("card_changes", []), {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}]
    path = card_path_for(Path(weights))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return card
