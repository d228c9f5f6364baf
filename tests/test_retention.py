"""Spool retention: the PACS administrator bounds the spool with spool_retention_hours. Originals
the node still needs (a job queued, running or failed; a series still arriving; an instance not
yet routed) stay; a re-send racing the purge is never lost; a crash in the middle is undone at
start; a job asked for a purged series says why, and sending the series again makes it whole."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select, text

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import PostgresServer, free_port, storescu
from dicom_node.models import AuditEvent, Instance, Job, RefusedInstance, Series, utcnow
from dicom_node.recovery import recover_spool
from dicom_node import retention
from dicom_node.retention import SPOOL_PURGED, lock_series, purge_spool
from dicom_node.spool import Spool
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import api_token, env_without_mr2ct, served_api
from training.phantom_dicom import write_mr_series

HOUR = timedelta(hours=1)
STUDY = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with PostgresServer(tmp_path_factory.mktemp("pg"), free_port()) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def spooled(request, tmp_path: Path):
    """A real spool and database (SQLite, or PostgreSQL as a scale-out deployment has), and a way
    to put a series of two instances in both."""
    spool = Spool(tmp_path / "spool")
    if request.param == "sqlite":
        sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    else:
        sessions = init_db(request.getfixturevalue("postgres").url)
        with sessions.begin() as session:  # each test starts from an empty database
            session.execute(text("TRUNCATE audit_events, jobs, instances, series, refused_instances CASCADE"))

    def add(n: int, *, series_state: str = "stable", job_state: str | None = "done", hours_ago: float = 2.0,
            forwarded: bool = False, finished_hours_ago: float | None = None) -> list[Path]:
        series_uid = f"{STUDY}.{n}"
        received = utcnow() - timedelta(hours=hours_ago)
        paths = []
        with sessions.begin() as session:
            session.add(Series(series_instance_uid=series_uid, study_instance_uid=STUDY, modality="MR", calling_ae=SCANNER_AE,
                               instance_count=2, state=series_state, first_received_at=received, last_received_at=received))
            session.flush()
            for i in (1, 2):
                sop = f"{series_uid}.{i}"
                path = spool.write(STUDY, series_uid, sop, b"\0" * 128 + b"DICM" + bytes(1000))
                os.utime(path, (received.timestamp(), received.timestamp()))
                paths.append(path)
                session.add(Instance(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", series_instance_uid=series_uid,
                                     transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(path), size_bytes=path.stat().st_size,
                                     received_at=received, forwarded_at=received if forwarded else None))
            if job_state is not None:
                session.add(Job(series_instance_uid=series_uid, state="failed", created_at=received))  # an older attempt
                finished = None if finished_hours_ago is None else utcnow() - timedelta(hours=finished_hours_ago)
                session.add(Job(series_instance_uid=series_uid, state=job_state, created_at=received, finished_at=finished))
        return paths

    return spool, sessions, add


def _purged(sessions, paths: list[Path]) -> list[bool]:
    with sessions() as session:
        rows = {r.path: r.purged_at for r in session.scalars(select(Instance))}
    return [rows[str(p)] is not None for p in paths]


def test_only_originals_no_longer_needed_are_deleted(spooled):
    spool, sessions, add = spooled
    done, ignored = add(1), add(2, series_state="ignored", job_state=None)
    failed, queued, running = add(3, job_state="failed"), add(4, job_state="queued"), add(5, job_state="running")
    arriving, recent = add(6, series_state="receiving", job_state=None), add(7, hours_ago=0.5)
    counts = purge_spool(sessions, spool.root, HOUR, routing=False)
    assert counts == {"instances": 4, "series": 2, "bytes_freed": 4 * 1132, "kept_resent": 0, "outside_spool": 0, "failed_instances": 0}
    for paths in (done, ignored):
        assert not any(p.exists() for p in paths) and _purged(sessions, paths) == [True, True]
        assert not paths[0].parent.exists()  # the empty series folder goes too
    for paths in (failed, queued, running, arriving, recent):
        assert all(p.exists() for p in paths) and _purged(sessions, paths) == [False, False]
    with sessions() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == SPOOL_PURGED)).all()
    assert event.detail["instances"] == 4 and event.detail["retention_hours"] == 1
    assert purge_spool(sessions, spool.root, HOUR, routing=False)["instances"] == 0  # nothing twice


def test_a_failed_series_goes_only_with_spool_failed_retention_hours_once_it_failed_that_long_ago(spooled):
    """A series that keeps failing must not fill the spool: with the longer failed retention its
    originals go once the job failed that long ago (and they arrived that long ago); a job that
    failed lately (retried yesterday, failed again now) keeps them for the next retry."""
    spool, sessions, add = spooled
    failed_long_ago = add(1, job_state="failed", hours_ago=30, finished_hours_ago=29)
    failed_lately = add(2, job_state="failed", hours_ago=30, finished_hours_ago=1)
    failed_no_time = add(3, job_state="failed", hours_ago=30)  # no finished_at: the job's creation counts
    failed_recent = add(4, job_state="failed", hours_ago=5)
    queued, done = add(5, job_state="queued", hours_ago=30), add(6, hours_ago=30)
    # a cancelled job is kept for its retry as a failed one is, and goes as one does
    cancelled_long_ago = add(9, job_state="cancelled", hours_ago=30, finished_hours_ago=29)
    cancelled_lately = add(10, job_state="cancelled", hours_ago=30, finished_hours_ago=1)
    day = timedelta(hours=24)
    assert purge_spool(sessions, spool.root, HOUR, routing=False)["instances"] == 2  # without it: only the series done
    counts = purge_spool(sessions, spool.root, HOUR, routing=False, failed_retention=day)
    assert counts["instances"] == counts["failed_instances"] == 6 and counts["series"] == 3
    for paths in (failed_long_ago, failed_no_time, cancelled_long_ago, done):
        assert not any(p.exists() for p in paths) and _purged(sessions, paths) == [True, True]
    for paths in (failed_lately, failed_recent, queued, cancelled_lately):
        assert all(p.exists() for p in paths) and _purged(sessions, paths) == [False, False]
    with sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == SPOOL_PURGED).order_by(AuditEvent.id)).all()
    assert events[-1].detail["failed_retention_hours"] == 24 and events[-1].detail["failed_instances"] == 6
    # failed retention alone (spool_retention_hours 0): only failed series are deleted
    later_failed, later_done = add(7, job_state="failed", hours_ago=30, finished_hours_ago=25), add(8, hours_ago=30)
    assert purge_spool(sessions, spool.root, None, routing=False, failed_retention=day)["instances"] == 2
    assert not any(p.exists() for p in later_failed) and all(p.exists() for p in later_done)


def test_a_series_set_aside_for_a_refused_instance_is_kept_for_it_as_a_failed_one_for_its_retry(spooled):
    """A series the node set aside because it refused an instance of it waits for that instance:
    its originals do not go as an ignored series' do (the mended instance would then find the rest
    gone), but with spool_failed_retention_hours, as a failed series' do."""
    spool, sessions, add = spooled
    held, ignored = add(1, series_state="ignored", job_state=None, hours_ago=30), add(2, series_state="ignored", job_state=None, hours_ago=30)
    with sessions.begin() as session:
        session.add(RefusedInstance(sop_instance_uid=f"{STUDY}.1.3", series_instance_uid=f"{STUDY}.1", status="0xA900",
                                    reason="the instance has no Pixel Data"))
    assert purge_spool(sessions, spool.root, HOUR, routing=False)["instances"] == 2  # only the series ignored by the rules
    assert all(p.exists() for p in held) and not any(p.exists() for p in ignored)
    counts = purge_spool(sessions, spool.root, HOUR, routing=False, failed_retention=timedelta(hours=24))
    assert counts["instances"] == counts["failed_instances"] == 2 and not any(p.exists() for p in held)


def test_when_routing_only_what_reached_the_destination_is_deleted(spooled):
    spool, sessions, add = spooled
    waiting, routed = add(1), add(2, forwarded=True)
    assert purge_spool(sessions, spool.root, HOUR, routing=True)["instances"] == 2
    assert all(p.exists() for p in waiting) and not any(p.exists() for p in routed)


def test_a_resend_that_landed_after_the_cutoff_is_kept(spooled):
    """The scanner sent the instance again (its file is new) and the database has not recorded it
    yet: the purge takes the file aside, sees it is new, and puts it back."""
    spool, sessions, add = spooled
    paths = add(1)
    paths[0].write_bytes(b"the re-sent instance")  # mtime now
    counts = purge_spool(sessions, spool.root, HOUR, routing=False)
    assert counts["instances"] == 1 and counts["kept_resent"] == 1
    assert paths[0].read_bytes() == b"the re-sent instance" and not paths[1].exists()
    assert _purged(sessions, paths) == [False, True]
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # nothing left aside


def test_a_row_naming_a_file_outside_the_spool_is_left_alone(spooled, tmp_path):
    """The database names the files to delete, but retention deletes only where the spool keeps
    them: a spool_dir that moved, or a row edited to name another file, deletes nothing."""
    spool, sessions, add = spooled
    paths = add(1)
    elsewhere = tmp_path / "elsewhere" / paths[0].name
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"not the spool's")
    os.utime(elsewhere, (0, 0))
    with sessions.begin() as session:
        session.get(Instance, paths[0].stem).path = str(elsewhere)
    counts = purge_spool(sessions, spool.root, HOUR, routing=False)
    assert counts["outside_spool"] == 1 and counts["instances"] == 1
    assert elsewhere.read_bytes() == b"not the spool's" and _purged(sessions, [elsewhere, paths[1]]) == [False, True]


def test_a_purge_a_crash_interrupted_is_undone_at_start(spooled):
    spool, sessions, add = spooled
    paths = add(1)
    for path in paths:  # what retention does first, before it deletes
        os.rename(path, path.with_name(f".{path.name}.purge"))
    paths[1].write_bytes(b"a re-send that arrived meanwhile")
    counts = recover_spool(spool, sessions)
    assert counts["purges_undone"] == 1
    assert paths[0].read_bytes().startswith(b"\0" * 128 + b"DICM") and paths[1].read_bytes() == b"a re-send that arrived meanwhile"
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)


@pytest.mark.parametrize("spooled", ["sqlite"], indirect=True)
def test_the_administrator_sees_what_would_go_then_purges_by_hand(spooled, tmp_path):
    """mr2ct spool status / purge --dry-run / purge, for a node that runs without retention."""
    spool, sessions, add = spooled
    done, failed = add(1), add(2, job_state="failed")
    env = env_without_mr2ct()
    env.update(MR2CT_DATABASE_URL=str(sessions.kw["bind"].url), MR2CT_SPOOL_DIR=str(spool.root))

    def mr2ct(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "spool", *args], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "4 originals, 0.0 MiB; 0 deleted" in mr2ct("status") and "every original is kept" in mr2ct("status")
    assert "would delete 2 originals of 1 series" in mr2ct("purge", "--older-than-hours", "1", "--dry-run")
    assert all(p.exists() for p in done + failed)
    assert "deleted 2 originals of 1 series" in mr2ct("purge", "--older-than-hours", "1")
    assert not any(p.exists() for p in done) and all(p.exists() for p in failed)
    assert "2 originals, 0.0 MiB; 2 deleted by spool retention" in mr2ct("status")
    env["MR2CT_SPOOL_FAILED_RETENTION_HOURS"] = "1"  # the failed series' job failed 2 hours ago
    assert "spool_failed_retention_hours 1: 2 originals of 1 failed or cancelled series" in mr2ct("status")
    assert "deleted 2 originals of 1 series (0.0 MiB), 2 of them of failed or cancelled series" in mr2ct("purge")
    assert not any(p.exists() for p in failed)
    del env["MR2CT_SPOOL_FAILED_RETENTION_HOURS"]
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "spool", "purge"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "--older-than-hours" in refused.stderr
    with sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == SPOOL_PURGED)).all()
    assert [e.actor for e in events] == ["mr2ct spool purge"] * 2


def test_a_running_node_purges_then_a_retry_says_why_and_a_resend_makes_the_series_whole(node_factory, orthanc, tmp_path):
    """Retention deletes a synthesized series' originals: a retry is refused saying why and what to
    do, a partial re-send fails saying how many are missing, a whole one is made again; and once
    deleted again, a series Orthanc holds (routed there) is made from Orthanc's copy, as the reason
    says (POST /synthesize)."""
    node = node_factory(spool_retention_hours="0.0005")  # 1.8 s
    series = write_mr_series(tmp_path / "mr", seed=81, slices=3, size=32, pixel_spacing=6.0, slice_spacing=6.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done", job.error
    folder = Path(node.env["MR2CT_SPOOL_DIR"]) / series.study_uid / series.series_uid
    sessions = init_db(node.database_url)

    def marked() -> list[bool]:  # a round deletes a batch's files first, then marks their rows in one commit
        with sessions() as session:
            return [r.purged_at is not None for r in session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid))]

    deadline = time.monotonic() + 60
    while (folder.exists() or not all(marked())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folder.exists(), "the originals of a synthesized series outlived spool_retention_hours"
    assert marked() == [True] * 3

    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'retention-admin')}"}
    refused = httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/jobs/{job.id}/retry", headers=admin, timeout=30)
    assert refused.status_code == 409 and "send the series again" in refused.json()["detail"]
    (listed,) = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/series", headers=admin, timeout=30).json()["items"]
    assert listed["series_instance_uid"] == series.series_uid and listed["purged_instances"] == 3
    metrics = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/metrics", headers=admin, timeout=30).text
    assert "mr2ct_spool_instances 0\n" in metrics and "mr2ct_spool_purged_instances 3\n" in metrics

    # the scanner sends one slice again: the series cannot be made from one slice of three, and the job says why
    assert storescu(series.files[0], node.port, NODE_AE, SCANNER_AE).returncode == 0
    partial = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=job.id)
    assert partial.state == "failed" and "2 of the series' 3 originals were deleted" in partial.error and "send the series again" in partial.error

    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    again = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=partial.id)
    assert again.state == "done", again.error
    assert again.ct_series_uid == job.ct_series_uid  # the same sCT series, rewritten

    deadline = time.monotonic() + 60
    while (folder.exists() or not all(marked())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marked() == [True] * 3
    assert "POST /synthesize" in httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/jobs/{again.id}/retry", headers=admin,
                                            timeout=30).json()["detail"]
    for path in series.files:  # Orthanc holds the series (a scanner sending to both, or the node's own routing)
        httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=orthanc.auth, timeout=30).raise_for_status()
    asked = httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/synthesize", headers=admin, json={"series_uid": series.series_uid},
                       timeout=60)
    assert asked.status_code == 202, asked.text
    remade = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=again.id)
    assert remade.id == asked.json()["job_id"] and remade.state == "done", remade.error


def test_with_originals_from_orthanc_a_retry_after_retention_reads_the_originals_from_orthanc(node_factory, orthanc, tmp_path):
    """originals_from = orthanc: the workers read from Orthanc what their spool does not hold, so a
    series whose originals retention deleted is retried (201, not 409) and made from Orthanc's copy;
    one Orthanc does not hold fails at once saying what is missing where, not after a day of retries."""
    node = node_factory(spool_retention_hours="0.0005", originals_from="orthanc")  # 1.8 s
    sessions = init_db(node.database_url)
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'orthanc-originals')}"}
    api = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    held, absent = (write_mr_series(tmp_path / name, seed=seed, slices=3, size=32, pixel_spacing=6.0, slice_spacing=6.0)
                    for name, seed in (("held", 82), ("absent", 83)))
    for path in held.files:  # a scanner sending to both: Orthanc holds this one, as its association gave it (implicit VR)
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID, ds.file_meta.SourceApplicationEntityTitle = ImplicitVRLittleEndian, SCANNER_AE
        encoded = io.BytesIO()
        ds.save_as(encoded, enforce_file_format=True, implicit_vr=True)
        httpx.post(f"{orthanc.url}/instances", content=encoded.getvalue(), auth=orthanc.auth, timeout=30).raise_for_status()
    for series in (held, absent):
        assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
        job = wait_for_job(node.database_url, series.series_uid, timeout=120)
        assert job.state == "done", job.error

        def purged() -> bool:
            with sessions() as session:
                rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
            return len(rows) == 3 and all(r.purged_at is not None and not Path(r.path).exists() for r in rows)

        deadline = time.monotonic() + 60
        while not purged() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert purged(), "retention did not delete the originals of a synthesized series"
        retried = httpx.post(f"{api}/jobs/{job.id}/retry", headers=admin, timeout=30)
        assert retried.status_code == 201, retried.text
        again = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=job.id)
        if series is held:
            assert again.state == "done" and again.ct_series_uid == job.ct_series_uid, again.error
            # Orthanc's copies, in implicit VR behind another File Meta header, are the same originals
            assert again.input_digest == job.input_digest
        else:
            assert again.state == "failed" and again.attempts == 1, (again.state, again.attempts, again.error)
            assert "3 of the series' 3 originals were deleted" in again.error and "holds 0 of the 3" in again.error, again.error


def test_a_retry_that_holds_the_series_while_a_round_runs_keeps_every_original_for_its_job(spooled, monkeypatch):
    """A failed series is due under spool_failed_retention_hours, and the administrator retries it
    just as a round has read what is due. The retry holds the series until its job is committed
    (as POST /jobs/{id}/retry does); the round waits for the series, sees the queued job, and
    deletes nothing: the retried job finds every original."""
    spool, sessions, add = spooled
    paths = add(1, job_state="failed", hours_ago=30, finished_hours_ago=29)
    reached = threading.Event()
    purge_series = retention._purge_series

    def signalling(*args, **kwargs):
        reached.set()  # the round read the series as due, and now asks for it
        return purge_series(*args, **kwargs)

    monkeypatch.setattr(retention, "_purge_series", signalling)
    counts: dict[str, int] = {}
    round_ = threading.Thread(target=lambda: counts.update(
        purge_spool(sessions, spool.root, None, routing=False, failed_retention=timedelta(hours=24))))
    with sessions.begin() as session:  # the retry's transaction
        lock_series(session, f"{STUDY}.1")
        round_.start()
        assert reached.wait(60)
        time.sleep(0.5)  # without the series lock, the round would delete now
        session.add(Job(series_instance_uid=f"{STUDY}.1", state="queued"))
    round_.join(60)
    assert not round_.is_alive() and counts["instances"] == 0
    assert all(p.exists() for p in paths) and _purged(sessions, paths) == [False, False]


def test_retry_is_refused_while_its_series_has_a_job_and_a_queued_retry_keeps_the_originals(spooled):
    """Pressing Retry twice makes one job, not two; the second press names the job waiting. And a
    failed series whose retry is queued is no longer due for deletion: its job needs the originals."""
    spool, sessions, add = spooled
    paths = add(1, job_state="failed", hours_ago=30, finished_hours_ago=29)
    with sessions() as session:
        failed = session.scalars(select(Job).where(Job.series_instance_uid == f"{STUDY}.1").order_by(Job.id.desc())).first()
    admin = {"Authorization": "Bearer retry-admin"}
    with served_api(sessions, {"retry-admin": "admin"}) as base:
        first = httpx.post(f"{base}/jobs/{failed.id}/retry", headers=admin, timeout=30)
        second = httpx.post(f"{base}/jobs/{failed.id}/retry", headers=admin, timeout=30)
    assert first.status_code == 201, first.text
    queued = first.json()["job_id"]
    assert second.status_code == 409 and second.json()["detail"] == f"job {failed.id}: its series has job {queued} queued already"
    with sessions() as session:
        assert [j.state for j in session.scalars(select(Job).where(Job.series_instance_uid == f"{STUDY}.1").order_by(Job.id))] == [
            "failed", "failed", "queued"]
    assert purge_spool(sessions, spool.root, HOUR, routing=False, failed_retention=timedelta(hours=24))["instances"] == 0
    assert all(p.exists() for p in paths)
