"""Ingest throughput: one storescu sends the same 500-instance 256x256 MR series to
(a) dcmtk storescp, (b) a bare pynetdicom storescp that fsyncs, (c) Orthanc, (d) mr2ct serve
(durable spool + database), alternating, repeated; prints medians of instances/s and ratios.
The node sets pynetdicom's reader poll interval (dicom_poll_ms, 0.2 ms; pynetdicom's own is 1 ms).
Two more peers split the node's figure: the bare storescp with the same poll interval
(``node_over_pynetdicom_same_transport``: what durability and bookkeeping cost on an equal
transport), and that one following the node's durability protocol too (temporary name, fsync,
rename, fsync of the folder): ``node_over_pynetdicom_same_protocol``, the node's own cost
(validation, database).

Every process gets TCP_NODELAY=1. Last line: one JSON object with node_over_pynetdicom,
node_over_orthanc, node_over_dcmtk (and the medians).

    .venv/bin/python bench/ingest.py [--instances 500] [--repeats 3]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.local_stack import (  # noqa: E402
    NodeServer, OrthancServer, exit_on_sigterm, free_port, nodelay_env, start_storescp, stop_process, storescu, wait_listening,
)
from training.phantom_dicom import write_mr_series  # noqa: E402


def timed_send(folder: Path, port: int, called: str) -> float:
    started = time.perf_counter()
    result = storescu(folder, port, called, "BENCH")
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=0.2, help="the node's dicom_poll_ms, also given to the tuned peers")
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the servers this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-ingest-"))
    series = write_mr_series(work / "series", seed=1, slices=args.instances, size=256, pixel_spacing=1.0, slice_spacing=0.5)
    rates: dict[str, list[float]] = {
        "dcmtk": [], "pynetdicom": [], "pynetdicom_tuned": [], "pynetdicom_rename": [], "orthanc": [], "node": [],
    }
    procs: list[subprocess.Popen] = []
    orthanc = OrthancServer(work / "orthanc", free_port(), free_port(), modalities={"bench": ["BENCH", "127.0.0.1", 104]})
    node: NodeServer | None = None
    try:
        dcmtk_port = free_port()
        (work / "dcmtk").mkdir()
        procs.append(start_storescp(work / "dcmtk", dcmtk_port, "STORESCP"))
        bare = [sys.executable, str(ROOT / "bench" / "_bare_storescp.py")]
        tuned = ["--poll-ms", str(args.poll_ms)]
        bare_ports: dict[str, int] = {}
        for name, extra in (("pynetdicom", []), ("pynetdicom_tuned", tuned), ("pynetdicom_rename", [*tuned, "--rename"])):
            bare_ports[name] = free_port()
            proc = subprocess.Popen([*bare, str(bare_ports[name]), str(work / name), *extra], env=nodelay_env(), stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_listening(proc, bare_ports[name])
        orthanc.start()
        node_port = free_port()
        node = NodeServer(work / "node", {
            "MR2CT_DICOM_PORT": str(node_port), "MR2CT_SPOOL_DIR": str(work / "node" / "spool"),
            "MR2CT_DATABASE_URL": f"sqlite:///{work / 'node' / 'mr2ct.db'}", "MR2CT_STABLE_SECONDS": "86400",
            "MR2CT_ALLOWED_AES": "BENCH", "MR2CT_SPOOL_MIN_FREE_MB": "10",
            "MR2CT_DICOM_POLL_MS": str(args.poll_ms),
        }, node_port)
        node.start()
        peers = {
            "dcmtk": (dcmtk_port, "STORESCP"), **{name: (port, "BARE") for name, port in bare_ports.items()},
            "orthanc": (orthanc.dicom_port, orthanc.aet), "node": (node_port, "MR2CT"),
        }
        for name, (port, called) in peers.items():  # warm-up (and the first write of each instance)
            timed_send(series.folder, port, called)
        for repeat in range(args.repeats):
            for name, (port, called) in peers.items():
                seconds = timed_send(series.folder, port, called)
                rates[name].append(args.instances / seconds)
                print(f"repeat {repeat + 1}: {name:18s} {args.instances / seconds:8.1f} instances/s", flush=True)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    for name, value in med.items():
        print(f"median {name:18s} {value:8.1f} instances/s")
    result = {
        "node_over_pynetdicom": round(med["node"] / med["pynetdicom"], 3),
        "node_over_orthanc": round(med["node"] / med["orthanc"], 3),
        "node_over_dcmtk": round(med["node"] / med["dcmtk"], 3),
        "node_over_pynetdicom_same_transport": round(med["node"] / med["pynetdicom_tuned"], 3),
        "node_over_pynetdicom_same_protocol": round(med["node"] / med["pynetdicom_rename"], 3),
        "node_per_s": round(med["node"], 1), "pynetdicom_per_s": round(med["pynetdicom"], 1),
        "pynetdicom_tuned_per_s": round(med["pynetdicom_tuned"], 1),
        "pynetdicom_rename_per_s": round(med["pynetdicom_rename"], 1),
        "orthanc_per_s": round(med["orthanc"], 1), "dcmtk_per_s": round(med["dcmtk"], 1),
        "instances": args.instances, "repeats": args.repeats, "poll_ms": args.poll_ms,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
