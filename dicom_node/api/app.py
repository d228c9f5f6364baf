"""The admin API. Every route but /health needs a bearer token; admins may act, auditors read,
requesters (Orthanc's "Synthesize CT" button) may only ask for a series to be synthesized.

Bad requests get 4xx with a reason (FastAPI's 422 for malformed parameters, 404/409 with a
message for the rest). Reading the audit trail is itself audited.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydicom
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as FastApiPath
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import Select, and_, case, func, or_, select, text, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit, forward_commitment
from dicom_node.api.actions import activate_model, cancel_job, pending_job, retry_job
from dicom_node.api.auth import Caller, current_caller, require
from dicom_node.db import cannot_reach, driver_message, read_only
from dicom_node.deferred import journal_counts
from dicom_node.forwarder import reschedule_failed
from dicom_node.ingest import REASON_CODES, SelectionRules
from dicom_node.models import (Association, AuditEvent, Commitment, Delivery, Evaluation, Instance, Job, ModelVersion, RefusedInstance, Series, TrainingRun, as_utc,
                               utcnow)
from dicom_node.orthanc_store import DEFAULT_TIMEOUT_SECONDS, OrthancStore
from dicom_node.outcomes import standing, where_sent
from dicom_node.retention import spool_usage
from dicom_node.settings import Settings
from dicom_node.tokens import READERS
from dicom_node.training_runs import RunState
from synthesis.contrast import UNKNOWN
from synthesis.errors import PacsUnavailable

READ = require(*READERS)


log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_SECONDS = 5

# Ids are database integers: out-of-range values get 422, never an overflow in the driver.
ResourceId = Annotated[int, FastApiPath(ge=1, le=2**63 - 1)]


class Problem(BaseModel):
    """What a refused request gets back: FastAPI's ``{"detail": reason}``."""

    detail: str = Field(description="why the request was refused, in words")


_REASONS = {
    401: "no bearer token, or an unknown or revoked one",
    403: "the token's role may not do this (auditors read, admins act, requesters only ask for syntheses)",
    404: "nothing with this id",
    409: "not in a state that allows this (the reason says which)",
    502: "Orthanc did not answer",
    503: "the node's database cannot be reached for now (restarting, failing over): ask again after Retry-After seconds",
    507: "the spool has less free space than spool_min_free_mb keeps",
}


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` for ``codes``, so that a client generated from the schema knows
    every status it can get (422 FastAPI adds; 401 and 403 the token router adds to each route)."""
    return {code: {"model": Problem, "description": _REASONS[code]} for code in codes}


class SynthesizeRequest(BaseModel):
    series_uid: str = Field(max_length=64, description="SeriesInstanceUID of an MR series already in Orthanc")


class RejudgeRequest(BaseModel):
    series_uids: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=1000, description="SeriesInstanceUIDs of series set aside, to judge again")
    reason_code: str | None = Field(None, max_length=24, description="or: every series set aside by this rule (GET /series?reason_code=)")
    since: Annotated[datetime, AfterValidator(as_utc)] | None = Field(
        None, description="with reason_code: only series last received since (ISO 8601; no offset: UTC)")
    dry_run: bool = Field(False, description="say what would happen (each series' `would`), change nothing")


# A time filter in UTC (models.as_utc): SQLite keeps no offset, so one compared as written would be off by its offset.
TimeFilter = Annotated[Annotated[datetime, AfterValidator(as_utc)] | None,
                       Query(description="ISO 8601, e.g. 2026-12-04T09:30:00+01:00; a time without an offset is taken as UTC")]

ADMIN = require("admin")
REQUEST_SYNTHESIS = require("admin", "requester")
MAX_PAGE = 500
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600)


def _row(obj: Any) -> dict[str, Any]:
    """A row as JSON; times in ISO 8601 with their UTC offset (SQLite gives them back without one)."""
    out = {}
    for column in obj.__table__.columns:
        value = getattr(obj, column.key)
        out[column.key] = as_utc(value).isoformat() if isinstance(value, datetime) else value
    return out


def _without_credentials(url: str) -> str:
    """``url`` without any ``user:password@`` (what an audit row may name)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()


def _page(session: Session, query: Select[Any], limit: int, offset: int) -> dict[str, Any]:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    items = [_row(r) for r in session.scalars(query.limit(limit).offset(offset))]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def _qa_and_delivery_metrics(sessions: sessionmaker[Session]) -> list[str]:
    """The last constancy QA (``mr2ct qa``: whether it passed, the last MAE it measured, when) and
    the deliveries of results by state: what an alert on drift or a planning system left without
    its sCT watches."""
    with sessions() as session:
        runs = session.scalars(select(AuditEvent).where(AuditEvent.action == "qa-run").order_by(AuditEvent.id.desc()).limit(50)).all()
        deliveries = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    lines = ["# HELP mr2ct_deliveries Deliveries of results to the modalities of deliver_to, by state.", "# TYPE mr2ct_deliveries gauge"]
    lines += [f'mr2ct_deliveries{{state="{state}"}} {deliveries.get(state, 0)}' for state in ("pending", "committing", "sent", "given-up")]
    if runs:
        scored = next((r for r in runs if isinstance((r.detail or {}).get("mae_hu"), (int, float))), None)
        lines += ["# HELP mr2ct_qa_passed Whether the last constancy QA run (mr2ct qa) passed.", "# TYPE mr2ct_qa_passed gauge",
                  f"mr2ct_qa_passed {int(runs[0].outcome == 'success')}",
                  "# HELP mr2ct_qa_timestamp_seconds When the last constancy QA run ended.", "# TYPE mr2ct_qa_timestamp_seconds gauge",
                  f"mr2ct_qa_timestamp_seconds {as_utc(runs[0].at).timestamp():.0f}"]
        if scored is not None:
            lines += ["# HELP mr2ct_qa_mae_hu The sCT's MAE inside the body in the last constancy QA run that scored one (HU).",
                      "# TYPE mr2ct_qa_mae_hu gauge", f"mr2ct_qa_mae_hu {float(scored.detail['mae_hu']):g}"]
    return lines


def create_app(sessions: sessionmaker[Session], *, orthanc_url: str | None = None, orthanc_auth: tuple[str, str] | None = None,
               spool_dir: str | None = None, spool_min_free_mb: int = 0, node_info: dict[str, Any] | None = None,
               routing: str | None = None, orthanc_timeout: float = DEFAULT_TIMEOUT_SECONDS, audit_export: str | None = None,
               forward_commitment_on: bool = False, rules: Callable[[], SelectionRules] = SelectionRules,
               originals_from: str = "spool", selection: Settings | None = None) -> FastAPI:
    """``rules``: the node's selection rules as they stand (the settings', or those the running
    model's card speaks of: ``registry.FollowedSelection``), whose MR contrasts a series asked for by
    name (POST /synthesize) must still meet, UNKNOWN aside (the one asking vouches for what its
    header does not tell; no one can make a T1 model read a FLAIR series); so must their contrast
    agent and fat suppression (an unenhanced model does not learn enhancement by being asked).
    ``originals_from``: the workers' (orthanc: a retry of a series whose originals spool retention
    deleted is theirs to read from Orthanc).
    ``selection``: the node's settings, whose selection rules an activated model's card is held
    against (the activation's ``warnings``)."""
    app = FastAPI(title="mr2ct admin API", version="0.1.0", description=__doc__)

    def database_unreachable(request: Request, exc: Exception) -> JSONResponse:
        """The node's database away (restarting, failing over): 503 and when to ask again, where it
        was a 500 and a traceback in the log until 2026-12-07. The driver's message (which names the
        database's host) goes to the log, not to the caller, who may not have been authenticated yet.
        Another error of these kinds (a statement SQLite refuses) stays a 500, its traceback logged."""
        if not cannot_reach(exc):
            raise exc
        log.warning("%s %s answered 503: the database cannot be reached (%s)", request.method, request.url.path, driver_message(exc))
        return JSONResponse({"detail": "the node's database cannot be reached for now; ask again shortly"}, status_code=503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})

    for unreachable in (OperationalError, InterfaceError):  # what db.cannot_reach names, less a pool's invalidated connection
        app.add_exception_handler(unreachable, database_unreachable)
    orthanc_at = _without_credentials(orthanc_url) if orthanc_url else None  # where POST /synthesize reads from, as audited
    app.state.sessions = sessions
    info = dict(node_info or {})
    store = OrthancStore(orthanc_url, *(orthanc_auth or (None, None)), timeout=orthanc_timeout) if orthanc_url else None
    from dicom_node.api.dashboard import dashboard_router

    purged_from_orthanc = originals_from == "orthanc"  # a retry's originals retention deleted: the workers read them from Orthanc
    app.include_router(dashboard_router(sessions, store, purged_from_orthanc=purged_from_orthanc, selection=selection, rules=rules))
    # Every route on this router needs a valid token (a route that forgets its role dependency
    # is still closed) and documents 401/403; each route's own dependency says which roles.
    api = APIRouter(dependencies=[Depends(current_caller)], responses=refusals(401, 403, 503))

    def _audit_query(caller: Caller, resource: str, **filters: Any) -> None:
        """IHE ATNA 'query': who asked what (the patient ID a caller filtered by is never copied into the row)."""
        audit.record(sessions, "query", "success", caller.actor, resource=resource,
                     **{k: v for k, v in filters.items() if v not in (None, False)})

    @app.get("/health")
    def health() -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
                takes_no_writes = read_only(session)  # a standby: a failover's, or the URL's
            checks["database"] = "read-only (a standby?): nothing received can be recorded until it takes writes" if takes_no_writes else "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        if spool_dir:
            checks["spool_free_mb"] = shutil.disk_usage(spool_dir).free // 2**20
            # rows the SCP kept while the database was away (written once it answers), and those it then refused: a human's
            checks["journal_waiting"], checks["journal_set_aside"] = journal_counts(Path(spool_dir))
        if store is not None:
            try:
                store.check_reachable()
                checks["orthanc"] = "ok"
            except PacsUnavailable:
                checks["orthanc"] = "unreachable"
        checks.update(info)
        checks["status"] = "ok" if checks["database"] == "ok" and checks.get("orthanc", "ok") == "ok" and not checks.get(
            "journal_set_aside") else "degraded"
        return checks

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics(caller: Caller = Depends(READ)) -> str:
        with sessions() as session:
            received = session.scalar(select(func.coalesce(func.sum(Association.instances_stored), 0)))
            refused = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == audit.INSTANCE_REFUSED))
            unrecorded = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == audit.INSTANCE_NOT_RECORDED))
            states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            waiting = session.scalar(select(func.count(func.distinct(RefusedInstance.series_instance_uid))))
            series_states = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            told = (Series.contrast, Series.contrast_agent, Series.fat_suppression)
            ignored_by_contrast = session.execute(select(*told, func.count()).where(Series.state == "ignored")
                                                  .group_by(*told).order_by(*told)).all()
            ignored_by_reason = dict(session.execute(select(Series.reason_code, func.count()).where(Series.state == "ignored")
                                                     .group_by(Series.reason_code)).all())
            finished = select(Job.seconds).where(Job.state == "done", Job.seconds.is_not(None)).subquery()
            buckets = session.execute(select(
                func.count(), func.coalesce(func.sum(finished.c.seconds), 0.0),
                *(func.count(case((finished.c.seconds <= bound, 1))) for bound in DURATION_BUCKETS),
            )).one()
        spool = spool_usage(sessions)
        lines = [
            "# HELP mr2ct_instances_received_total Instances acknowledged with Success (closed associations).",
            "# TYPE mr2ct_instances_received_total counter", f"mr2ct_instances_received_total {received}",
            "# HELP mr2ct_instances_refused_total Instances refused with a failure status.",
            "# TYPE mr2ct_instances_refused_total counter", f"mr2ct_instances_refused_total {refused}",
            "# HELP mr2ct_instances_not_recorded_total Instances acknowledged and spooled whose database row the database refused "
            "(kept in the spool, their series held: a defect to see).",
            "# TYPE mr2ct_instances_not_recorded_total counter", f"mr2ct_instances_not_recorded_total {unrecorded}",
            "# HELP mr2ct_series_awaiting_refused_instances Series set aside until instances of them that were refused arrive.",
            "# TYPE mr2ct_series_awaiting_refused_instances gauge", f"mr2ct_series_awaiting_refused_instances {waiting}",
            "# HELP mr2ct_series Series the node holds, by state (ignored: not synthesized by the selection rules, with the reason).",
            "# TYPE mr2ct_series gauge",
            *(f'mr2ct_series{{state="{state}"}} {series_states.get(state, 0)}' for state in ("receiving", "stable", "ignored")),
            # a protocol whose header stopped telling its contrast shows here as UNKNOWN rising, while no sCT comes of it
            "# HELP mr2ct_series_ignored Ignored series by the MR contrast their instances told (MIXED: several), and whether they told a contrast "
            "agent and fat suppression (none: not read, e.g. not MR).",
            "# TYPE mr2ct_series_ignored gauge",
            *(f'mr2ct_series_ignored{{contrast="{contrast or "none"}",contrast_agent="{(agent or "none").lower()}",'
              f'fat_suppression="{(fat or "none").lower()}"}} {count}' for contrast, agent, fat, count in ignored_by_contrast),
            "# HELP mr2ct_series_ignored_by_reason Ignored series by the rule that kept each out (GET /series?reason_code=; "
            "unknown: ignored before the node recorded codes).",
            "# TYPE mr2ct_series_ignored_by_reason gauge",
            *(f'mr2ct_series_ignored_by_reason{{reason="{code}"}} {ignored_by_reason.get(code, 0)}' for code in REASON_CODES),
            *([f'mr2ct_series_ignored_by_reason{{reason="unknown"}} {ignored_by_reason[""]}'] if ignored_by_reason.get("") else []),
            "# HELP mr2ct_spool_instances Originals the spool holds (recorded, not deleted by spool retention).",
            "# TYPE mr2ct_spool_instances gauge", f"mr2ct_spool_instances {spool['instances']}",
            "# HELP mr2ct_spool_bytes Size of the originals the spool holds.", "# TYPE mr2ct_spool_bytes gauge", f"mr2ct_spool_bytes {spool['bytes']}",
            "# HELP mr2ct_spool_purged_instances Originals deleted from the spool by spool retention (their rows kept).",
            "# TYPE mr2ct_spool_purged_instances gauge", f"mr2ct_spool_purged_instances {spool['purged_instances']}",
            "# HELP mr2ct_jobs Jobs by state.", "# TYPE mr2ct_jobs gauge",
        ]
        for state in ("queued", "running", "done", "failed", "cancelled"):
            lines.append(f'mr2ct_jobs{{state="{state}"}} {states.get(state, 0)}')
        lines += ["# HELP mr2ct_queue_depth Jobs waiting for a worker.", "# TYPE mr2ct_queue_depth gauge", f"mr2ct_queue_depth {states.get('queued', 0)}"]
        lines += ["# HELP mr2ct_job_duration_seconds Duration of finished jobs.", "# TYPE mr2ct_job_duration_seconds histogram"]
        count, total = buckets[0], float(buckets[1])
        for bound, within in zip(DURATION_BUCKETS, buckets[2:]):
            lines.append(f'mr2ct_job_duration_seconds_bucket{{le="{bound}"}} {within}')
        lines.append(f'mr2ct_job_duration_seconds_bucket{{le="+Inf"}} {count}')
        lines += [f"mr2ct_job_duration_seconds_sum {total:.3f}", f"mr2ct_job_duration_seconds_count {count}"]
        lines += _qa_and_delivery_metrics(sessions)
        if "device" in info:
            lines += ["# HELP mr2ct_device_info Inference device of this process.", "# TYPE mr2ct_device_info gauge",
                      f'mr2ct_device_info{{device="{info["device"]}"}} 1']
        return "\n".join(lines) + "\n"

    @api.get("/jobs")
    def list_jobs(
        caller: Caller = Depends(READ),
        state: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
        series_uid: str | None = Query(None, max_length=64), study_uid: str | None = Query(None, max_length=64),
        patient_id: str | None = Query(None, max_length=64), calling_ae: str | None = Query(None, max_length=16),
        since: TimeFilter = None, until: TimeFilter = None,
        sort: Literal["created_at", "-created_at", "id", "-id"] = "-created_at",
        limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        query = select(Job)
        if state:
            query = query.where(Job.state == state)
        if series_uid:
            query = query.where(Job.series_instance_uid == series_uid)
        if study_uid or patient_id or calling_ae:
            query = query.join(Series, Series.series_instance_uid == Job.series_instance_uid)
            if study_uid:
                query = query.where(Series.study_instance_uid == study_uid)
            if patient_id:
                query = query.where(Series.patient_id == patient_id)
            if calling_ae:
                query = query.where(Series.calling_ae == calling_ae)
        if since:
            query = query.where(Job.created_at >= since)
        if until:
            query = query.where(Job.created_at < until)
        column = Job.created_at if sort.lstrip("-") == "created_at" else Job.id
        query = query.order_by(column.desc() if sort.startswith("-") else column.asc())
        with sessions() as session:
            page = _page(session, query, limit, offset)
        _audit_query(caller, "jobs", state=state, series_uid=series_uid, study_uid=study_uid, patient_filter=bool(patient_id),
                     calling_ae=calling_ae, returned=len(page["items"]))
        return page

    @api.get("/jobs/{job_id}", responses=refusals(404))
    def job_detail(job_id: ResourceId, caller: Caller = Depends(READ)) -> dict[str, Any]:
        """The job, its audit timeline, and (done, with deliver_to) where its sCT went: the newest
        delivery to each modality, a kept sCT's by the job that delivered it."""
        with sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise HTTPException(404, f"no job {job_id}")
            timeline = session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id)).all()
            sent = where_sent(session, [job.ct_series_uid]).get(job.ct_series_uid, []) if job.state == "done" and job.ct_series_uid else []
            return {**_row(job), "timeline": [_row(e) for e in timeline],
                    "deliveries": [{**_row(d), "standing": standing(d)} for d in sent]}

    @api.post("/jobs/{job_id}/retry", status_code=201, responses=refusals(404, 409))
    def retry(job_id: ResourceId, caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """A new job for the series of a finished, failed or cancelled job, made again even if
        nothing changed (the dashboard's retry button does the same)."""
        return retry_job(sessions, job_id, caller.actor, purged_from_orthanc=purged_from_orthanc)

    @api.post("/jobs/{job_id}/cancel", responses=refusals(404, 409))
    def cancel(job_id: ResourceId, caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """A queued job is not run; a running one stops within about a second (its worker looks
        every CHECK_SECONDS) with nothing stored, unless it was already storing its sCT, which then
        goes into Orthanc whole (audited as transferred) and the job stays cancelled."""
        return cancel_job(sessions, job_id, caller.actor)

    @api.get("/series")
    def list_series(
        caller: Caller = Depends(READ), state: Literal["receiving", "stable", "ignored"] | None = None,
        study_uid: str | None = Query(None, max_length=64), patient_id: str | None = Query(None, max_length=64),
        calling_ae: str | None = Query(None, max_length=16), limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
        reason_code: str | None = Query(None, max_length=24, description="ignored series kept out by this rule: "
                                        + ", ".join(f"{code} ({meaning})" for code, meaning in REASON_CODES.items())),
    ) -> dict[str, Any]:
        if reason_code is not None and reason_code not in REASON_CODES:
            raise HTTPException(422, f"reason_code {reason_code!r} is not one of {', '.join(REASON_CODES)}")
        query = select(Series).order_by(Series.last_received_at.desc())
        for column, value in ((Series.state, state), (Series.study_instance_uid, study_uid), (Series.patient_id, patient_id), (Series.calling_ae, calling_ae),
                              (Series.reason_code, reason_code)):
            if value:
                query = query.where(column == value)
        with sessions() as session:
            page = _page(session, query, limit, offset)
            uids = [item["series_instance_uid"] for item in page["items"]]
            purged = dict(session.execute(select(Instance.series_instance_uid, func.count()).where(
                Instance.series_instance_uid.in_(uids), Instance.purged_at.is_not(None)).group_by(Instance.series_instance_uid)).all())
        for item in page["items"]:  # originals spool retention deleted (a re-send brings them back)
            item["purged_instances"] = purged.get(item["series_instance_uid"], 0)
        _audit_query(caller, "series", state=state, study_uid=study_uid, patient_filter=bool(patient_id), calling_ae=calling_ae,
                     reason_code=reason_code, returned=len(page["items"]))
        return page

    @api.get("/selection")
    def selection_now(caller: Caller = Depends(READ)) -> dict[str, Any]:
        """The rules a complete series is held to now, in the order they are tried (the first it
        fails is its reason): the settings' select_*, and with select_follow_model those the running
        model's card speaks of (``follows``: that model; ``followed``: the settings it gave)."""
        now = rules()
        return {**{f.name: sorted(value) if isinstance(value, frozenset) else list(value) if isinstance(value, tuple) else value
                   for f in fields(now) for value in (getattr(now, f.name),)}, "follows": now.follows or None}

    @api.get("/associations")
    def list_associations(
        caller: Caller = Depends(READ), calling_ae: str | None = Query(None, max_length=16), since: TimeFilter = None,
        until: TimeFilter = None, limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        query = select(Association).order_by(Association.started_at.desc())
        if calling_ae:
            query = query.where(Association.calling_ae == calling_ae)
        if since:
            query = query.where(Association.started_at >= since)
        if until:
            query = query.where(Association.started_at < until)
        with sessions() as session:
            return _page(session, query, limit, offset)

    @api.get("/commitments")
    def list_commitments(
        caller: Caller = Depends(READ), state: Literal["pending", "reported", "given-up"] | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        """Storage commitment requests, newest first: who asked, how many instances, whether the
        report went (``reported``, with how many were committed), still waits for its requester
        (``pending``: attempts and the last error) or was ``given-up``; counts by state."""
        query = select(Commitment).order_by(Commitment.id.desc())
        if state:
            query = query.where(Commitment.state == state)
        with sessions() as session:
            counts = dict(session.execute(select(Commitment.state, func.count()).group_by(Commitment.state)).all())
            rows = session.scalars(query.limit(limit).offset(offset)).all()
            items = [{**{k: v for k, v in _row(r).items() if k != "items"}, "instances": len(r.items)} for r in rows]
        _audit_query(caller, "commitments", state=state, returned=len(items))
        return {"counts": counts, "items": items, "limit": limit, "offset": offset}

    @api.get("/deliveries")
    def list_deliveries(
        caller: Caller = Depends(READ), state: Literal["pending", "committing", "sent", "given-up"] | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        """Each done job's sCT and SR sent on by Orthanc to the modalities of ``deliver_to``, newest
        first: ``sent`` (when, how many instances; with ``deliver_commitment``, ``committed_at``: when
        the modality committed them), ``committing`` (sent, the modality's storage commitment report
        awaited), ``pending`` (attempts, the last error, the next try) or ``given-up``; counts by state."""
        from dicom_node.delivery import listing

        with sessions() as session:
            found = listing(session, state, limit, offset)
        _audit_query(caller, "deliveries", state=state, returned=len(found["items"]))
        return found

    @api.post("/deliveries/retry")
    def retry_deliveries(caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """After the modality is fixed: every delivery given up, or waiting for its next try, is tried at once."""
        from dicom_node.delivery import retry_given_up

        count = retry_given_up(sessions)
        audit.record(sessions, "deliveries-retry", "success", caller.actor, deliveries=count)
        return {"rescheduled": count}

    @api.get("/routing")
    def routing_status(
        caller: Caller = Depends(READ), limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        """Where originals are routed, how many have landed and how many wait; the failing ones with
        their last error (given up first, then newest attempt first). ``given_up``: refused
        ``forward_max_refusals`` times, not asked again until POST /routing/retry. ``commitment``
        (``forward_commitment``): the routed originals the destination committed, those awaiting its
        report, those not asked for yet; the requests by state and the last error (null: off)."""
        waiting = Instance.forwarded_at.is_(None)
        failing_rows = and_(waiting, Instance.forward_error.is_not(None))
        given_up = Instance.forward_next_at.is_(None)
        failing = select(Instance.sop_instance_uid, Instance.series_instance_uid, Instance.forward_attempts, Instance.forward_refusals,
                         Instance.forward_next_at, Instance.forward_error, given_up.label("given_up")).where(failing_rows).order_by(
                             given_up.desc(), Instance.forward_next_at.desc())
        with sessions() as session:
            routed = session.scalar(select(func.count()).select_from(Instance).where(Instance.forwarded_at.is_not(None)))
            pending = session.scalar(select(func.count()).select_from(Instance).where(waiting))
            failing_count = session.scalar(select(func.count()).select_from(Instance).where(failing_rows))
            given_up_count = session.scalar(select(func.count()).select_from(Instance).where(failing_rows, given_up))
            rows = session.execute(failing.limit(limit).offset(offset)).all()
        _audit_query(caller, "routing", returned=len(rows))
        return {
            "destination": routing or "off", "routed": routed, "waiting": pending if routing else 0, "failing": failing_count,
            "given_up": given_up_count, "failures": [{**row._mapping, "given_up": bool(row.given_up)} for row in rows],
            "limit": limit, "offset": offset, "commitment": forward_commitment.status(sessions) if forward_commitment_on else None,
        }

    @api.post("/routing/retry")
    def routing_retry(caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """After the destination is fixed: try every failing original, the given-up ones included,
        at the next pass instead of at the end of its backoff."""
        count = reschedule_failed(sessions)
        audit.record(sessions, "routing-retry", "success", caller.actor, instances=count)
        return {"rescheduled": count}

    @api.post("/synthesize", status_code=202, responses=refusals(404, 409, 502, 507))
    def synthesize_from_orthanc(body: SynthesizeRequest, caller: Caller = Depends(REQUEST_SYNTHESIS)) -> dict[str, Any]:
        """Fetch a series already in Orthanc and run it through the same pipeline (spool, job, worker).
        A request refused part way (an instance that cannot be synthesized, Orthanc gone, the spool
        full) leaves the instances spooled so far set aside: the series is marked ignored with the
        reason, so that no job is made later of part of it; sending it again, or asking again, lifts that.
        A series the node holds because it refused some of its instances over DICOM is synthesized
        from what Orthanc holds of it: asking for it is the way to release it when a refused slice
        will not come again. So is a series of which a slice was deleted in Orthanc on purpose: the
        instances the node holds and Orthanc does not are set aside (no part of the sCT, counted in
        the answer and the audit) until they are sent again."""
        from pydicom.errors import InvalidDicomError

        from dicom_node.ingest import Ingest, lift_refusals, mark_stable, set_aside_all_but, validate
        from dicom_node.spool import Spool, SpoolFull, is_valid_uid
        from synthesis.errors import InvalidInstance

        if not is_valid_uid(body.series_uid):
            raise HTTPException(422, "series_uid is not a valid UID (digits and dots, at most 64 characters)")
        if store is None or not spool_dir:
            raise HTTPException(409, "this process has no Orthanc or spool configured")
        with sessions() as session:
            pending = pending_job(session, body.series_uid)
        if pending is not None:  # one job per series at a time, as for a retry
            raise HTTPException(409, f"series {body.series_uid} has job {pending.id} {pending.state} already")
        spooled = 0

        def refuse(code: int, why: str) -> HTTPException:
            if spooled:
                with sessions.begin() as session:
                    session.execute(update(Series).where(Series.series_instance_uid == body.series_uid, Series.state == "receiving")
                                    .values(state="ignored", reason=f"POST /synthesize refused after {spooled} instance{'s' * (spooled != 1)}: {why}",
                                            reason_code="synthesize_refused", outcome_due=True))
            audit.record(sessions, audit.SYNTHESIS_REQUESTED, "failure", caller.actor, series_uid=body.series_uid, reason=why, spooled=spooled,
                         source=orthanc_at)
            return HTTPException(code, why)

        try:
            instances = store.series_instance_ids(body.series_uid)
        except PacsUnavailable as exc:
            raise refuse(502, str(exc)) from exc
        if not instances:
            raise HTTPException(404, f"series {body.series_uid} is not in Orthanc")
        ingest = Ingest(Spool(spool_dir, min_free_bytes=spool_min_free_mb * 2**20), sessions)
        held: set[str] = set()
        for number, instance_id in enumerate(instances, start=1):
            try:
                raw = store.instance_file(instance_id)
            except PacsUnavailable as exc:
                raise refuse(502, str(exc)) from exc
            try:
                ds = pydicom.dcmread(io.BytesIO(raw))
                info = validate(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            except (InvalidDicomError, AttributeError) as exc:  # not DICOM, or no SOP Class/Instance UID
                raise refuse(422, f"instance {number} of {len(instances)} in Orthanc ({instance_id}) is not a readable DICOM instance: {exc}") from exc
            except InvalidInstance as exc:
                raise refuse(422, f"instance {number} of {len(instances)} in Orthanc ({instance_id}) cannot be synthesized: {exc}") from exc
            try:
                ingest.store(info, raw, str(ds.file_meta.TransferSyntaxUID), caller.actor[:16], None)
            except SpoolFull as exc:
                raise refuse(507, str(exc)) from exc
            spooled += 1
            held.add(info.sop_instance_uid)
        # Orthanc's series is what was asked for: instances the node received and Orthanc no longer
        # holds (a slice deleted there on purpose) are left out until they are sent again, and
        # instances the node refused over DICOM and Orthanc does not hold no longer hold the series back
        set_aside = set_aside_all_but(sessions, body.series_uid, held, f"not in Orthanc when {caller.actor} asked for the series "
                                      f"as Orthanc holds it (POST /synthesize, {utcnow():%Y-%m-%d %H:%M} UTC); part of it again once sent again")
        lifted = lift_refusals(sessions, body.series_uid)
        # asked for by name: the node's selection rules do not apply, only what no job can synthesize (not MR, several planes,
        # phase images) or the model cannot (a contrast the node does not select; UNKNOWN vouched for by the asking, as is
        # the body part: a protocol's BodyPartExamined is often not what it shows, a sequence's timing always is)
        now = rules()
        by_name = SelectionRules(modalities=("MR",), image_types_excluded=(), contrasts=(*now.contrasts, UNKNOWN) if now.contrasts else (),
                                 body_parts=(), contrast_agent=now.contrast_agent, fat_suppression=now.fat_suppression,
                                 follows=now.follows, followed=now.followed)
        state, job_id = mark_stable(sessions, body.series_uid, 0, by_name)
        if job_id is None:
            with sessions() as session:
                reason = session.get(Series, body.series_uid).reason  # type: ignore[union-attr]
            audit.record(sessions, audit.SYNTHESIS_REQUESTED, "failure", caller.actor, series_uid=body.series_uid, reason=f"series not synthesized: {reason}",
                         spooled=len(instances), source=orthanc_at)
            raise HTTPException(422, f"series not synthesized: {reason}")
        audit.record(sessions, audit.SYNTHESIS_REQUESTED, "success", caller.actor, series_uid=body.series_uid, job_id=job_id, instances=len(instances),
                     source=orthanc_at,
                     refusals_lifted=lifted, set_aside=set_aside)
        return {"job_id": job_id, "series_uid": body.series_uid, "instances": len(instances), "set_aside": set_aside}

    @api.post("/series/rejudge")
    def rejudge_series(body: RejudgeRequest, caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """Judge series the selection rules set aside again, by the rules as they stand now (after a
        model that learned more was activated with select_follow_model, or a restart with wider
        select_*): a job for each that passes, the reason again for each that does not. Name the
        series, or a rule (``reason_code``, at most 1,000 series, the latest first). Each series
        answers ``state`` (and ``job_id`` or ``reason``) or ``not_judged`` with why."""
        from dicom_node.worker import rejudge

        try:
            return rejudge(sessions, rules(), caller.actor, body.series_uids, body.reason_code, body.since,
                           originals_from_orthanc=purged_from_orthanc, dry_run=body.dry_run)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc

    @api.get("/models")
    def list_models(caller: Caller = Depends(READ)) -> dict[str, Any]:
        with sessions() as session:
            rows = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
            return {"items": [{k: v for k, v in _row(m).items() if k not in ("card", "losses")} for m in rows]}

    @api.get("/models/{model_id}", responses=refusals(404))
    def model_detail(model_id: ResourceId, caller: Caller = Depends(READ)) -> dict[str, Any]:
        with sessions() as session:
            model = session.get(ModelVersion, model_id)
            if model is None:
                raise HTTPException(404, f"no model {model_id}")
            # The recorded training runs that exported these weights (GET /training/runs/{id}: their losses).
            runs = session.scalars(select(TrainingRun.id).where(TrainingRun.model_sha256 == model.sha256).order_by(TrainingRun.id)).all()
            # Its scores on the hospital's own pairs (GET /evaluations/{id}: the whole report).
            evaluations = session.scalars(select(Evaluation).where(Evaluation.model_sha256 == model.sha256).order_by(Evaluation.id)).all()
            return {**_row(model), "training_runs": list(runs),
                    "evaluations": [{k: v for k, v in _row(e).items() if k != "report"} for e in evaluations]}

    @api.post("/models/{model_id}/activate", responses=refusals(404, 409))
    def activate_model_by_id(model_id: ResourceId, caller: Caller = Depends(ADMIN)) -> dict[str, Any]:
        """``warnings``: series the node's selection lets through that the model's card says it never learned."""
        chosen, warnings = activate_model(sessions, model_id, caller.actor, selection)
        return {"id": chosen.id, "sha256": chosen.sha256, "active": True, "warnings": warnings}

    @api.get("/evaluations")
    def list_evaluations(
        caller: Caller = Depends(READ),
        model_sha256: str | None = Query(None, pattern="^[0-9a-f]{64}$", description="the weights' SHA-256"),
        dataset_digest: str | None = Query(None, pattern="^[0-9a-f]{64}$", description="the same pairs"),
        limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        """`mr2ct evaluate --pairs --registry` reports, newest first, without the per-pair details
        (GET /evaluations/{id} has them)."""
        query = select(Evaluation).order_by(Evaluation.id.desc())
        if model_sha256:
            query = query.where(Evaluation.model_sha256 == model_sha256)
        if dataset_digest:
            query = query.where(Evaluation.dataset_digest == dataset_digest)
        with sessions() as session:
            page = _page(session, query, limit, offset)
        for item in page["items"]:
            item.pop("report")
        return page

    @api.get("/evaluations/{evaluation_id}", responses=refusals(404))
    def evaluation_detail(evaluation_id: ResourceId, caller: Caller = Depends(READ)) -> dict[str, Any]:
        """One evaluation with its whole report: per tissue, per pair, what was left out, the model it was compared with."""
        with sessions() as session:
            row = session.get(Evaluation, evaluation_id)
            if row is None:
                raise HTTPException(404, f"no evaluation {evaluation_id}")
            return _row(row)

    @api.get("/training/runs")
    def list_training_runs(
        caller: Caller = Depends(READ), state: RunState | None = None,
        limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62),
    ) -> dict[str, Any]:
        """`mr2ct train` runs, newest first, without their losses (GET /training/runs/{id} has them)."""
        query = select(TrainingRun).order_by(TrainingRun.id.desc())
        if state:
            query = query.where(TrainingRun.state == state)
        with sessions() as session:
            page = _page(session, query, limit, offset)
        for item in page["items"]:
            losses = item.pop("losses")
            item["last_epoch"] = losses[-1] if losses else None
            item.pop("config")
        return page

    @api.get("/training/runs/{run_id}", responses=refusals(404))
    def training_run_detail(run_id: ResourceId, caller: Caller = Depends(READ)) -> dict[str, Any]:
        """One run with its configuration and the paper's Table 2 losses of every epoch so far."""
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise HTTPException(404, f"no training run {run_id}")
            return _row(run)

    @api.get("/audit/export")
    def audit_export_status(caller: Caller = Depends(READ)) -> dict[str, Any]:
        """Where sending the audit trail to the repository (``audit_syslog``) stands: the last row
        sent, how many rows are still to send (``behind``), messages sent, rows no DICOM audit
        message stands for (``skipped``), the last error; ``destination`` null when not set."""
        from dicom_node import atna

        with sessions() as session:
            return atna.status(session, audit_export)

    @api.get("/audit/lineage")
    def patient_lineage(caller: Caller = Depends(READ), patient_id: str = Query(..., min_length=1, max_length=64)) -> dict[str, Any]:
        """Where one patient's images went for training (``dicom_node.lineage``), as a hospital asks
        when a patient withdraws consent to research use. The patient ID asked is not copied into
        the query's own audit row."""
        from dicom_node.lineage import patient_lineage as lineage_of

        with sessions() as session:
            found = lineage_of(session, patient_id)
        _audit_query(caller, "audit/lineage", patient_filter=True, pulls=len(found["pulls"]), runs=len(found["training_runs"]))
        return found

    @api.get("/audit", response_model=None)
    def read_audit(
        request: Request, caller: Caller = Depends(READ),
        action: str | None = Query(None, max_length=64), outcome: Literal["success", "failure", "warning"] | None = None,
        actor: str | None = Query(None, max_length=128), study_uid: str | None = Query(None, max_length=64),
        series_uid: str | None = Query(None, max_length=64), patient_id: str | None = Query(None, max_length=64),
        since: TimeFilter = None, until: TimeFilter = None,
        limit: int = Query(100, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62), format: Literal["json", "csv"] = "json",
    ) -> Any:
        query = select(AuditEvent).order_by(AuditEvent.id.desc())
        for column, value in ((AuditEvent.action, action), (AuditEvent.outcome, outcome), (AuditEvent.actor, actor),
                              (AuditEvent.study_instance_uid, study_uid), (AuditEvent.series_instance_uid, series_uid)):
            if value:
                query = query.where(column == value)
        if patient_id:  # through the node's series; a pull's rows (the PACS's series, not the node's) name their patient
            studies = select(Series.study_instance_uid).where(Series.patient_id == patient_id)
            pulled = and_(AuditEvent.action == audit.DATA_PULLED, AuditEvent.detail["patient_id"].as_string() == patient_id)
            query = query.where(or_(AuditEvent.study_instance_uid.in_(studies), pulled))
        if since:
            query = query.where(AuditEvent.at >= since)
        if until:
            query = query.where(AuditEvent.at < until)
        with sessions() as session:
            page = _page(session, query, limit, offset)
        filters = {k: v for k, v in request.query_params.items() if k != "patient_id"}
        audit.record(sessions, "instances-accessed/audit-read", "success", caller.actor, filters=filters,
                     patient_filter=bool(patient_id), returned=len(page["items"]))
        if format == "csv":
            buffer = io.StringIO()
            fields = ["id", "at", "action", "outcome", "actor", "study_instance_uid", "series_instance_uid", "job_id", "detail"]
            writer = csv.DictWriter(buffer, fieldnames=fields)
            writer.writeheader()
            for item in page["items"]:
                writer.writerow({k: item[k] for k in fields})
            return Response(buffer.getvalue(), media_type="text/csv", headers={"Content-Disposition": "attachment; filename=mr2ct-audit.csv"})
        return page

    app.include_router(api)
    return app
