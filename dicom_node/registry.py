"""The model registry: `mr2ct models register|list|activate`. Registering reads a training run
folder (model file, card, losses.csv), so the per-epoch losses reach the database; activating
makes every worker use that model from its next job on, without a restart."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.ingest import SelectionRules
from dicom_node.models import Evaluation, ModelVersion, utcnow
from synthesis.card import read_card, weights_in
from synthesis.errors import ModelMismatch

log = logging.getLogger(__name__)


def register(sessions: sessionmaker[Session], path: Path, name: str | None = None,
             actor: str = "mr2ct models") -> tuple[ModelVersion, str]:
    """Register a run folder or a weights file (checked against its card); idempotent per SHA-256.

    Registering weights that are already registered refreshes the registry's copy of their card
    and metrics when the card changed since (``mr2ct models set``, ``mr2ct evaluate --record``),
    with an audit row; the weights, id and name stay. Returns the row and what happened to it:
    ``registered``, ``card-updated`` or ``unchanged``."""
    from synthesis.model_file import load_model

    weights = weights_in(path)
    model = load_model(weights)  # refuses a card that does not match its weights, or weights that do not fit its architecture
    losses: list[dict[str, Any]] = []
    losses_csv = weights.parent / "losses.csv"
    if losses_csv.exists():
        with open(losses_csv) as fh:
            losses = [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items()} for row in csv.DictReader(fh)]
    with sessions.begin() as session:
        row = session.scalars(select(ModelVersion).where(ModelVersion.sha256 == model.sha256)).first()
        created, card_changed = row is None, row is not None and row.card != model.card
        if row is None:
            row = ModelVersion(
                name=name or str(model.card.get("name") or weights.stem), sha256=model.sha256, weights_path=str(weights.resolve()),
                architecture=str(model.card["architecture"]), card=model.card, losses=losses, metrics=dict(model.card.get("metrics", {})),
            )
            session.add(row)
        elif card_changed:
            row.card, row.metrics = model.card, dict(model.card.get("metrics", {}))
        session.flush()
        session.expunge(row)
    if created:
        audit.record(sessions, "model-registered", "success", actor, model_sha256=model.sha256, name=row.name, epochs=len(losses))
    elif card_changed:
        audit.record(sessions, "model-card-updated", "success", actor, model_sha256=model.sha256, name=row.name,
                     test_time_augmentation=model.test_time_augmentation)
    return row, "registered" if created else "card-updated" if card_changed else "unchanged"


def activate(sessions: sessionmaker[Session], key: str, actor: str = "mr2ct models") -> ModelVersion:
    """Activate by id, name or SHA-256 prefix (at least 8 characters)."""
    with sessions.begin() as session:
        candidates = session.scalars(select(ModelVersion)).all()
        matches = [m for m in candidates if str(m.id) == key or m.name == key or (len(key) >= 8 and m.sha256.startswith(key))]
        if len(matches) != 1:
            raise ValueError(f"{key!r} matches {len(matches)} registered models; use the id or a longer SHA-256 prefix")
        chosen = matches[0]
        registered_weights(chosen)
        session.execute(update(ModelVersion).values(active=False))
        chosen.active, chosen.activated_at = True, utcnow()
        session.flush()
        session.expunge(chosen)
    audit.record(sessions, "model-activated", "success", actor, model_sha256=chosen.sha256, name=chosen.name)
    return chosen


def registered_weights(model: ModelVersion) -> Path:
    """The weights file of a registered model, checked to be still there, still matching its card
    and still holding the weights that were registered (a run folder trained into again holds
    others, under the same path). Raises ModelMismatch saying what to do."""
    path = Path(model.weights_path)
    card = read_card(path)
    if card["sha256"] != model.sha256:
        raise ModelMismatch(f"{path} now holds other weights (SHA-256 {str(card['sha256'])[:12]}...) than model {model.id} "
                            f"{model.name!r} registered from it ({model.sha256[:12]}...); register the file again to use them")
    return path


def active_model(sessions: sessionmaker[Session]) -> ModelVersion | None:
    with sessions() as session:
        return session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).first()


class FollowedSelection:
    """The node's selection rules as they stand now (``select_follow_model``): those the active
    model's card speaks of (its MR contrasts, contrast agent, fat suppression, body parts) taken from
    the card, the others the settings'. The active model is the registry's, else ``model_file``;
    asked at each series' completion (one indexed query), so that activating a model trained on
    other series changes what the node synthesizes from the next series on, without a restart, as
    it changes the model the workers run. Where the registry cannot be read, the rules stay those
    of the last model it named (logged)."""

    def __init__(self, sessions: sessionmaker[Session], rules: SelectionRules, model_file: Path) -> None:
        self.sessions, self.rules, self.model_file = sessions, rules, Path(model_file)
        self._key: str | None = None
        self._current = rules

    def __call__(self) -> SelectionRules:
        try:
            active = active_model(self.sessions)
        except Exception:
            log.warning("selection: cannot read the registry's active model; the rules stay those of %s", self._current.follows or "the settings",
                        exc_info=True)
            return self._current
        if active is not None:
            key, model = active.sha256, f"the active model {active.name!r} ({active.sha256[:12]})"
        else:
            key, model = "model_file", f"model_file {self.model_file.name!r}"
        if key != self._key:
            try:
                card = active.card if active is not None else read_card(self.model_file)
            except (OSError, ValueError, ModelMismatch) as exc:
                log.error("selection: cannot read the card of %s (%s); the rules stay those of %s", model, exc,
                          self._current.follows or "the settings")
                return self._current
            self._current, self._key = self.rules.following(card or {}, model), key
            log.info("selection follows %s: contrasts=%s contrast_agent=%s fat_suppression=%s body_parts=%s (from its card: %s)", model,
                     list(self._current.contrasts), self._current.contrast_agent, self._current.fat_suppression,
                     list(self._current.body_parts), sorted(self._current.followed) or "nothing: the card says none of them")
        return self._current


def node_selection(s: Any, sessions: sessionmaker[Session]) -> Callable[[], SelectionRules]:
    """The node's selection rules as they stand at each call: its settings' (``Settings``), or with
    ``select_follow_model`` those the running model's card speaks of taken from it."""
    rules = SelectionRules.from_settings(s)
    return FollowedSelection(sessions, rules, s.model_file) if s.select_follow_model else lambda: rules


def pairs_digest(pairs: list[dict[str, Any]]) -> str:
    """SHA-256 of the scored pairs' MR and CT series UIDs, in order: the same pairs, the same digest."""
    import hashlib

    lines = sorted(f"{p['mr_series_uid']}/{p['ct_series_uid']}" for p in pairs)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def record_evaluation(sessions: sessionmaker[Session], report: dict[str, Any], label: str = "",
                      actor: str = "mr2ct evaluate") -> Evaluation:
    """Keep an `mr2ct evaluate --pairs` report in the database (model not necessarily registered
    yet: evaluations are found by the weights' SHA-256), with an audit event."""
    with sessions.begin() as session:
        row = Evaluation(
            model_sha256=report["model_sha256"], against_sha256=(report.get("against") or {}).get("model_sha256"),
            dataset_digest=pairs_digest(report["pairs"]), label=label, pairs=len(report["pairs"]),
            test_time_augmentation=report["test_time_augmentation"], mae_hu=report["mae_hu"], psnr_db=report["psnr_db"],
            ssim=report["ssim"], mae_linear_hu=report["mae_linear_hu"], report=report,
        )
        session.add(row)
        session.flush()
    audit.record(sessions, "model-evaluated", "success", actor, evaluation_id=row.id, model_sha256=row.model_sha256,
                 pairs=row.pairs, mae_hu=row.mae_hu, dataset_digest=row.dataset_digest)
    return row
