"""Scale-out: wall time to synthesize the same 12 series with 1, 2 and 3 worker processes sharing
one SCP and a PostgreSQL database (the peer is the 1-worker run of the same invocation).

Last line: one JSON object with the wall times and the speed-ups over one worker. On a machine
with few cores, workers compete for them: read the speed-up against the core count printed.

    .venv/bin/python bench/scale_out.py [--series 12] [--slices 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.demo import wait_for_job  # noqa: E402
from dicom_node.local_stack import NodeServer, OrthancServer, PostgresServer, exit_on_sigterm, free_port, storescu  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402


def run(workers: int, series: list, orthanc: OrthancServer, work: Path) -> float:
    port = free_port()
    with PostgresServer(None, free_port()) as pg:
        servers = []
        for index, role in enumerate(["scp"] + ["worker"] * workers):
            folder = work / f"w{workers}-{role}{index}"
            env = {
                "MR2CT_AE_TITLE": "MR2CT", "MR2CT_DICOM_PORT": str(port), "MR2CT_ALLOWED_AES": "BENCH",
                "MR2CT_SPOOL_DIR": str(work / f"spool{workers}"), "MR2CT_DATABASE_URL": pg.url, "MR2CT_ORTHANC_URL": orthanc.url,
                "MR2CT_ORTHANC_USERNAME": orthanc.username, "MR2CT_ORTHANC_PASSWORD": orthanc.password,
                "MR2CT_STABLE_SECONDS": "0.5", "MR2CT_COMPLETE_ON_RELEASE": "true", "MR2CT_API_PORT": "0",
                "MR2CT_SPOOL_MIN_FREE_MB": "10", "MR2CT_CPU_THREADS": str(max(1, (os.cpu_count() or 1) // workers)),
            }
            servers.append(NodeServer(folder, env, port, role=role))
        try:
            for server in servers:
                server.start()
            started = time.monotonic()
            for s in series:
                if storescu(s.folder, port, "MR2CT", "BENCH").returncode != 0:
                    raise RuntimeError("storescu failed")
            for s in series:
                if wait_for_job(pg.url, s.series_uid, timeout=1800).state != "done":
                    raise RuntimeError("a job failed")
            return time.monotonic() - started
        finally:
            for server in servers:
                server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=12)
    parser.add_argument("--slices", type=int, default=32)
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the servers this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-scale-"))
    try:
        series = [write_mr_series(work / f"mr{i}", seed=3000 + i, slices=args.slices, size=256) for i in range(args.series)]
        with OrthancServer(work / "orthanc", free_port(), free_port()) as orthanc:
            times = {n: run(n, series, orthanc, work) for n in (1, 2, 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.series} series x {args.slices} slices 256x256, {os.cpu_count()} CPUs")
    for n, seconds in times.items():
        print(f"{n} worker(s): {seconds:7.1f} s   speed-up {times[1] / seconds:4.2f}x")
    print(json.dumps({"workers_1_s": round(times[1], 1), "workers_2_s": round(times[2], 1), "workers_3_s": round(times[3], 1),
                      "speedup_2": round(times[1] / times[2], 2), "speedup_3": round(times[1] / times[3], 2), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
