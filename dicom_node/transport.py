"""Socket settings for the node's pynetdicom associations, both those it accepts and those it opens.

Two things cost a C-STORE most of its time on a fast network, neither of them the data:

- Nagle's algorithm, which pynetdicom leaves on. A requestor writes each C-STORE as a command
  PDU and a data set PDU back to back, and the second can wait for the peer's delayed ACK of the
  first (up to ~40 ms; what dcmtk's TCP_NODELAY=1 switches off for dcmtk).
- The reader's idle poll. pynetdicom's DUL thread sleeps 1 ms whenever it has nothing to do, and
  every request and every response waits out part of that sleep.

Measured here (bench/routing.py, 3 runs): the forwarder routed 64-77 instances/s to a dcmtk
storescp with pynetdicom's defaults, 260-271/s with both set; bench/ingest.py: the node received ~30 %
more instances/s.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom import AE

from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

_warned = False


def tune(assoc: Any, poll_seconds: float) -> None:
    """TCP_NODELAY on the association's socket and ``poll_seconds`` for its reader's idle poll.
    Call it from an EVT_CONN_OPEN handler (accepted and requested associations alike)."""
    global _warned
    dul = assoc.dul
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not a TCP socket, or already closed
            log.debug("TCP_NODELAY not set: %s", exc)
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = poll_seconds
    elif not _warned:
        _warned = True
        log.warning("this pynetdicom has no DUL poll delay to set: dicom_poll_ms has no effect")


class NodeAE(AE):  # type: ignore[misc]
    """A pynetdicom AE that names mr2ct in its associations (A-ASSOCIATE-RQ/AC user information:
    Implementation Class UID and Version Name), not pynetdicom: what the conformance statement and a
    peer's logs say the node is."""

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.implementation_version_name = IMPLEMENTATION_VERSION_NAME
