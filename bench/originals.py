"""What a worker pays to read a job's originals from Orthanc (``originals_from = orthanc``, a worker
on a host without the SCP's spool) against reading them from the spool, in the same run.

Starts Orthanc on loopback (TCP_NODELAY=1), writes a phantom MR series into a spool laid out as
the node's (``<spool>/<study>/<series>/<sop>.dcm``) and uploads the same files to Orthanc, then
``--repeats`` times reads the series both ways as the worker does: the spool's files, and
``OrthancStore.series_files`` (one listing of the series, one download per instance). The spool's
files are in the page cache after the first read, as a worker on the SCP's host mostly finds them.
Last line: one JSON object with ``orthanc_over_spool`` (the medians' ratio), the medians and the
series' size.

    .venv/bin/python bench/originals.py [--slices 64] [--size 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402

from dicom_node.local_stack import OrthancServer, exit_on_sigterm, free_port  # noqa: E402
from dicom_node.orthanc_store import OrthancStore  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the Orthanc this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-originals-"))
    series = write_mr_series(work / "series", seed=2, slices=args.slices, size=args.size, pixel_spacing=256 / args.size, slice_spacing=2.0)
    spool = Spool(work / "spool")
    paths, uids = [], []
    for source in series.files:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        path = spool.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    size_mb = sum(p.stat().st_size for p in paths) / 2**20
    seconds: dict[str, list[float]] = {"spool": [], "orthanc": []}
    try:
        with OrthancServer(work / "orthanc", free_port(), free_port()) as orthanc:
            with httpx.Client(auth=orthanc.auth, timeout=60) as client:
                for path in paths:
                    client.post(f"{orthanc.url}/instances", content=path.read_bytes()).raise_for_status()
            store = OrthancStore(orthanc.url, orthanc.username, orthanc.password)
            for repeat in range(args.repeats):
                started = time.perf_counter()
                from_spool = [p.read_bytes() for p in paths]
                seconds["spool"].append(time.perf_counter() - started)
                started = time.perf_counter()
                fetched = store.series_files(series.series_uid, uids)
                seconds["orthanc"].append(time.perf_counter() - started)
                assert [fetched[uid] for uid in uids] == from_spool, "Orthanc answered other bytes than the spool holds"
                print(f"repeat {repeat + 1}: spool {seconds['spool'][-1] * 1000:.1f} ms, Orthanc {seconds['orthanc'][-1] * 1000:.1f} ms "
                      f"({len(fetched)} instances, {size_mb:.1f} MB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spool_s, orthanc_s = statistics.median(seconds["spool"]), statistics.median(seconds["orthanc"])
    print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
    print(json.dumps({"orthanc_over_spool": round(orthanc_s / spool_s, 1), "spool_read_s": round(spool_s, 4),
                      "orthanc_read_s": round(orthanc_s, 4), "orthanc_ms_per_instance": round(orthanc_s / args.slices * 1000, 2),
                      "instances": args.slices, "size": args.size, "megabytes": round(size_mb, 1)}))


if __name__ == "__main__":
    main()
