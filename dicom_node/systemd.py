"""systemd's readiness protocol (sd_notify(3)), for units of ``Type=notify``: the node says READY=1
once it listens (its SCP, worker and admin API all up) and STOPPING=1 when it begins to stop, so
that ``systemctl start`` returns when the node takes traffic, a node that cannot start is a failed
start rather than an "active" unit, and units ordered After= it start once it listens. Without
NOTIFY_SOCKET in the environment (not under systemd, or ``Type=simple``) nothing is sent."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

STARTED = "node started role="  # then the role: the log line, and the STATUS systemd is told, once start() is done


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` assignments) to the service manager; True
    when it was sent. A socket that cannot be reached is logged and start-up goes on: systemd,
    not the node, then decides (a ``Type=notify`` unit that never hears READY=1 times out)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket (Linux)
        address = "\0" + address[1:]
    elif not address.startswith("/"):  # e.g. vsock:, which systemd offers to virtual machines
        log.warning("NOTIFY_SOCKET %s is not a unix socket path: systemd not told %s", address, state.split("=", 1)[0])
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("NOTIFY_SOCKET %s: systemd not told %s: %s", address.replace("\0", "@"), state.split("=", 1)[0], exc)
        return False
    return True
