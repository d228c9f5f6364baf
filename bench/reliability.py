"""Reliability report: fault, load and hostile-input scenarios against real processes on loopback.

Prints one table (instances sent, acknowledged, stored, lost, duplicated; faults injected and
survived; malformed inputs tried and refused) and ends with one JSON line of the totals.
The nodes synthesize with ``--views`` test-time views (default none: one forward per slice);
this counts instances, not pixels, and on a CPU without bf16 the card's 32 views make the load
scenario's 600 slices take most of an hour.

    .venv/bin/python bench/reliability.py [--senders 4] [--instances 150] [--views none]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.uid import MRImageStorage  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from dicom_node.db import init_db  # noqa: E402
from dicom_node.demo import wait_for_job  # noqa: E402
from dicom_node.local_stack import NodeServer, OrthancServer, PostgresServer, exit_on_sigterm, free_port, nodelay_env  # noqa: E402
from dicom_node.models import AuditEvent, Instance, Job, RefusedInstance  # noqa: E402
from tests.corpus import CASES, make_variant  # noqa: E402
from tests.test_faults import _acknowledged  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402

NODE_AE, SCANNER_AE = "MR2CT", "BENCH"


def env_for(workdir: Path, port: int, orthanc: OrthancServer, views: str, **extra: str) -> dict[str, str]:
    env = {
        "MR2CT_TEST_TIME_AUGMENTATION": views,
        "MR2CT_AE_TITLE": NODE_AE, "MR2CT_DICOM_PORT": str(port), "MR2CT_ALLOWED_AES": SCANNER_AE,
        "MR2CT_SPOOL_DIR": str(workdir / "spool"), "MR2CT_DATABASE_URL": f"sqlite:///{workdir / 'mr2ct.db'}",
        "MR2CT_ORTHANC_URL": orthanc.url, "MR2CT_ORTHANC_USERNAME": orthanc.username, "MR2CT_ORTHANC_PASSWORD": orthanc.password,
        "MR2CT_STABLE_SECONDS": "1.5", "MR2CT_SPOOL_MIN_FREE_MB": "10", "MR2CT_API_PORT": "0",
    }
    env.update(extra)
    return env


def send(folder: Path, port: int) -> tuple[int, list[str]]:
    result = subprocess.run(["storescu", "-v", "-aet", SCANNER_AE, "-aec", NODE_AE, "+sd", "127.0.0.1", str(port), str(folder)],
                            capture_output=True, text=True, env=nodelay_env(), timeout=900)
    return result.returncode, _acknowledged(result.stdout + result.stderr)


def send_in_background(folder: Path, port: int) -> subprocess.Popen[str]:
    """``send`` without waiting: the caller injects a fault while the series arrives."""
    return subprocess.Popen(["storescu", "-v", "-aet", SCANNER_AE, "-aec", NODE_AE, "+sd", "127.0.0.1", str(port), str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=nodelay_env())


def wait_until_spooled(env: dict[str, str], study_uid: str, series_uid: str, count: int) -> None:
    """Until ``count`` instances of the series are in the node's spool (the database rows trail it by group commit)."""
    spooled = Path(env["MR2CT_SPOOL_DIR"]) / study_uid / series_uid
    while not spooled.is_dir() or len(list(spooled.glob("*.dcm"))) < count:
        time.sleep(0.01)


def ct_series_counts(orthanc: OrthancServer, study_uid: str) -> list[int]:
    import httpx

    found = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, auth=orthanc.auth).json()
    studies = [r["ID"] for r in found if r["Type"] == "Study"]
    if not studies:
        return []
    return [len(s["Instances"]) for s in orthanc.get(f"/studies/{studies[0]}/series") if s["MainDicomTags"]["Modality"] == "CT"]


def row(name: str, sent: int, acked: int, stored: int, duplicated: int, faults: int = 0, survived: int = 0,
        tried: int = 0, refused: int = 0) -> dict[str, object]:
    return {"scenario": name, "sent": sent, "acknowledged": acked, "stored": stored, "lost": max(0, acked - stored),
            "duplicated": duplicated, "faults": faults, "survived": survived, "malformed": tried, "refused": refused}


def store_one(path: Path, port: int) -> set[int]:
    """C-STORE one file with pynetdicom (a file storescu would refuse to send); the status, as a set to compare with CASES."""
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        status = assoc.send_c_store(path)
        return {int(status.Status)} if status else set()
    finally:
        assoc.release()


def wait_for_refusal(database_url: str, sop_uid: str, timeout: float) -> bool:
    """Whether the refusal of ``sop_uid`` is recorded (its audit row and the row its series waits on) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with init_db(database_url)() as session:
            audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused")).all()
            if any(e.detail.get("sop_instance_uid") == sop_uid for e in audited) and session.get(RefusedInstance, sop_uid):
                return True
        time.sleep(0.5)
    return False


def stored_count(database_url: str, series_uid: str) -> int:
    with init_db(database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Instance).where(Instance.series_instance_uid == series_uid)) or 0)


def jobs_for(database_url: str, series_uid: str) -> int:
    with init_db(database_url)() as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.series_instance_uid == series_uid)) or 0)


def peak_rss(node: NodeServer) -> int:
    """Peak resident memory (VmHWM) of a running node process, MiB."""
    if node.proc is None:
        return 0
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--instances", type=int, default=150)
    parser.add_argument("--views", default="none", help="the nodes' test_time_augmentation (none, dihedral, model: the card's)")
    args = parser.parse_args()
    exit_on_sigterm()  # a timeout or kill still stops the servers this starts
    work = Path(tempfile.mkdtemp(prefix="mr2ct-reliability-"))
    rows = []
    peaks: dict[str, int] = {}
    orthanc = OrthancServer(work / "orthanc", free_port(), free_port())
    try:
        orthanc.start()
        # 1. Load: several senders at once.
        port = free_port()
        node_dir = work / "load"
        env = env_for(node_dir, port, orthanc, args.views)
        series = [write_mr_series(work / f"load{i}", seed=2000 + i, slices=args.instances, size=128, pixel_spacing=2.0, slice_spacing=0.5)
                  for i in range(args.senders)]
        with NodeServer(node_dir, env, port) as load_node:
            with ThreadPoolExecutor(args.senders) as pool:
                results = list(pool.map(lambda s: send(s.folder, port), series))
            for s in series:
                wait_for_job(env["MR2CT_DATABASE_URL"], s.series_uid, timeout=900)
            time.sleep(2)
            peaks[f"load: {args.senders} senders"] = peak_rss(load_node)
        acked = sum(len(r[1]) for r in results)
        stored = sum(stored_count(env["MR2CT_DATABASE_URL"], s.series_uid) for s in series)
        dup = sum(max(0, jobs_for(env["MR2CT_DATABASE_URL"], s.series_uid) - 1) + max(0, len(ct_series_counts(orthanc, s.study_uid)) - 1) for s in series)
        rows.append(row(f"load: {args.senders} senders", args.senders * args.instances, acked, stored, dup))

        # 2. kill -9 while a series arrives, restart, the scanner re-sends.
        port = free_port()
        node_dir = work / "kill"
        env = env_for(node_dir, port, orthanc, args.views, MR2CT_STABLE_SECONDS="3600")
        kill_slices = 400
        s = write_mr_series(work / "kill-mr", seed=2100, slices=kill_slices, size=128, pixel_spacing=2.0, slice_spacing=0.5)
        node = NodeServer(node_dir, env, port)
        node.start()
        sender = send_in_background(s.folder, port)
        wait_until_spooled(env, s.study_uid, s.series_uid, 60)  # kill while the series arrives
        node.kill()
        node.stop()
        acked_files = _acknowledged(sender.communicate(timeout=60)[0])
        env["MR2CT_STABLE_SECONDS"] = "2"
        with NodeServer(node_dir, env, port) as restarted:
            with init_db(env["MR2CT_DATABASE_URL"])() as session:
                known = set(session.scalars(select(Instance.sop_instance_uid)))
            kept = sum(1 for f in acked_files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in known)
            send(s.folder, port)
            job = wait_for_job(env["MR2CT_DATABASE_URL"], s.series_uid, timeout=600)
            time.sleep(3)
            peaks["kill -9 during arrival"] = peak_rss(restarted)
        dup = max(0, jobs_for(env["MR2CT_DATABASE_URL"], s.series_uid) - 1) + max(0, len(ct_series_counts(orthanc, s.study_uid)) - 1)
        rows.append(row("kill -9 during arrival", kill_slices, len(acked_files), kept, dup, faults=1, survived=int(job.state == "done")))

        # 3. Orthanc down while results are stored.
        http_port, dicom_port = free_port(), free_port()
        pacs = OrthancServer(work / "pacs", http_port, dicom_port)
        pacs.start()
        port = free_port()
        node_dir = work / "outage"
        env = env_for(node_dir, port, pacs, args.views)
        s = write_mr_series(work / "outage-mr", seed=2200, slices=20, size=64, pixel_spacing=4.0, slice_spacing=4.0)
        with NodeServer(node_dir, env, port):
            pacs.stop()
            code, acked_files = send(s.folder, port)
            time.sleep(6)
            back = OrthancServer(work / "pacs", http_port, dicom_port)
            back.password = pacs.password
            with back:
                job = wait_for_job(env["MR2CT_DATABASE_URL"], s.series_uid, timeout=300)
                counts = ct_series_counts(back, s.study_uid)
        rows.append(row("Orthanc down while storing", 20, len(acked_files), stored_count(env["MR2CT_DATABASE_URL"], s.series_uid),
                        max(0, len(counts) - 1), faults=1, survived=int(job.state == "done" and counts == [20])))

        # 4. The node's PostgreSQL stopped while a series arrives (a restart, a failover), back 5 s later;
        # meanwhile another scanner's instance is refused (no Pixel Data): its refusal must be recorded once
        # the database is back (the journal), not lost.
        db_slices = 200
        with PostgresServer(None, free_port()) as postgres:
            port = free_port()
            node_dir = work / "database"
            env = env_for(node_dir, port, orthanc, args.views, MR2CT_DATABASE_URL=postgres.url)
            s = write_mr_series(work / "database-mr", seed=2250, slices=db_slices, size=128, pixel_spacing=2.0, slice_spacing=0.5)
            refusal = make_variant(write_mr_series(work / "database-gap", seed=2251, slices=1, size=32, pixel_spacing=8.0).files[0],
                                   work / "database-gap", "no-pixel-data")
            refused_sop = str(pydicom.dcmread(refusal).SOPInstanceUID)
            with NodeServer(node_dir, env, port) as node:
                sender = send_in_background(s.folder, port)
                wait_until_spooled(env, s.study_uid, s.series_uid, 40)
                postgres.halt()
                started = time.monotonic()
                refused_status = store_one(refusal, port)
                time.sleep(max(0.0, 5 - (time.monotonic() - started)))
                postgres.resume()
                output = sender.communicate(timeout=300)[0]
                acked_files = _acknowledged(output)
                job = wait_for_job(postgres.url, s.series_uid, timeout=600)
                stored = stored_count(postgres.url, s.series_uid)
                dup = max(0, jobs_for(postgres.url, s.series_uid) - 1) + max(0, len(ct_series_counts(orthanc, s.study_uid)) - 1)
                peaks["database down during arrival"] = peak_rss(node)
                refusal_kept = wait_for_refusal(postgres.url, refused_sop, 60)
        rows.append(row("database down during arrival", db_slices + 1, len(acked_files), stored, dup, faults=2,
                        survived=int(job.state == "done" and sender.returncode == 0 and job.instance_count == db_slices)
                        + int(refusal_kept), tried=1, refused=int(refused_status == CASES["no-pixel-data"])))

        # 5. Hostile input over C-STORE.
        port = free_port()
        node_dir = work / "hostile"
        env = env_for(node_dir, port, orthanc, args.views)
        good = write_mr_series(work / "good", seed=2300, slices=1, size=64, pixel_spacing=4.0).files[0]
        refused = answered = 0
        _config.STORE_SEND_CHUNKED_DATASET = True
        with NodeServer(node_dir, env, port):
            for case in CASES:
                path = make_variant(good, work, case)
                ae = AE(ae_title=SCANNER_AE)
                ae.add_requested_context(MRImageStorage)
                ae.add_requested_context("1.2.840.10008.1.1")
                assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
                try:
                    status = assoc.send_c_store(path)
                    refused += int(bool(status) and status.Status in CASES[case])
                    answered += int(assoc.send_c_echo().Status == 0)
                finally:
                    assoc.release()
        outside = [p for p in node_dir.rglob("*") if p.is_file() and "spool" not in p.parts and p.name not in ("mr2ct.log", "mr2ct.db", "mr2ct.db-wal", "mr2ct.db-shm")]
        rows.append(row("hostile input", len(CASES), 0, 0, 0, tried=len(CASES), refused=refused if not outside else 0,
                        faults=len(CASES), survived=answered))
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)

    for r in rows:
        r["peak_rss_mib"] = peaks.get(str(r["scenario"]), 0)
    columns = ["scenario", "sent", "acknowledged", "stored", "lost", "duplicated", "faults", "survived", "malformed", "refused", "peak_rss_mib"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in columns))
    total = {c: sum(int(r[c]) for r in rows) for c in columns[1:-1]}  # type: ignore[call-overload]
    print(json.dumps({
        "sent": total["sent"], "acknowledged": total["acknowledged"], "lost": total["lost"], "duplicates": total["duplicated"],
        "faults_injected": total["faults"], "faults_survived": total["survived"], "bad_tried": total["malformed"],
        "bad_refused": total["refused"], "peak_rss_mib": max(int(r["peak_rss_mib"]) for r in rows),
    }))


if __name__ == "__main__":
    main()
