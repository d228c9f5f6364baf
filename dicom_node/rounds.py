"""What the node's background senders that retry share (storage commitment reports, deliveries of
results): a row claimed before it is sent (of several processes sharing a database, one sends it),
a failed attempt recorded with a pause that doubles each time until the row is given up, and rounds
that a new piece of work wakes. Their tables have the same columns for it: id, state ("pending"
while owed), attempts, next_at, last_error."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import PassErrors
from dicom_node.models import utcnow

log = logging.getLogger(__name__)


def growing_pause(attempts: int, cap_seconds: float) -> float:
    """2, 4, 8, ... seconds after the 1st, 2nd, 3rd failed attempt, at most ``cap_seconds``."""
    return min(2.0 ** attempts, cap_seconds)


def claim(sessions: sessionmaker[Session], table: Any, row_id: int, seconds: float) -> bool:
    """Take a pending row that is due for ``seconds`` (its next_at moved on): whether this process got it."""
    with sessions.begin() as session:
        now = utcnow()
        return bool(session.execute(update(table).where(table.id == row_id, table.state == "pending", table.next_at <= now)
                                    .values(next_at=now + timedelta(seconds=seconds))).rowcount)


def failed_attempt(session: Session, table: Any, row: Any, exc: BaseException, max_attempts: int,
                   cap_seconds: float) -> tuple[int, float, bool]:
    """Record a failed attempt at ``row`` in ``session``: (attempts now, pause before the next, given up)."""
    attempts = row.attempts + 1
    pause = growing_pause(attempts, cap_seconds)
    given_up = attempts >= max_attempts
    session.execute(update(table).where(table.id == row.id).values(
        attempts=attempts, last_error=str(exc)[:500], state="given-up" if given_up else "pending",
        next_at=None if given_up else utcnow() + timedelta(seconds=pause)))
    return attempts, pause, given_up


def run_rounds(step: Callable[[], object], stop: threading.Event, wake: threading.Event, poll_seconds: float, what: str,
               loop: str) -> None:
    """Call ``step`` every ``poll_seconds`` (at least 1 s) or as soon as ``wake`` is set, until
    ``stop`` (seen within a second, whatever ``poll_seconds``: until 2026-12-06 a node with a long
    poll took that long to stop); an exception is logged as ``what`` and the next round tries again
    (an outage of the database: a line naming ``loop`` when it begins and one when it ends, ``db.PassErrors``)."""
    errors = PassErrors(log, loop, what)
    while not stop.is_set():
        errors.attempt(step)
        next_round = time.monotonic() + max(poll_seconds, 1.0)
        while not stop.is_set() and not wake.wait(min(1.0, max(next_round - time.monotonic(), 0.0))):
            if time.monotonic() >= next_round:
                break
        wake.clear()
