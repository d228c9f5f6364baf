"""Training runs in the node's database: `mr2ct train` records its run when it starts, appends the
paper's Table 2 losses at the end of every epoch, and marks how it ended (finished, interrupted,
failed) with the model it exported, so the admin API shows a run while it trains.

The run folder's losses.csv stays the record the run itself reads back (--resume); the database
is a copy for people and tools. A database that stops answering mid-run costs a warning, not the
run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import TrainingRun, utcnow
from training.interrupts import uninterrupted

log = logging.getLogger(__name__)

RunState = Literal["running", "finished", "interrupted", "failed"]  # the API's filter takes exactly these
STATES: tuple[str, ...] = get_args(RunState)


class RunRecorder:
    def __init__(self, sessions: sessionmaker[Session], actor: str = "mr2ct train") -> None:
        self.sessions = sessions
        self.actor = actor
        self.run_id: int | None = None
        self._warned = False
        self._missed: list[dict[str, Any]] = []  # epochs the database did not take: written with the next that it does

    def start(self, out_dir: Path, command: str, config: dict[str, Any], resume: bool = False) -> int:
        """A new run row; on ``--resume`` the folder's last run row goes on (an epoch the run repeats
        after its checkpoint replaces the one recorded before). Raises SQLAlchemyError when the
        database does not answer: the caller stops before any training is done."""
        folder = str(Path(out_dir).resolve())
        with uninterrupted(), self.sessions.begin() as session:
            row = None
            if resume:
                row = session.scalars(select(TrainingRun).where(TrainingRun.out_dir == folder).order_by(TrainingRun.id.desc())).first()
            if row is None:
                row = TrainingRun(out_dir=folder, command=command, config=config, epochs_planned=int(config["epochs"]), losses=[])
                session.add(row)
            else:
                row.command, row.config, row.epochs_planned = command, config, int(config["epochs"])
                row.state, row.reason, row.ended_at, row.model_sha256 = "running", None, None, None
            row.updated_at = utcnow()
            session.flush()
            self.run_id = row.id
        with uninterrupted():
            audit.record(self.sessions, "training-started", "success", self.actor, run_id=self.run_id, resumed=resume, epochs=int(config["epochs"]))
        return self.run_id

    def epoch(self, epoch: int, losses: dict[str, float], seconds: float) -> None:
        """Append one epoch's mean losses (called by the trainer on rank 0), with any epoch the
        database did not take before (until 2026-12-07 such an epoch stayed missing from the run's
        row, a gap in its loss plot, though losses.csv had it)."""
        entries = [*self._missed, {"epoch": epoch, **{k: float(v) for k, v in losses.items()}, "seconds": round(seconds, 1)}]
        if self._update(lambda row: self._append(row, entries)):
            if self._missed:
                log.info("training run %s: the database took the %d epoch(s) it had missed", self.run_id, len(self._missed))
            self._missed = []
        else:
            self._missed = entries

    @staticmethod
    def _append(row: TrainingRun, entries: list[dict[str, Any]]) -> None:
        # A new list (JSON columns see assignment, not mutation), in epoch order; an epoch recorded again replaces itself.
        epochs = {e["epoch"] for e in entries}
        row.losses = sorted([e for e in row.losses if e["epoch"] not in epochs] + entries, key=lambda e: int(e["epoch"]))
        row.epochs_completed = len(row.losses)

    def end(self, state: str, model_sha256: str | None = None, reason: str | None = None) -> None:
        if state not in STATES[1:]:
            raise ValueError(f"a run ends finished, interrupted or failed, not {state!r}")

        def ended(row: TrainingRun) -> None:
            if self._missed:  # the last epochs, missed: with the end
                self._append(row, self._missed)
            row.state, row.model_sha256, row.reason, row.ended_at = state, model_sha256, reason, utcnow()

        if self._update(ended):
            self._missed = []
        outcome = "success" if state == "finished" else "warning" if state == "interrupted" else "failure"
        try:
            with uninterrupted():
                audit.record(self.sessions, f"training-{state}", outcome, self.actor, run_id=self.run_id, model_sha256=model_sha256)
        except SQLAlchemyError as exc:
            self._warn(exc)

    def _update(self, change: Any) -> bool:
        """Apply ``change`` to the run's row; False when the database did not take it (warned once)."""
        if self.run_id is None:
            return True
        try:
            with uninterrupted(), self.sessions.begin() as session:
                row = session.get(TrainingRun, self.run_id)
                if row is not None:
                    change(row)
                    row.updated_at = utcnow()
        except SQLAlchemyError as exc:
            self._warn(exc)
            return False
        return True

    def _warn(self, exc: Exception) -> None:
        if not self._warned:  # once per run: the run goes on, losses.csv has every epoch
            log.warning("training run %s: the database did not take an update (%s); losses.csv keeps every epoch", self.run_id, type(exc).__name__)
            self._warned = True
