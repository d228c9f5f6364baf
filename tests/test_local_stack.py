"""The local stack: the ports the demo, the tests and the benches start their servers on, and
that a script stopped by a signal still stops them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.local_stack import free_port

ROOT = Path(__file__).resolve().parent.parent
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


SCRIPT = """
import subprocess, sys
from dicom_node.local_stack import exit_on_sigterm, stop_process
if sys.argv[1] == "handled":
    exit_on_sigterm()
server = subprocess.Popen(["sleep", "300"])  # a server the script started (Orthanc, a node, a storescp)
try:
    print(server.pid, flush=True)
    server.wait()
finally:
    stop_process(server)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_bench_stopped_by_sigterm_still_stops_the_servers_it_started() -> None:
    """``timeout`` or a cancelled CI job ends a bench with SIGTERM: with ``exit_on_sigterm`` (the
    benches that start servers call it) its ``finally`` blocks run and its servers stop; without
    it Python dies at once and leaves them running (the contrast shows the test can fail)."""
    left: list[int] = []
    try:
        for mode, code, stays in (("handled", 128 + signal.SIGTERM, False), ("plain", -signal.SIGTERM, True)):
            script = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
            server = int(script.stdout.readline())
            left.append(server)
            script.send_signal(signal.SIGTERM)
            assert script.wait(timeout=30) == code
            deadline = time.monotonic() + 10
            while _alive(server) and not stays and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _alive(server) == stays, mode
    finally:
        for pid in left:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
