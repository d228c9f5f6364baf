"""``mr2ct demo``: Orthanc + mr2ct on loopback, a phantom MR series sent by storescu, the sCT shown in Orthanc."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import select

from dicom_node.tokens import create_token
from dicom_node.db import init_db
from dicom_node.local_stack import NodeServer, OrthancServer, storescu
from dicom_node.models import Job
from dicom_node.orthanc_store import OUTCOME_FLAG, OrthancStore
from synthesis.progress import progress_bar
from training.phantom_dicom import write_mr_series


def wait_for_job(database_url: str, series_uid: str, timeout: float, done_before: int = 0,
                 on_progress: Callable[[Job], None] | None = None) -> Job:
    """Wait until a job for ``series_uid`` newer than job id ``done_before`` has ended (done, failed
    or cancelled); ``on_progress`` is shown the newest such job at each look meanwhile."""
    sessions = init_db(database_url)
    jobs = select(Job).where(Job.series_instance_uid == series_uid, Job.id > done_before).order_by(Job.id.desc())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            job = session.scalars(jobs.where(Job.state.in_(("done", "failed", "cancelled")))).first()
            pending = None if job is not None or on_progress is None else session.scalars(jobs).first()
        if job is not None:
            return job
        if pending is not None:
            on_progress(pending)
        time.sleep(0.5)
    raise TimeoutError(f"no ended job for series {series_uid} within {timeout:.0f} s")


def _outcome_note(orthanc: OrthancServer, series_uid: str, timeout: float = 10.0) -> str | None:
    """The node's note on the MR series in Orthanc (dicom_node.outcomes) once it names the sCT; None if it
    does not within ``timeout`` (the node writes it a moment after the job)."""
    store = OrthancStore(orthanc.url, orthanc.username, orthanc.password)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series_id = store.series_id(series_uid)
        if series_id is not None:
            answer = httpx.get(f"{orthanc.url}/series/{series_id}/metadata/{OUTCOME_FLAG}", auth=orthanc.auth, timeout=10)
            if answer.status_code == 200 and "sCT stored" in answer.text:
                return answer.text
        time.sleep(0.3)
    return None


def run_demo(workdir: Path, once: bool, orthanc_http: int, orthanc_dicom: int, node_port: int, slices: int, say=print,
             api_port: int = 8800) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "mr2ct.db"
    database.unlink(missing_ok=True)  # each demo starts afresh: no database, and so no spool either
    shutil.rmtree(workdir / "spool", ignore_errors=True)  # (start-up recovery would record a past run's files again)
    orthanc = OrthancServer(workdir / "orthanc", orthanc_http, orthanc_dicom, modalities={"mr2ct": ["MR2CT", "127.0.0.1", node_port], "scanner": ["DEMO_SCANNER", "127.0.0.1", 104]})
    node: NodeServer | None = None
    try:
        say(f"starting Orthanc on http://127.0.0.1:{orthanc_http} (DICOM {orthanc_dicom}) ...")
        orthanc.start()
        env = {
            "MR2CT_AE_TITLE": "MR2CT", "MR2CT_DICOM_PORT": str(node_port), "MR2CT_ALLOWED_AES": "DEMO_SCANNER,ORTHANC",
            "MR2CT_SPOOL_DIR": str(workdir / "spool"), "MR2CT_DATABASE_URL": f"sqlite:///{database}",
            "MR2CT_ORTHANC_URL": orthanc.url, "MR2CT_ORTHANC_USERNAME": orthanc.username, "MR2CT_ORTHANC_PASSWORD": orthanc.password,
            "MR2CT_STABLE_SECONDS": "2", "MR2CT_API_PORT": str(api_port),
        }
        say(f"starting mr2ct serve (AE MR2CT on 127.0.0.1:{node_port}) ...")
        node = NodeServer(workdir / "node", env, node_port)
        node.start()
        say(f"making a phantom T1 head series ({slices} slices, 256x256) ...")
        series = write_mr_series(workdir / "sample-mr", seed=7, slices=slices, size=256, pixel_spacing=1.0, slice_spacing=4.0)
        say("sending it with storescu (TCP_NODELAY=1) as DEMO_SCANNER -> MR2CT ...")
        sent = storescu(series.folder, node_port, "MR2CT", "DEMO_SCANNER")
        if sent.returncode != 0:
            say(f"storescu failed ({sent.returncode}):\n{sent.stderr}")
            return 1
        started = time.monotonic()
        say("and to Orthanc, so the MR sits next to its sCT in the viewer ...")
        to_pacs = storescu(series.folder, orthanc_dicom, orthanc.aet, "DEMO_SCANNER")
        if to_pacs.returncode != 0:
            say(f"storescu to Orthanc failed ({to_pacs.returncode}):\n{to_pacs.stderr}")
            return 1
        with progress_bar(total=slices, desc="sCT", unit="slice",
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} slices [{elapsed}<{remaining}{postfix}]") as bar:

            said = time.monotonic()

            def show(job: Job) -> None:  # the node's own figure: its worker writes it about once a second
                nonlocal said
                done = (job.progress or 0.0) * slices
                doing = job.stage or job.state  # reading, synthesizing, storing; or queued
                if bar.disable:  # no terminal (a pipe, a log file): a plain line now and then instead
                    if time.monotonic() - said >= 15:
                        say(f"  sCT: job {job.id} {doing}, {done:.0f} of {slices} slices synthesized")
                        said = time.monotonic()
                    return
                bar.set_postfix_str(f"job {job.id} {doing}", refresh=False)
                bar.update(done - bar.n)

            job = wait_for_job(f"sqlite:///{database}", series.series_uid, timeout=600, on_progress=show)
            if job.state == "done":
                bar.update(slices - bar.n)
        if job.state != "done":
            say(f"the job {'was cancelled' if job.state == 'cancelled' else 'failed'}: {job.error}\nnode log: {node.log_path}")
            return 1
        study_id = OrthancStore(orthanc.url, orthanc.username, orthanc.password).study_id(series.study_uid)
        say("")
        say(f"synthetic CT stored in Orthanc ({time.monotonic() - started:.1f} s after the last instance was sent, job {job.seconds:.1f} s on {job.device})")
        say(f"  Orthanc Explorer : {orthanc.url}/app/explorer.html#study?uuid={study_id}")
        say(f"  login            : {orthanc.username} / {orthanc.password}")
        say(f"  study UID        : {series.study_uid}")
        say(f"  MR series UID    : {series.series_uid}")
        say(f"  sCT series UID   : {job.ct_series_uid} ({job.instance_count} instances)")
        say(f"  SR series UID    : {job.sr_series_uid}")
        note = _outcome_note(orthanc, series.series_uid)
        if note:
            say(f"  on the MR series : {note}  (its Mr2ctOutcome metadata, shown in Orthanc Explorer)")
        token = create_token(init_db(f"sqlite:///{database}"), "auditor", "demo")
        say(f"  admin API        : http://127.0.0.1:{api_port}/jobs  (auditor token: {token})")
        say(f"                     curl -H 'Authorization: Bearer {token}' http://127.0.0.1:{api_port}/audit")
        say(f"  logs             : {node.log_path}, {orthanc.log_path}")
        if once or not sys.stdin.isatty():
            say("stopping (--once or no terminal).")
            return 0
        say("\nOrthanc and mr2ct keep running; press Ctrl-C to stop them.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        say("stopping ...")
        return 0
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
