"""A series sent again unchanged: how long its job takes now that the node keeps the sCT Orthanc
still holds (dicom_node.worker, 2026-12-06), against the series' first job, which made it, in the
same run; and the peer that shows what keeping saves, a retry (POST /jobs/{id}/retry), which makes
it again as every re-send did before.

Starts Orthanc and ``mr2ct serve`` on loopback (the node with the card's test-time views unless
``--views``), sends a phantom MR series with dcmtk's storescu, then, ``--repeats`` times, sends it
again and asks for a retry, each waited for. The job's own ``seconds`` (the worker's time from
claim to outcome) are compared. Last line: one JSON object with ``kept_over_made`` (a kept job's
seconds over a made one's), the medians and the series' size.

    .venv/bin/python bench/resend.py [--slices 32] [--size 256] [--views model] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dicom_node.tokens import create_token  # noqa: E402
from dicom_node.db import init_db  # noqa: E402
from dicom_node.demo import wait_for_job  # noqa: E402
from dicom_node.local_stack import NodeServer, OrthancServer, exit_on_sigterm, free_port, storescu  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402

SCANNER = "BENCH"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", default="model", help="the node's test_time_augmentation (model: the card's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the servers this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-resend-"))
    series = write_mr_series(work / "series", seed=1, slices=args.slices, size=args.size, pixel_spacing=256 / args.size, slice_spacing=4.0)
    seconds: dict[str, list[float]] = {"made": [], "kept": []}
    try:
        with OrthancServer(work / "orthanc", free_port(), free_port()) as orthanc:
            node_port, api_port = free_port(), free_port()
            url = f"sqlite:///{work / 'node' / 'mr2ct.db'}"
            env = {"MR2CT_DICOM_PORT": str(node_port), "MR2CT_SPOOL_DIR": str(work / "node" / "spool"), "MR2CT_DATABASE_URL": url,
                   "MR2CT_ALLOWED_AES": SCANNER, "MR2CT_SPOOL_MIN_FREE_MB": "10", "MR2CT_API_PORT": str(api_port),
                   "MR2CT_COMPLETE_ON_RELEASE": "true", "MR2CT_TEST_TIME_AUGMENTATION": args.views,
                   "MR2CT_ORTHANC_URL": orthanc.url, "MR2CT_ORTHANC_USERNAME": orthanc.username,
                   "MR2CT_ORTHANC_PASSWORD": orthanc.password}
            with NodeServer(work / "node", env, node_port):
                token = create_token(init_db(url), "admin", "bench")
                last = 0

                def send() -> None:
                    result = storescu(series.folder, node_port, "MR2CT", SCANNER)
                    if result.returncode != 0:
                        raise RuntimeError(f"storescu to the node failed: {result.stderr[-500:]}")

                def ended(kind: str) -> None:
                    nonlocal last
                    job = wait_for_job(url, series.series_uid, timeout=3600, done_before=last)
                    if job.state != "done":
                        raise RuntimeError(f"job {job.id} {job.state}: {job.error}")
                    if (kind == "kept") != (job.reused_job_id is not None):
                        raise RuntimeError(f"job {job.id} was {'kept' if job.reused_job_id else 'made'}, not {kind}")
                    last = job.id
                    seconds[kind].append(float(job.seconds or 0.0))
                    print(f"job {job.id}: {kind:5s} {job.seconds:8.3f} s", flush=True)

                send()
                ended("made")
                for _ in range(args.repeats):
                    send()
                    ended("kept")
                    answer = httpx.post(f"http://127.0.0.1:{api_port}/jobs/{last}/retry", headers={"Authorization": f"Bearer {token}"},
                                        timeout=60)
                    answer.raise_for_status()
                    ended("made")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {kind: statistics.median(values) for kind, values in seconds.items()}
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"median job: made {med['made']:.3f} s, kept {med['kept']:.3f} s ({args.slices} slices of {args.size}x{args.size}, views {args.views})")
    print(json.dumps({"kept_over_made": round(med["kept"] / med["made"], 4), "made_seconds": round(med["made"], 3),
                      "kept_seconds": round(med["kept"], 4), "slices": args.slices, "size": args.size, "views": args.views,
                      "repeats": args.repeats}))


if __name__ == "__main__":
    main()
