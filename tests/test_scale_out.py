"""Scale-out on PostgreSQL: one SCP process and three worker processes share a real PostgreSQL
server; twelve series are each synthesized exactly once; the admin API answers from the same
database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import NodeServer, OrthancServer, PostgresServer, free_port, storescu
from dicom_node.models import Job
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import env_without_mr2ct, study_series
from training.phantom_dicom import write_mr_series


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with PostgresServer(tmp_path_factory.mktemp("pg"), free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def orthanc(postgres, tmp_path_factory):
    """Orthanc with its index in the same PostgreSQL server (Debian's orthanc-postgresql)."""
    index = {"Host": "127.0.0.1", "Port": postgres.port, "Database": "orthanc", "Username": "mr2ct"}
    with OrthancServer(tmp_path_factory.mktemp("orthanc-pg"), free_port(), free_port(), postgres_index=index) as server:
        yield server


def _holds_torch(pid: int) -> bool:
    """Whether the process has torch's library mapped (imported torch)."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


def test_orthanc_keeps_its_index_in_postgresql(orthanc, postgres):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=postgres.port, user="mr2ct", dbname="orthanc") as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert "resources" in tables  # Orthanc's index schema


def test_three_workers_synthesize_twelve_series_exactly_once(postgres, orthanc, tmp_path):
    port = free_port()
    processes = []
    try:
        for index, role in enumerate(["scp", "worker", "worker", "worker", "api"]):
            env = node_env(tmp_path / f"{role}{index}", port, orthanc)
            env["MR2CT_DATABASE_URL"] = postgres.url
            env["MR2CT_SPOOL_DIR"] = str(tmp_path / "shared-spool")  # workers read what the SCP spooled
            if role == "api":
                api_port = int(env["MR2CT_API_PORT"])
            server = NodeServer(tmp_path / f"{role}{index}", env, port, role=role)
            processes.append(server)
        for server in processes:
            server.start()
        series = [write_mr_series(tmp_path / f"mr{i}", seed=800 + i, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0) for i in range(12)]
        for s in series:
            assert storescu(s.folder, port, NODE_AE, SCANNER_AE).returncode == 0
        for s in series:
            assert wait_for_job(postgres.url, s.series_uid, timeout=300).state == "done"
        with init_db(postgres.url)() as session:
            jobs = session.scalars(select(Job)).all()
        per_series = Counter(j.series_instance_uid for j in jobs)
        assert sorted(per_series.values()) == [1] * 12
        workers = Counter(j.worker for j in jobs)
        print(f"jobs per worker: {dict(workers)}")
        assert all(w and not w.endswith(str(processes[0].proc.pid)) for w in workers)  # the SCP process runs no job
        for s in series:
            cts = [x for x in study_series(orthanc, s.study_uid) if x["MainDicomTags"]["Modality"] == "CT"]
            assert len(cts) == 1 and len(cts[0]["Instances"]) == 4
        env = env_without_mr2ct()
        env["MR2CT_DATABASE_URL"] = postgres.url
        token = subprocess.run([sys.executable, "-m", "dicom_node.cli", "tokens", "create", "--role", "auditor", "--name", "pg"],
                               capture_output=True, text=True, env=env, check=True).stdout.strip()
        listed = httpx.get(f"http://127.0.0.1:{api_port}/jobs", params={"state": "done", "limit": 100},
                           headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert listed["total"] == 12
        # torch is loaded by the processes that synthesize, not by the SCP and API ones (each starts
        # ~1.5 s sooner and holds ~200 MB less without it), after all they did above
        holds_torch = [(server.role, _holds_torch(server.proc.pid)) for server in processes]
        assert holds_torch == [("scp", False), ("worker", True), ("worker", True), ("worker", True), ("api", False)], holds_torch
    finally:
        for server in processes:
            server.stop()


def test_a_worker_without_the_scps_spool_reads_the_originals_from_orthanc(postgres, orthanc, tmp_path):
    """A worker on a GPU host shares the database, not the SCP's spool (originals_from = orthanc):
    the originals its host does not hold are read from Orthanc, and while Orthanc does not hold
    them yet (its routing, or the node's forward_originals, still on the way) the job waits and is
    tried again, then synthesized from what Orthanc holds, its sCT in the same study."""
    port = free_port()
    processes = []
    try:
        for role in ("scp", "worker"):
            env = node_env(tmp_path / role, port, orthanc)  # each its own spool_dir: nothing shared but the database
            env.update(MR2CT_DATABASE_URL=postgres.url, MR2CT_ORIGINALS_FROM="orthanc", MR2CT_STABLE_SECONDS="1")
            processes.append(NodeServer(tmp_path / role, env, port, role=role))
        for server in processes:
            server.start()
        series = write_mr_series(tmp_path / "mr", seed=860, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
        assert storescu(series.folder, port, NODE_AE, SCANNER_AE).returncode == 0

        def job() -> Job | None:
            with init_db(postgres.url)() as session:
                return session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid)).first()

        deadline = time.monotonic() + 60
        while not ((j := job()) is not None and j.error and "holds 0 of the 4 originals" in j.error):
            assert time.monotonic() < deadline, "the job did not wait for Orthanc to hold the originals"
            time.sleep(0.3)
        assert j.state in ("queued", "running")
        for f in series.files:  # Orthanc receives the series (as its own routing, or forward_originals, would bring it)
            assert httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth).status_code == 200
        assert wait_for_job(postgres.url, series.series_uid, timeout=120).state == "done"
        cts = [x for x in study_series(orthanc, series.study_uid) if x["MainDicomTags"]["Modality"] == "CT"]
        assert len(cts) == 1 and len(cts[0]["Instances"]) == 4
        assert not list((tmp_path / "worker" / "spool").rglob("*.dcm"))  # nothing was read from a spool of the worker's host
        assert "originals read from Orthanc" in processes[1].log_path.read_text()
    finally:
        for server in processes:
            server.stop()


def test_an_unreachable_database_stops_start_up_naming_the_url(tmp_path):
    env = env_without_mr2ct()
    env.update(MR2CT_DATABASE_URL=f"postgresql+psycopg://mr2ct:secret@127.0.0.1:{free_port()}/mr2ct", MR2CT_DICOM_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "database_url" in result.stderr and "127.0.0.1" in result.stderr and "secret" not in result.stderr


def test_a_worker_process_is_woken_by_postgresql_when_another_process_queues_a_job(postgres, orthanc, tmp_path):
    """SCP and worker in separate processes, the worker polling only once a minute: the job the
    SCP queues reaches it through LISTEN/NOTIFY, in seconds."""
    port = free_port()
    processes = []
    try:
        for role in ("scp", "worker"):
            env = node_env(tmp_path / role, port, orthanc)
            env.update(MR2CT_DATABASE_URL=postgres.url, MR2CT_SPOOL_DIR=str(tmp_path / "shared-spool"), MR2CT_POLL_SECONDS="60",
                       MR2CT_COMPLETE_ON_RELEASE="true", MR2CT_STABLE_SECONDS="3600")
            processes.append(NodeServer(tmp_path / role, env, port, role=role))
        for server in processes:
            server.start()
        worker_log = tmp_path / "worker" / "mr2ct.log"
        deadline = time.monotonic() + 60
        while "worker warmed up" not in (worker_log.read_text() if worker_log.exists() else ""):
            assert time.monotonic() < deadline, "the worker did not warm up"
            time.sleep(0.2)
        time.sleep(1.0)  # its first claim found nothing: from here only a notification (or a minute) wakes it
        series = write_mr_series(tmp_path / "mr", seed=850, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
        started = time.monotonic()
        assert storescu(series.folder, port, NODE_AE, SCANNER_AE).returncode == 0
        assert wait_for_job(postgres.url, series.series_uid, timeout=45).state == "done"
        assert time.monotonic() - started < 45
    finally:
        for server in processes:
            server.stop()
