"""What the node's background senders that retry share (storage commitment reports, deliveries of
results): a pause that doubles with each failed attempt, and rounds that a new piece of work wakes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def growing_pause(attempts: int, cap_seconds: float) -> float:
    """2, 4, 8, ... seconds after the 1st, 2nd, 3rd failed attempt, at most ``cap_seconds``."""
    return min(2.0 ** attempts, cap_seconds)


def run_rounds(step: Callable[[], object], stop: threading.Event, wake: threading.Event, poll_seconds: float, what: str) -> None:
    """Call ``step`` every ``poll_seconds`` (at least 1 s) or as soon as ``wake`` is set, until
    ``stop``; an exception (the database away) is logged and the next round tries again."""
    while not stop.is_set():
        try:
            step()
        except Exception:
            log.exception(what)
        wake.wait(max(poll_seconds, 1.0))
        wake.clear()
