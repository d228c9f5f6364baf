"""Job leases: a job that runs longer than one lease stays with its worker; a worker whose lease did
run out (it hung, its host lost the network) neither keeps it nor overwrites the outcome of the
worker that took it over."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import init_db
from dicom_node.models import Job, Series
from dicom_node.worker import Progress, claim_job, held_lease, renew_lease, settle_job


def _queued_job(tmp_path: Path) -> tuple[sessionmaker[Session], int]:
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:
        session.add(Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", modality="MR", calling_ae="SCANNER", state="stable"))
        job = Job(series_instance_uid="1.2.3.4", state="queued")
        session.add(job)
        session.flush()
        return sessions, job.id


def test_a_job_longer_than_its_lease_is_not_claimed_twice_and_a_lost_lease_writes_nothing(tmp_path: Path) -> None:
    sessions, job_id = _queued_job(tmp_path)
    assert claim_job(sessions, "host:1", lease_seconds=2) == job_id
    with held_lease(sessions, job_id, "host:1", lease_seconds=2):
        time.sleep(5)  # two and a half leases: renewed every half second all along
        assert claim_job(sessions, "host:2", lease_seconds=60) is None
    time.sleep(2.5)  # no longer renewed (the worker hung): the lease runs out
    assert claim_job(sessions, "host:2", lease_seconds=60) == job_id
    assert not renew_lease(sessions, job_id, "host:1", lease_seconds=2)  # the first worker learns it lost the job
    assert not settle_job(sessions, job_id, "host:1", state="done")  # ...and its late outcome is not written
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.worker, job.attempts) == ("running", "host:2", 2)
    assert settle_job(sessions, job_id, "host:2", state="done")
    with sessions() as session:
        assert session.get(Job, job_id).state == "done"


def test_a_job_cancelled_while_it_runs_tells_its_worker_within_about_a_second(tmp_path: Path) -> None:
    sessions, job_id = _queued_job(tmp_path)
    assert claim_job(sessions, "host:1") == job_id
    with held_lease(sessions, job_id, "host:1", check_seconds=0.2) as lost:
        time.sleep(0.5)
        assert not lost.is_set()
        with sessions.begin() as session:  # what POST /jobs/{id}/cancel does to a running job
            session.get(Job, job_id).state = "cancelled"
        assert lost.wait(timeout=5)
    assert not settle_job(sessions, job_id, "host:1", state="done")
    with sessions() as session:
        assert session.get(Job, job_id).state == "cancelled"


def _progress_in_row(sessions: sessionmaker[Session], job_id: int, wanted: float | None, timeout: float = 5.0) -> float | None:
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            progress = session.get(Job, job_id).progress
        if progress == wanted or time.monotonic() > deadline:
            return progress
        time.sleep(0.05)


def test_a_running_job_shows_how_far_it_is_and_a_job_taken_over_starts_again_from_nothing(tmp_path: Path) -> None:
    """The synthesis thread only sets a number; the lease thread writes it with its next look, so
    GET /jobs/{id} and the dashboard follow a long job. A job another worker takes over (the first
    one's lease ran out) shows no progress until its new worker has synthesized something."""
    sessions, job_id = _queued_job(tmp_path)
    assert claim_job(sessions, "host:1", lease_seconds=2) == job_id
    progress = Progress()
    with held_lease(sessions, job_id, "host:1", lease_seconds=2, check_seconds=0.2, progress=progress) as lost:
        assert _progress_in_row(sessions, job_id, None, timeout=0.5) is None  # nothing synthesized yet
        progress(0.25)
        assert _progress_in_row(sessions, job_id, 0.25) == 0.25
        progress(0.5)
        assert _progress_in_row(sessions, job_id, 0.5) == 0.5
        assert not lost.is_set()
    time.sleep(2.5)  # the worker hung: its lease runs out, and another takes the job
    assert claim_job(sessions, "host:2", lease_seconds=60) == job_id
    with sessions() as session:
        assert session.get(Job, job_id).progress is None
