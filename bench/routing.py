"""Routing throughput: the node forwards received originals by C-STORE (``forward_to``) to a dcmtk
storescp, against dcmtk ``storescu`` sending the same files to the same storescp, in the same
run, alternating, repeated; prints medians of instances/s and ratios.

The node first receives the series (forwarding off); then each repeat marks every instance due
again and times the forwarder's own passes (``forward_pending`` with ``CStoreDestination``, one
association per pass of up to 200, a database commit per forwarded instance) until all are at the
destination. A third peer is the same forwarder with pynetdicom's socket defaults (Nagle on, 1 ms
idle poll), what the node did before ``dicom_node.transport.tune``.

Every process gets TCP_NODELAY=1. Last line: one JSON object with routing_over_storescu,
routing_untuned_over_storescu and the medians.

    .venv/bin/python bench/routing.py [--instances 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select, update  # noqa: E402

from dicom_node import forwarder  # noqa: E402
from dicom_node.db import init_db  # noqa: E402
from dicom_node.local_stack import NodeServer, exit_on_sigterm, free_port, start_storescp, stop_process, storescu  # noqa: E402
from dicom_node.models import Instance, utcnow  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402


def route_all(sessions, destination: forwarder.CStoreDestination, expected: int) -> float:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        session.execute(update(Instance).values(forwarded_at=None, forward_attempts=0, forward_error=None,
                                                forward_next_at=utcnow() - timedelta(seconds=1)))
    started = time.perf_counter()
    done = 0
    while done < expected:
        forwarded, failed = forwarder.forward_pending(sessions, destination)
        if failed or not forwarded:
            raise RuntimeError(f"routing stalled after {done} of {expected} ({failed} failed)")
        done += forwarded
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=0.2, help="the node's dicom_poll_ms")
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the servers this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-routing-"))
    series = write_mr_series(work / "series", seed=1, slices=args.instances, size=256, pixel_spacing=1.0, slice_spacing=0.5)
    rates: dict[str, list[float]] = {"storescu": [], "routing": [], "routing_untuned": []}
    storescp: subprocess.Popen | None = None
    tuned = forwarder.tune
    try:
        node_port = free_port()
        url = f"sqlite:///{work / 'node' / 'mr2ct.db'}"
        node = NodeServer(work / "node", {
            "MR2CT_DICOM_PORT": str(node_port), "MR2CT_SPOOL_DIR": str(work / "node" / "spool"), "MR2CT_DATABASE_URL": url,
            "MR2CT_STABLE_SECONDS": "86400", "MR2CT_ALLOWED_AES": "BENCH", "MR2CT_SPOOL_MIN_FREE_MB": "10", "MR2CT_API_PORT": "0",
        }, node_port)
        node.start()
        try:
            sent = storescu(series.folder, node_port, "MR2CT", "BENCH")
            if sent.returncode != 0:
                raise RuntimeError(f"storescu to the node failed: {sent.stderr[-500:]}")
        finally:
            node.stop()
        sessions = init_db(url)
        with sessions() as session:
            spooled = session.scalar(select(func.count()).select_from(Instance))
        if spooled != args.instances:
            raise RuntimeError(f"the node recorded {spooled} of {args.instances} instances")
        port = free_port()
        (work / "dest").mkdir()
        storescp = start_storescp(work / "dest", port, "DEST")
        destination = forwarder.CStoreDestination(f"DEST@127.0.0.1:{port}", "MR2CT", poll_seconds=args.poll_ms / 1000)

        def untuned() -> float:
            forwarder.tune = lambda assoc, poll_seconds: None  # pynetdicom's defaults: Nagle on, 1 ms idle poll
            try:
                return route_all(sessions, destination, args.instances)
            finally:
                forwarder.tune = tuned

        def direct() -> float:
            started = time.perf_counter()
            result = storescu(series.folder, port, "DEST", "BENCH")
            if result.returncode != 0:
                raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
            return time.perf_counter() - started

        peers = {"storescu": direct, "routing": lambda: route_all(sessions, destination, args.instances), "routing_untuned": untuned}
        direct()  # warm-up
        for repeat in range(args.repeats):
            for name, run in peers.items():
                seconds = run()
                rates[name].append(args.instances / seconds)
                print(f"repeat {repeat + 1}: {name:16s} {args.instances / seconds:8.1f} instances/s", flush=True)
    finally:
        forwarder.tune = tuned
        if storescp is not None:
            stop_process(storescp)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    for name, value in med.items():
        print(f"median {name:16s} {value:8.1f} instances/s")
    print(json.dumps({
        "routing_over_storescu": round(med["routing"] / med["storescu"], 3),
        "routing_untuned_over_storescu": round(med["routing_untuned"] / med["storescu"], 3),
        "routing_per_s": round(med["routing"], 1), "routing_untuned_per_s": round(med["routing_untuned"], 1),
        "storescu_per_s": round(med["storescu"], 1), "instances": args.instances, "repeats": args.repeats, "poll_ms": args.poll_ms,
    }))


if __name__ == "__main__":
    main()
