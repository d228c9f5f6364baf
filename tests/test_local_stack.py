"""The local stack's ports: what the demo, the tests and the benches start their servers on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from dicom_node.local_stack import free_port

TAKE = "from dicom_node.local_stack import free_port; print(*[free_port() for _ in range(40)])"


def test_ports_are_free_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    """Two pytest-xdist workers starting servers at the same moment get disjoint ports, none of
    them in the range outgoing connections take theirs from, and a port someone listens on is
    skipped."""
    taken = []
    for block in ("0", "1"):  # what tests/conftest.py sets for the workers gw0 and gw1
        env = {**os.environ, "MR2CT_PORT_BLOCK": block}
        out = subprocess.run([sys.executable, "-c", TAKE], capture_output=True, text=True, env=env, timeout=60, check=True).stdout
        taken.append([int(p) for p in out.split()])
    assert len(taken[0]) == len(set(taken[0])) == 40 and not set(taken[0]) & set(taken[1])
    low, high = (int(p) for p in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert all(p < low or p > high for p in taken[0] + taken[1])
    last = free_port()
    with socket.socket() as busy:  # someone else listens on the port that would come next
        busy.bind(("127.0.0.1", last + 1))
        busy.listen(1)
        assert free_port() == last + 2
