"""Progress bars for long work (pulling, training, evaluating, the demo's wait for its sCT).

One place decides when a bar is drawn and how wide it is: on stderr, only on a terminal unless
asked (``show``), and 80 x 24 on a terminal that says it has no size. A pseudo-terminal nobody
sized (``docker exec -t``, ``kubectl exec -t``, ``script``, some CI runners) reports 0 x 0, which
tqdm takes for -1 rows and then draws nothing at all: no bar, no counts, no losses.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm

UNSIZED_TERMINAL = {"ncols": 80, "nrows": 24}


def _unsized_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that reports no size."""
    try:
        return stream.isatty() and 0 in os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO), or closed
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool | None = None, **options: Any) -> tqdm:
    """A tqdm bar on stderr; ``show``: None draws it only on a terminal, True always, False never."""
    stream = options.setdefault("file", sys.stderr)
    if _unsized_terminal(stream):
        options = {**UNSIZED_TERMINAL, **options}
    return tqdm(iterable, disable=None if show is None else not show, **options)
