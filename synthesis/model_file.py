"""Model files: safetensors weights plus a JSON card that describes them.

``<name>.safetensors`` holds the generator's state dict; ``<name>.json`` (the
card) names the architecture and its parameters, the model grid (pixel
spacing), the MR normalisation, the HU range, how it was trained, and the
SHA-256 of the weights file. Loading refuses a card that does not match
(``synthesis.card`` reads and changes cards without torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from synthesis import default_model_path  # noqa: F401  (where callers have always found it)
from synthesis.card import (  # noqa: F401  (the card's functions, where callers have always found them)
    REQUIRED_CARD_KEYS, TEST_TIME_AUGMENTATIONS, card_path_for, read_card, record_metrics, set_test_time_augmentation, sha256_of,
)
from synthesis.errors import ModelMismatch
from synthesis.networks import build_generator


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
    card = read_card(weights)
    try:
        generator = build_generator(card["architecture"], dict(card["parameters"]))
        generator.load_state_dict(load_file(str(weights)), strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ModelMismatch(f"weights {weights.name} do not fit the architecture in {card_path_for(weights).name}: {exc}") from exc
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return LoadedModel(generator=generator, card=card, weights_path=weights)
