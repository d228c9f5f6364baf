"""A small server-rendered dashboard: jobs and their state, recent audit events, and for a finished
job a side-by-side PNG of an MR slice and its sCT slice (brain and bone windows) with a link to the
study in Orthanc Explorer; training runs with their loss curves, drawn from the database while they
train; a patient's lineage (where their pulled images went for training, ``dicom_node.lineage``).
Login with an API token, kept in an HttpOnly cookie."""

from __future__ import annotations

import html
import io
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import pydicom
from pydicom.multival import MultiValue
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as FastApiPath
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.api.actions import activate_model, cancel_job, retry_job
from dicom_node.ingest import REJUDGED, SelectionRules
from dicom_node.outcomes import standing, where_sent
from dicom_node.models import ApiToken, AuditEvent, Evaluation, Instance, Job, ModelVersion, Series, TrainingRun
from dicom_node.orthanc_store import OrthancStore
from dicom_node.settings import Settings
from dicom_node.tokens import READERS, active_token, note_use
from synthesis.card import learned
from synthesis.errors import PacsUnavailable

COOKIE = "mr2ct_token"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222} h1{font-size:1.4rem} table{border-collapse:collapse;width:100%;margin-bottom:2rem}
td,th{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;font-size:.9rem} th{background:#f4f4f4}
.done{color:#1a7f37;font-weight:600} .failed{color:#cf222e;font-weight:600} .running,.queued{color:#9a6700} code{font-size:.8rem}
form{max-width:30rem} input{width:100%;padding:.4rem;margin:.4rem 0} button{padding:.4rem 1rem} td form{margin:0} button.retry,button.cancel{padding:.2rem .6rem}
"""


def _page(title: str, body: str, refresh_seconds: int | None = None, status_code: int = 200) -> HTMLResponse:
    refresh = f"<meta http-equiv='refresh' content='{refresh_seconds}'>" if refresh_seconds else ""
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body>{body}</body></html>", status_code=status_code)


def _caller(request: Request, sessions: sessionmaker[Session]) -> ApiToken | None:
    row = active_token(sessions, request.cookies.get(COOKIE) or "")
    if row is None or row.role not in READERS:
        return None
    note_use(sessions, row)  # a token used only here is in use too (mr2ct tokens list)
    return row


def _admin(request: Request, sessions: sessionmaker[Session], doing: str, **detail: Any) -> tuple[ApiToken | None, Response | None]:
    """The administrator pressing a button (``doing``, e.g. "retry jobs"), or the answer to anyone
    else: the login page for no token, a 403 page (audited as a security alert) for an auditor's."""
    caller = _caller(request, sessions)
    if caller is None:
        return None, RedirectResponse("/dashboard", status_code=303)
    if caller.role != "admin":
        audit.record(sessions, audit.SECURITY_ALERT, "failure", f"api:{caller.name}", reason=f"dashboard: {doing} with a {caller.role} token",
                     **detail)
        return None, _page("mr2ct: not allowed", f"<p class='failed'>A {html.escape(caller.role)} token may not {html.escape(doing)}.</p>"
                           "<p><a href='/dashboard'>back</a></p>", status_code=403)
    return caller, None


def _running_text(job: Job) -> str:
    """What a running job's row adds to "running": its percentage while it synthesizes, its other
    stages by name ("running, storing" once the sCT is made, when it reads 100 % already)."""
    if job.stage in (None, "synthesizing"):
        return "" if job.progress is None else f" {job.progress:.0%}"
    return f", {html.escape(job.stage)}"


def dashboard_router(sessions: sessionmaker[Session], store: OrthancStore | None, purged_from_orthanc: bool = False,
                     selection: Settings | None = None, rules: Callable[[], SelectionRules] | None = None) -> APIRouter:
    router = APIRouter(prefix="/dashboard", include_in_schema=False)

    def login_form(message: str = "") -> HTMLResponse:
        note = f"<p class='failed'>{html.escape(message)}</p>" if message else ""
        return _page("mr2ct login", f"<h1>mr2ct</h1>{note}<form method='post' action='/dashboard/login'>"
                     "<label for='token'>API token</label><input id='token' name='token' type='password' autocomplete='off'>"
                     "<button type='submit' id='login'>Log in</button></form>")

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        row = active_token(sessions, token)
        if row is None:
            client = request.client.host if request.client else "?"
            audit.record(sessions, audit.SECURITY_ALERT, "failure", f"dashboard@{client}", reason="login with an invalid token")
            return login_form("That token is not valid.")
        if row.role not in READERS:  # a requester (Orthanc's button) asks for syntheses and reads nothing
            audit.record(sessions, audit.SECURITY_ALERT, "failure", f"api:{row.name}", reason=f"dashboard login with a {row.role} token")
            return login_form(f"A {row.role} token may not read the dashboard: log in with an admin or auditor token.")
        audit.record(sessions, "user-authentication", "success", f"api:{row.name}", via="dashboard")
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @router.get("")
    def overview(request: Request) -> Response:
        caller = _caller(request, sessions)
        if caller is None:
            return login_form()
        with sessions() as session:
            rows = session.execute(select(Job, Series).join(Series, Series.series_instance_uid == Job.series_instance_uid)
                                   .order_by(Job.id.desc()).limit(50)).all()
            events = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(25)).all()
            set_aside = session.scalars(select(Series).where(Series.state == "ignored").order_by(Series.last_received_at.desc()).limit(20)).all()
            runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(10)).all()
            evaluations = session.scalars(select(Evaluation).order_by(Evaluation.id.desc()).limit(10)).all()
            registered = session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
            models = {m.sha256: m for m in registered}
            sent = where_sent(session, [job.ct_series_uid for job, _ in rows if job.state == "done" and job.ct_series_uid])
        job_rows = []
        for job, series in rows:
            preview = f"<a class='preview' href='/dashboard/jobs/{job.id}'>preview</a>" if job.state == "done" else ""
            action = {"failed": "retry", "cancelled": "retry", "queued": "cancel", "running": "cancel"}.get(job.state)
            if caller.role == "admin" and action:  # an auditor reads; an administrator may act
                preview += (f"<form method='post' action='/dashboard/jobs/{job.id}/{action}'>"
                            f"<button type='submit' class='{action}' id='{action}-{job.id}'>{action}</button></form>")
            state = html.escape(job.state) + (_running_text(job) if job.state == "running" else "")
            if job.reused_job_id is not None:  # the series came again unchanged: the sCT an earlier job made, kept
                state += f" (kept: job {job.reused_job_id}'s sCT, unchanged)"
            job_rows.append(
                f"<tr id='job-{job.id}'><td>{job.id}</td><td class='{html.escape(job.state)}'>{state}</td>"
                f"<td>{html.escape(series.series_description or '')}</td><td>{series.instance_count}</td>"
                f"<td>{html.escape(series.calling_ae)}</td><td>{job.created_at:%Y-%m-%d %H:%M:%S}</td>"
                f"<td>{'' if job.seconds is None else f'{job.seconds:.1f} s'}</td><td>{html.escape(job.device or '')}</td>"
                f"<td>{html.escape((job.error or '')[:120])}</td><td class='delivered'>{html.escape('; '.join(map(standing, sent.get(job.ct_series_uid or '', []))))}</td>"
                f"<td>{preview}</td></tr>"
            )
        set_aside_rows = [  # never synthesized, and why: the selection rules, or a refused instance awaited
            f"<tr><td>{html.escape(s.series_description or '')}</td><td>{s.instance_count}</td><td>{html.escape(s.calling_ae)}</td>"
            f"<td>{'' if s.last_received_at is None else f'{s.last_received_at:%Y-%m-%d %H:%M:%S}'}</td>"
            f"<td class='reason'>{html.escape(s.reason or '')}</td><td>"
            + (f"<form method='post' action='/dashboard/series/{html.escape(s.series_instance_uid)}/rejudge'><button type='submit' "
               f"class='rejudge' id='rejudge-{html.escape(s.series_instance_uid)}'>judge again</button></form>"
               if caller.role == "admin" and rules is not None and s.reason_code in REJUDGED else "")
            + "</td></tr>" for s in set_aside
        ]
        event_rows = [
            f"<tr><td>{e.at:%Y-%m-%d %H:%M:%S}</td><td>{html.escape(e.action)}</td><td>{html.escape(e.outcome)}</td>"
            f"<td>{html.escape(e.actor)}</td><td>{'' if e.job_id is None else e.job_id}</td></tr>" for e in events
        ]
        run_rows = []
        for run in runs:
            last = run.losses[-1] if run.losses else {}
            figures = " ".join(f"{name} {last[key]:.3f}" for name, key in (("G", "G_loss"), ("D", "D_loss"), ("rec", "reconstruction_loss")) if key in last)
            run_rows.append(
                f"<tr id='run-{run.id}'><td>{run.id}</td><td class='{html.escape(run.state)}'>{html.escape(run.state)}</td>"
                f"<td>{run.epochs_completed}/{run.epochs_planned}</td><td>{figures}</td><td>{run.started_at:%Y-%m-%d %H:%M:%S}</td>"
                f"<td><code>{html.escape((run.model_sha256 or '')[:12])}</code></td>"
                f"<td><a class='losses' href='/dashboard/training/{run.id}'>losses</a></td></tr>"
            )
        def model_cell(sha256: str | None) -> str:
            if not sha256:
                return ""
            known = models.get(sha256)
            name = f"{known.name}{' (active)' if known.active else ''} " if known else "not registered "
            return f"{html.escape(name)}<code>{sha256[:12]}</code>"

        evaluation_rows = []
        for e in evaluations:
            against = e.report.get("against") or {}
            versus = (f"{model_cell(e.against_sha256)}: {against.get('mae_hu')} HU, better on {against.get('better_on_pairs')}"
                      f" of {against.get('pairs')}" + (f", p {against['wilcoxon_p']}" if against.get("wilcoxon_p") is not None else "")
                      if against else "")
            evaluation_rows.append(
                f"<tr id='evaluation-{e.id}'><td>{e.id}</td><td>{e.at:%Y-%m-%d %H:%M}</td><td>{model_cell(e.model_sha256)}</td>"
                f"<td>{html.escape(e.label)} ({e.pairs} pairs, <code>{e.dataset_digest[:12]}</code>)</td><td>{e.mae_hu:.1f} HU</td>"
                f"<td>{e.mae_linear_hu:.1f} HU</td><td>{versus}</td></tr>"
            )
        model_rows = []
        for m in registered:
            button = ""
            if caller.role == "admin" and not m.active:  # an administrator promotes a model from here; an auditor reads
                button = (f"<form method='post' action='/dashboard/models/{m.id}/activate'>"
                          f"<button type='submit' class='activate' id='activate-{m.id}'>activate</button></form>")
            model_rows.append(
                f"<tr id='model-{m.id}'><td>{m.id}</td><td>{html.escape(m.name)}</td><td><code>{m.sha256[:12]}</code></td>"
                f"<td>{html.escape(m.architecture)}</td><td>{html.escape(learned(m.card or {}))}</td><td>{m.registered_at:%Y-%m-%d %H:%M}</td>"
                f"<td class='{'done' if m.active else ''}'>{'active' if m.active else ''}</td><td>{button}</td></tr>"
            )
        selecting = ""
        if rules is not None:  # what a complete series must be to be synthesized now (GET /selection)
            now = rules()
            told = (f"MR contrasts {', '.join(now.contrasts) or 'any'}; contrast agent {now.contrast_agent}; fat suppression "
                    f"{now.fat_suppression}; body parts {', '.join(now.body_parts) or 'any'}")
            selecting = (f"<p id='selection'>Synthesized now: {html.escape(told)}"
                         + (f" (from the card of {html.escape(now.follows)}, select_follow_model)" if now.followed else "") + "</p>")
        body = (f"<h1>mr2ct jobs</h1><p>Logged in as {html.escape(caller.name)} ({html.escape(caller.role)}) · "
                "<a id='lineage-link' href='/dashboard/lineage'>where a patient's images went for training</a></p>"
                "<table id='jobs'><tr><th>job</th><th>state</th><th>series</th><th>instances</th><th>from</th><th>created</th>"
                f"<th>took</th><th>device</th><th>error</th><th>delivered to</th><th></th></tr>{''.join(job_rows)}</table>"
                f"<h1>series not synthesized</h1>{selecting}<table id='set-aside'><tr><th>series</th><th>instances</th><th>from</th>"
                f"<th>last received</th><th>why</th><th></th></tr>{''.join(set_aside_rows)}</table>"
                "<h1>training runs</h1><table id='training'><tr><th>run</th><th>state</th><th>epochs</th><th>last epoch</th>"
                f"<th>started</th><th>model</th><th></th></tr>{''.join(run_rows)}</table>"
                "<h1>models</h1><table id='models'><tr><th>model</th><th>name</th><th>SHA-256</th><th>architecture</th>"
                "<th>learned</th><th>registered</th><th></th><th></th></tr>"
                f"{''.join(model_rows)}</table>"
                "<h1>models on your own pairs</h1><table id='evaluations'><tr><th>evaluation</th><th>at</th><th>model</th>"
                "<th>pairs</th><th>MAE</th><th>linear baseline</th><th>against</th></tr>"
                f"{''.join(evaluation_rows)}</table>"
                "<h1>recent audit events</h1><table id='audit'><tr><th>at</th><th>action</th><th>outcome</th><th>actor</th><th>job</th></tr>"
                f"{''.join(event_rows)}</table>")
        busy = any(job.state in ("queued", "running") for job, _ in rows)  # looked at again while jobs run, to follow them
        return _page("mr2ct dashboard", body, refresh_seconds=5 if busy else None)

    def _ct_and_source(job: Job) -> tuple[Any, Any, str | None]:
        if store is None or not job.ct_series_uid:
            raise HTTPException(404, "no sCT stored for this job")
        try:
            series_id = store.series_id(job.ct_series_uid)
            instances = store.series_instance_ids(job.ct_series_uid)
            if series_id is None or not instances:
                raise HTTPException(404, "the sCT series is not in Orthanc any more")
            ct = pydicom.dcmread(io.BytesIO(store.instance_file(instances[len(instances) // 2])))
            study = store.client.series.get_parent_study_id(series_id)
        except PacsUnavailable as exc:
            raise HTTPException(502, str(exc)) from exc
        refs = ct.SourceImageSequence  # one MR slice; every one for an sCT written as axial slices (ct_plane axial)
        ref = refs[len(refs) // 2]
        with sessions() as session:
            path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == ref.ReferencedSOPInstanceUID))
        if path is None:
            raise HTTPException(404, "the source MR instance is not in the spool")
        mr = pydicom.dcmread(path)
        frames = ref.get("ReferencedFrameNumber")  # several frames of a multi-frame MR: the middle one
        frame = int(frames[len(frames) // 2] if isinstance(frames, MultiValue) else frames) if frames is not None else None
        mr_pixels = mr.pixel_array[frame - 1] if frame else mr.pixel_array
        return mr_pixels, ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept), study

    @router.get("/jobs/{job_id}")
    def job_page(job_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], request: Request) -> Response:
        caller = _caller(request, sessions)
        if caller is None:
            return RedirectResponse("/dashboard", status_code=303)
        with sessions() as session:
            job = session.get(Job, job_id)
        if job is None or job.state != "done":
            raise HTTPException(404, f"no finished job {job_id}")
        _, _, study = _ct_and_source(job)
        link = f"{store.url}/app/explorer.html#study?uuid={study}" if store is not None and study else ""
        body = (f"<h1>job {job.id}: MR and sCT</h1><p><a href='/dashboard'>back</a> · "
                f"<a id='orthanc-link' href='{html.escape(link)}'>open the study in Orthanc Explorer</a></p>"
                f"<img id='preview' alt='MR slice and its sCT' src='/dashboard/jobs/{job.id}/preview.png'>"
                f"<p>sCT series <code>{html.escape(job.ct_series_uid or '')}</code>, model <code>{html.escape((job.model_sha256 or '')[:12])}</code>,"
                f" {html.escape(job.device or '')}</p>")
        return _page(f"mr2ct job {job.id}", body)

    @router.post("/jobs/{job_id}/{action}")
    def act(job_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], action: Literal["retry", "cancel"], request: Request) -> Response:
        """The retry button of a failed or cancelled job, the cancel button of a queued or running
        one (admin tokens only): POST /jobs/{id}/retry's and /cancel's rules; back to the dashboard,
        or a page saying why not. The cookie is SameSite=Strict, so another site's form cannot press
        them for a logged-in administrator."""
        caller, refused = _admin(request, sessions, f"{action} jobs", job_id=job_id)
        if caller is None:
            return refused  # type: ignore[return-value]
        try:
            if action == "retry":
                retry_job(sessions, job_id, f"api:{caller.name}", purged_from_orthanc=purged_from_orthanc, via="dashboard")
            else:
                cancel_job(sessions, job_id, f"api:{caller.name}", via="dashboard")
        except HTTPException as exc:
            return _page(f"mr2ct: {action} refused", f"<p class='failed' id='refused'>{html.escape(str(exc.detail))}</p>"
                         "<p><a href='/dashboard'>back</a></p>", status_code=exc.status_code)
        return RedirectResponse("/dashboard", status_code=303)

    @router.post("/models/{model_id}/activate")
    def activate(model_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], request: Request) -> Response:
        """The activate button of a registered model (admin tokens only): POST /models/{id}/activate's
        rules; back to the dashboard, or a page saying why not, or what the node's selection lets
        through that the model never learned."""
        caller, refused = _admin(request, sessions, "activate models", model_id=model_id)
        if caller is None:
            return refused  # type: ignore[return-value]
        try:
            chosen, warnings = activate_model(sessions, model_id, f"api:{caller.name}", selection)
        except HTTPException as exc:
            return _page("mr2ct: activation refused", f"<p class='failed' id='refused'>{html.escape(str(exc.detail))}</p>"
                         "<p><a href='/dashboard'>back</a></p>", status_code=exc.status_code)
        if not warnings:
            return RedirectResponse("/dashboard", status_code=303)
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        return _page("mr2ct: model activated", f"<p>Model {chosen.id} {html.escape(chosen.name)} is active from the workers' next job "
                     f"on. The node's selection (its config) lets through series it never learned:</p><ul id='warnings'>{items}</ul>"
                     "<p><a href='/dashboard'>back</a></p>")

    @router.post("/series/{series_uid}/rejudge")
    def rejudge_one(series_uid: Annotated[str, FastApiPath(max_length=64)], request: Request) -> Response:
        """The "judge again" button of a series set aside (admin tokens only): POST /series/rejudge's
        rules, by the selection as it stands now; back to the dashboard, or a page saying why it was
        not judged, or why it is still set aside."""
        from dicom_node.worker import rejudge

        caller, refused = _admin(request, sessions, "judge series again")
        if caller is None:
            return refused  # type: ignore[return-value]
        if rules is None:
            return _page("mr2ct: not judged", "<p class='failed' id='refused'>This process has no selection rules.</p>", status_code=409)
        try:
            [item] = rejudge(sessions, rules(), f"api:{caller.name}", [series_uid], originals_from_orthanc=purged_from_orthanc)["items"]
        except ValueError as exc:
            return _page("mr2ct: not judged", f"<p class='failed' id='refused'>{html.escape(str(exc))}</p>"
                         "<p><a href='/dashboard'>back</a></p>", status_code=422)
        if item.get("state") == "stable":
            return RedirectResponse("/dashboard", status_code=303)
        why = item.get("not_judged") or f"still set aside: {item.get('reason')}"
        return _page("mr2ct: judged again", f"<p class='failed' id='refused'>{html.escape(why)}</p><p><a href='/dashboard'>back</a></p>",
                     status_code=409 if "not_judged" in item else 200)

    @router.get("/jobs/{job_id}/preview.png")
    def preview(job_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], request: Request) -> Response:
        from training.figures import mr_sct_preview

        caller = _caller(request, sessions)
        if caller is None:
            raise HTTPException(401, "log in on /dashboard first")
        with sessions() as session:
            job = session.get(Job, job_id)
        if job is None or job.state != "done":
            raise HTTPException(404, f"no finished job {job_id}")
        mr, hu, _ = _ct_and_source(job)
        audit.record(sessions, "instances-accessed/preview", "success", f"api:{caller.name}", series_uid=job.ct_series_uid, job_id=job_id)
        buffer = io.BytesIO()
        mr_sct_preview(mr, hu, buffer)
        return Response(buffer.getvalue(), media_type="image/png")

    def _run(run_id: int) -> TrainingRun:
        with sessions() as session:
            run = session.get(TrainingRun, run_id)
        if run is None:
            raise HTTPException(404, f"no training run {run_id}")
        return run

    @router.get("/training/{run_id}")
    def training_page(run_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], request: Request) -> Response:
        if _caller(request, sessions) is None:
            return login_form()
        run = _run(run_id)
        plot = (f"<img id='losses' alt='losses over epochs' src='/dashboard/training/{run.id}/losses.png'>" if run.losses
                else "<p>No epoch has ended yet.</p>")
        body = (f"<h1>training run {run.id}: {html.escape(run.state)}, epoch {run.epochs_completed} of {run.epochs_planned}</h1>"
                f"<p><code>{html.escape(run.command)}</code></p><p>{html.escape(run.reason or '')}</p>{plot}"
                "<p><a href='/dashboard'>back</a> (while it trains the page reloads every 30 s; the plot is drawn from the database each time)</p>")
        return _page(f"mr2ct training run {run.id}", body, refresh_seconds=30 if run.state == "running" else None)

    def lineage_form(answer: str = "", asked: str = "") -> HTMLResponse:
        return _page("mr2ct: a patient's lineage",
                     "<h1>Where a patient's images went for training</h1><p><a href='/dashboard'>back</a></p>"
                     "<form method='post' action='/dashboard/lineage'><label for='patient_id'>Patient ID, as the PACS holds it</label>"
                     f"<input id='patient_id' name='patient_id' maxlength='64' autocomplete='off' value='{html.escape(asked, quote=True)}'>"
                     "<button type='submit' id='ask'>Ask</button></form>" + answer)

    @router.get("/lineage")
    def lineage_page(request: Request) -> Response:
        return login_form() if _caller(request, sessions) is None else lineage_form()

    @router.post("/lineage")
    async def lineage_answer(request: Request) -> Response:
        """The answer of GET /audit/lineage as a page; asked by a form (POST), so that the patient ID
        stays out of the address, the browser's history and any proxy's log. Audited as the API's
        query is, without the patient ID."""
        from dicom_node.lineage import patient_lineage

        caller = _caller(request, sessions)
        if caller is None:
            return login_form()
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        patient_id = (form.get("patient_id") or [""])[0].strip()
        if not patient_id or len(patient_id) > 64:
            return _page("mr2ct: a patient's lineage", "<p class='failed' id='refused'>A patient ID (1 to 64 characters) is needed.</p>"
                         "<p><a href='/dashboard/lineage'>back</a></p>", status_code=422)
        with sessions() as session:
            found = patient_lineage(session, patient_id)
        audit.record(sessions, "query", "success", f"api:{caller.name}", resource="dashboard/lineage", patient_filter=True,
                     pulls=len(found["pulls"]), runs=len(found["training_runs"]))
        if not found["pulls"]:
            return lineage_form("<p id='no-pulls'>No study of this patient was pulled out of a PACS by mr2ct (pull, pull-pairs) "
                                "into this database's audit trail.</p>", patient_id)
        pulls = "".join(
            f"<tr><td>{html.escape(p['at'][:19])}</td><td>{html.escape(p['command'] or '')}</td><td><code>{html.escape(p['study_uid'] or '')}"
            f"</code></td><td>{len(p['series'])}</td><td>{html.escape(p['source'] or '')}</td><td>{html.escape(p['folder'] or '')}</td>"
            f"<td class='{'done' if p['removed_at'] else ''}'>{html.escape((p['removed_at'] or '')[:19])}</td></tr>" for p in found["pulls"])
        runs = "".join(
            f"<tr id='lineage-run-{r['run_id']}'><td><a href='/dashboard/training/{r['run_id']}'>{r['run_id']}</a></td>"
            f"<td>{html.escape(r['state'])}</td><td>{html.escape(r['started_at'][:19])}</td><td>{html.escape(r['data'] or 'phantoms')}</td>"
            f"<td>{html.escape(r['out_dir'])}</td><td><code>{html.escape((r['model_sha256'] or '')[:12])}</code></td></tr>"
            for r in found["training_runs"])
        models = "".join(
            f"<tr><td>{m['id']}</td><td>{html.escape(m['name'])}</td><td><code>{html.escape(m['sha256'][:12])}</code></td>"
            f"<td class='{'failed' if m['active'] else ''}'>{'active' if m['active'] else ''}</td></tr>" for m in found["models"])
        verdict = ("<p class='failed' id='verdict'>The active model learned from this patient's images: retrain without them "
                   "(<code>mr2ct forget</code> takes them out of the pulled folders for good) and activate the new model.</p>"
                   if found["active_model_learned_from_patient"] else
                   "<p id='verdict'>The active model did not learn from this patient's images.</p>")
        none = "<tr><td colspan='7'>none</td></tr>"
        runs, models = runs or none, models or none
        return lineage_form(
            verdict + "<h1>studies pulled</h1><table id='lineage-pulls'><tr><th>at</th><th>by</th><th>study</th><th>series</th>"
            f"<th>from</th><th>into</th><th>deleted there</th></tr>{pulls}</table>"
            "<h1>training runs that learned from them</h1><table id='lineage-runs'><tr><th>run</th><th>state</th><th>started</th>"
            f"<th>data</th><th>folder</th><th>model</th></tr>{runs}</table>"
            "<h1>registered models that learned from them</h1><table id='lineage-models'><tr><th>model</th><th>name</th>"
            f"<th>SHA-256</th><th></th></tr>{models}</table>", patient_id)

    @router.get("/training/{run_id}/losses.png")
    def training_losses(run_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)], request: Request) -> Response:
        from training.figures import loss_curves

        if _caller(request, sessions) is None:
            raise HTTPException(401, "log in on /dashboard first")
        run = _run(run_id)
        if not run.losses:
            raise HTTPException(404, f"training run {run_id} has no finished epoch yet")
        buffer = io.BytesIO()
        loss_curves(run.losses, buffer, caption=f"run {run.id} ({run.state})")
        return Response(buffer.getvalue(), media_type="image/png")

    return router
