"""What the admin API and the dashboard both do to jobs and models (one rule, two ways in)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.db import notify_job_queued
from dicom_node.models import Instance, Job, ModelVersion, Series, utcnow
from dicom_node.outcomes import mark_due
from dicom_node.retention import lock_series, purged_reason
from dicom_node.settings import Settings


def pending_job(session: Session, series_uid: str) -> Job | None:
    """The series' newest job still queued or running, if any."""
    return session.scalar(select(Job).where(Job.series_instance_uid == series_uid, Job.state.in_(("queued", "running")))
                          .order_by(Job.id.desc()).limit(1))


def retry_job(sessions: sessionmaker[Session], job_id: int, actor: str, *, purged_from_orthanc: bool = False,
              **audited: Any) -> dict[str, Any]:
    """A new job for a finished, failed or cancelled job's series, made again even if nothing changed;
    HTTPException 404 (no such job) or 409 saying why not (the job still queued or running, its
    series has a job under way, its originals deleted by spool retention, unless
    ``purged_from_orthanc``: the node's workers read those from Orthanc, originals_from = orthanc)."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        lock_series(session, job.series_instance_uid)  # spool retention's purge of the series waits, or went first
        session.refresh(job)
        if job.state in ("queued", "running"):
            raise HTTPException(409, f"job {job_id} is {job.state}; only finished, failed or cancelled jobs can be retried")
        pending = pending_job(session, job.series_instance_uid)
        if pending is not None:  # a second press of Retry, or a re-send's own job: one job per series at a time
            raise HTTPException(409, f"job {job_id}: its series has job {pending.id} {pending.state} already")
        series = session.get(Series, job.series_instance_uid)
        purged, of = session.execute(select(func.count(Instance.purged_at), func.count()).where(
            Instance.series_instance_uid == job.series_instance_uid, Instance.set_aside.is_(None))).one()
        if purged and not purged_from_orthanc:
            raise HTTPException(409, f"job {job_id}: {purged_reason(purged, of)}")
        new = Job(series_instance_uid=job.series_instance_uid, state="queued", instance_count=series.instance_count if series else 0,
                  remake=True)  # asked for: made again even if nothing changed (dicom_node.worker keeps an unchanged series' sCT)
        session.add(new)
        session.flush()
        notify_job_queued(session)
        mark_due(session, job.series_instance_uid)
        new_id = new.id
    audit.record(sessions, "job-retry", "success", actor, series_uid=job.series_instance_uid, job_id=new_id, retry_of=job_id, **audited)
    return {"job_id": new_id, "retry_of": job_id, "state": "queued"}


def cancel_job(sessions: sessionmaker[Session], job_id: int, actor: str, **audited: Any) -> dict[str, Any]:
    """A queued job is not run; a running one stops within about a second (its worker looks every
    CHECK_SECONDS) with nothing stored, unless it was already storing its sCT, which then goes into
    Orthanc whole (audited as transferred) and the job stays cancelled. HTTPException 404, or 409
    for a job no longer queued or running."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job.state not in ("queued", "running"):
            raise HTTPException(409, f"job {job_id} is {job.state}; only queued or running jobs can be cancelled")
        was_running = job.state == "running"
        job.state, job.finished_at, job.lease_until, job.stage = "cancelled", utcnow(), None, None
        job.error = f"cancelled by {actor}" + (" while it ran" if was_running else "")
        series_uid = job.series_instance_uid
        mark_due(session, series_uid)
    audit.record(sessions, "job-cancelled", "success", actor, series_uid=series_uid, job_id=job_id, was_running=was_running, **audited)
    return {"job_id": job_id, "state": "cancelled", "was_running": was_running}


def activate_model(sessions: sessionmaker[Session], model_id: int, actor: str, selection: Settings | None = None) -> tuple[ModelVersion, list[str]]:
    """Make registered model ``model_id`` the one the workers use from their next job on: the model,
    and how the node's selection rules (``selection``, its settings) let through series its card says
    it never learned (warnings: the selection stays the config's; none with select_follow_model, where
    it follows the card). HTTPException 404 (no such model)
    or 409 saying why not (its file now holds other weights)."""
    from dicom_node.preflight import selection_against_card
    from dicom_node.registry import activate
    from synthesis.errors import ModelMismatch

    with sessions() as session:
        if session.get(ModelVersion, model_id) is None:
            raise HTTPException(404, f"no model {model_id}")
    try:
        chosen = activate(sessions, str(model_id), actor=actor)
    except (ModelMismatch, ValueError) as exc:
        raise HTTPException(409, str(exc)) from exc
    return chosen, selection_against_card(chosen.card or {}, selection)[1] if selection is not None else []
