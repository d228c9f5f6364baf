"""Model cards: the JSON file beside a model's weights that says what they are (no torch here).

``<name>.json`` next to ``<name>.safetensors`` names the architecture and its parameters, the
model grid, the MR normalisation, the HU range, how the model was trained and the SHA-256 of the
weights. Reading and changing a card needs no torch, so commands that only check or change one
(`mr2ct models set`, the argument checks of `mr2ct evaluate`) answer in a fraction of a second;
``synthesis.model_file`` builds the generator from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from synthesis.errors import ModelMismatch

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


def weights_in(path: Path) -> Path:
    """The weights a user means by ``path``: a training run folder's ``model.safetensors``, or the file itself."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def read_card(weights: Path) -> dict[str, Any]:
    """The card of ``weights``, checked: both files there, the keys a card needs, a known test-time
    augmentation, and the weights' SHA-256 the card names. Raises ModelMismatch saying what is wrong."""
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
    return card


def set_test_time_augmentation(weights: Path, mode: str) -> dict[str, Any]:
    """Change the test-time augmentation a model's card asks inference for (weights untouched,
    so its SHA-256 stays); the card keeps a dated record of each change. Returns the new card."""
    if mode not in TEST_TIME_AUGMENTATIONS:
        raise ValueError(f"test_time_augmentation must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, got {mode!r}")
    card = read_card(weights)  # the card must belong to the weights before it is changed
    current = card.get("test_time_augmentation", "none")
    if current == mode:
        return card
    return _change_card(weights, card, {"test_time_augmentation": mode}, {"test_time_augmentation": [current, mode]})


def record_metrics(weights: Path, metrics: dict[str, Any], sha256: str) -> dict[str, Any]:
    """Replace the quality figures in a model's card by a new evaluation's (``mr2ct evaluate
    --record``), so the card says what the model scores as it runs now, e.g. after its test-time
    augmentation changed. ``sha256``: of the weights that were evaluated; refused if the file now
    holds others. The weights stay; the card's dated record keeps the figures replaced."""
    card = read_card(weights)
    if card["sha256"] != sha256:
        raise ModelMismatch(f"{Path(weights).name} changed while it was evaluated (SHA-256 {str(card['sha256'])[:12]}..., "
                            f"evaluated {sha256[:12]}...); nothing recorded")
    return _change_card(weights, card, {"metrics": metrics}, {"metrics_replaced": card.get("metrics", {})})


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


def learned(card: dict[str, Any]) -> str:
    """What a card says its model learned, in a few words: its MR contrasts and body parts ("T1,
    HEAD"; '' for a card made before they were recorded), for listings of registered models."""
    return ", ".join(str(v) for key in ("mr_contrasts", "mr_body_parts") for v in card.get(key) or ())


def selection_learned(card: dict[str, Any]) -> dict[str, Any]:
    """What a card says its model learned, as the node's selection settings take it: the values of
    select_acquisition_contrasts, select_contrast_agent, select_fat_suppression and select_body_parts
    that let through what it was trained on and nothing else (``select_follow_model``; the warnings
    of `config check` and `mr2ct models activate` read the same keys). None for a key the card does not speak of (made
    before it was recorded). UNKNOWN (a header that did not tell) is never taken from a card: whether
    such series are synthesized stays the site's to vouch for, in the settings. A head learned under
    one of its names is learned under all (``synthesis.contrast.HEAD_PARTS``)."""
    from synthesis.contrast import HEAD_PARTS, UNKNOWN, WITH, WITHOUT

    contrasts = [str(c) for c in card.get("mr_contrasts") or () if c != UNKNOWN]
    taken: dict[str, Any] = {"select_acquisition_contrasts": contrasts or None}
    for key, setting in (("mr_contrast_agents", "select_contrast_agent"), ("mr_fat_suppression", "select_fat_suppression")):
        seen = {a for a in card.get(key) or () if a in (WITH, WITHOUT)}
        taken[setting] = None if not seen else "any" if len(seen) == 2 else seen.pop().lower()
    parts = [str(p) for p in card.get("mr_body_parts") or () if p != UNKNOWN]
    heads = HEAD_PARTS if set(parts) & set(HEAD_PARTS) else ()
    taken["select_body_parts"] = list(dict.fromkeys([*parts, *heads])) or None
    return taken
