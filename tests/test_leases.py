"""Job leases: a job that runs longer than one lease stays with its worker; a worker whose lease did
run out (it hung, its host lost the network) neither keeps it nor overwrites the outcome of the
worker that took it over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
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


def test_a_job_its_worker_settled_is_not_taken_for_a_cancel_in_the_moment_before_its_lease_thread_stops(tmp_path: Path, caplog) -> None:
    """After the worker writes a job's outcome it still records the audit event and logs before the
    lease block ends; a look by the lease thread then found the job no longer running and warned
    "no longer this worker's (cancelled, ...)" of a job that had just finished. The outcome is
    written under the lease thread's lock, and after it the thread looks no more."""
    sessions, job_id = _queued_job(tmp_path)
    assert claim_job(sessions, "host:1") == job_id
    progress = Progress()
    with caplog.at_level("WARNING", logger="dicom_node.worker"):
        with held_lease(sessions, job_id, "host:1", check_seconds=0.005, progress=progress) as lost:
            time.sleep(0.1)  # the lease thread looks every 5 ms
            with progress.settling():
                assert settle_job(sessions, job_id, "host:1", state="done", stage=None)
            time.sleep(0.3)  # the worker's audit and log lines after the outcome
            assert not lost.is_set()
    assert "no longer this worker's" not in caplog.text
    with sessions() as session:
        assert session.get(Job, job_id).state == "done"


def _progress_in_row(sessions: sessionmaker[Session], job_id: int, wanted: tuple[float | None, str | None],
                     timeout: float = 5.0) -> tuple[float | None, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            job = session.get(Job, job_id)
            seen = (job.progress, job.stage)
        if seen == wanted or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_a_running_job_shows_how_far_it_is_and_a_job_taken_over_starts_again_from_nothing(tmp_path: Path) -> None:
    """The thread that runs the job only sets a stage and a number; the lease thread writes them with
    its next look, so GET /jobs/{id} and the dashboard follow a long job: reading, synthesizing (with
    the fraction done), storing (all synthesized, the sCT going to the PACS). A job another worker
    takes over (the first one's lease ran out) shows neither until its new worker gets to it."""
    sessions, job_id = _queued_job(tmp_path)
    assert claim_job(sessions, "host:1", lease_seconds=2) == job_id
    progress = Progress()
    with held_lease(sessions, job_id, "host:1", lease_seconds=2, check_seconds=0.2, progress=progress) as lost:
        assert _progress_in_row(sessions, job_id, (None, None), timeout=0.5) == (None, None)  # nothing done yet
        progress.enter("reading")
        assert _progress_in_row(sessions, job_id, (None, "reading")) == (None, "reading")
        progress.enter("synthesizing")
        progress(0.25)
        assert _progress_in_row(sessions, job_id, (0.25, "synthesizing")) == (0.25, "synthesizing")
        progress(0.5)
        assert _progress_in_row(sessions, job_id, (0.5, "synthesizing")) == (0.5, "synthesizing")
        progress(1.0)
        progress.enter("storing")
        assert _progress_in_row(sessions, job_id, (1.0, "storing")) == (1.0, "storing")
        assert not lost.is_set()
    time.sleep(2.5)  # the worker hung: its lease runs out, and another takes the job
    assert claim_job(sessions, "host:2", lease_seconds=60) == job_id
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.progress, job.stage) == (None, None)


def test_a_stage_the_worker_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="stage must be one of reading, synthesizing, storing, got 'uploading'"):
        Progress().enter("uploading")
