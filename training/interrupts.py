"""Ctrl-C held back while a step that must not be split runs."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C waits until the block is over: meanwhile SIGINT is only noted, and the handler that
    was there (KeyboardInterrupt, which the trainer turns into a checkpoint) gets it right after.
    The trainer's end of an epoch (its losses in the history, losses.csv and the database) and
    every database write of a run go whole or not at all: raised inside SQLAlchemy or sqlite3, a
    KeyboardInterrupt could leave a connection holding the database's lock. Nested blocks pass
    the signal outwards. (A handler, not a signal mask: a mask covers one thread, and torch's threads
    would take the signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):  # SIG_IGN / SIG_DFL are not callable: ignored, or the default applies
            previous(signal.SIGINT, None)
