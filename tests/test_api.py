"""The PACS administrator and the auditor use the admin API of a running node: every route but
/health needs a token, roles are enforced, bad requests get a 4xx with a reason, reading the audit
is itself audited, and the answers say what happened to a patient's images."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import ssl
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.api.app import create_app
from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from dicom_node.models import ApiToken, AuditEvent, Job, Series
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import (env_without_mr2ct, api_token, c_store, cli_with_imports, series_datasets, series_once_complete, served_api, shipped_weights_with_views,
                           study_series, tokens_cli)
from training.phantom_dicom import write_mr_series

def _token_routes() -> list[tuple[str, str]]:
    """Every operation the admin API documents but /health, ids filled in: a new route is checked
    here without anyone having to list it."""
    spec = create_app(init_db("sqlite://")).openapi()
    return [(method.upper(), re.sub(r"\{[a-z_]+\}", "1", path)) for path, operations in spec["paths"].items()
            for method in operations if path != "/health"]


ROUTES = _token_routes()


def _token(node, role: str, name: str) -> str:
    return api_token(node.database_url, role, name)


@pytest.fixture(scope="module")
def api(node, tmp_path_factory):
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"  # the node logs its start once its API listens
    admin, auditor = _token(node, "admin", "pacs-admin"), _token(node, "auditor", "auditor-1")
    series = write_mr_series(tmp_path_factory.mktemp("mr"), seed=600, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, patient_id="AUDIT-PATIENT-1")
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done"
    return {"base": base, "admin": {"Authorization": f"Bearer {admin}"}, "auditor": {"Authorization": f"Bearer {auditor}"},
            "admin_token": admin, "series": series, "job": job}


def test_health_answers_without_a_token(api):
    health = httpx.get(f"{api['base']}/health").json()
    assert health["database"] == "ok" and health["orthanc"] == "ok" and health["status"] == "ok"
    assert "device" in health and health["spool_free_mb"] > 0
    assert (health["journal_waiting"], health["journal_set_aside"]) == (0, 0)


def test_health_is_degraded_while_a_journal_entry_waits_for_a_human(api, node):
    """An entry the database refused to take from the SCP's journal (dicom_node.deferred) is set
    aside: the node is degraded until someone looks."""
    aside = Path(node.env["MR2CT_SPOOL_DIR"]) / ".deferred" / "00000000000000000001-host-1-abcd.json.bad"
    aside.write_text("{}")
    try:
        health = httpx.get(f"{api['base']}/health").json()
        assert health["status"] == "degraded" and health["journal_set_aside"] == 1 and health["database"] == "ok"
    finally:
        aside.unlink()
    assert httpx.get(f"{api['base']}/health").json()["status"] == "ok"


def test_the_token_routes_are_all_there_and_document_their_refusals():
    assert len(ROUTES) >= 18 and {("GET", "/models/1"), ("POST", "/models/1/activate"), ("GET", "/audit")} <= set(ROUTES)
    spec = create_app(init_db("sqlite://")).openapi()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            assert path == "/health" or {"401", "403"} <= documented, (method, path, documented)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_other_route_refuses_missing_and_wrong_tokens(api, method, path):
    for headers in ({}, {"Authorization": "Bearer mr2ct_not-a-token"}):
        response = httpx.request(method, f"{api['base']}{path}", headers=headers)
        assert response.status_code == 401
        assert response.json()["detail"]


@pytest.mark.parametrize(("method", "path"), [("POST", "/jobs/1/retry"), ("POST", "/jobs/1/cancel")])
def test_an_auditor_may_read_but_not_act(api, method, path):
    response = httpx.request(method, f"{api['base']}{path}", headers=api["auditor"])
    assert response.status_code == 403 and "auditor" in response.json()["detail"]


def test_a_requester_token_may_ask_for_a_synthesis_and_read_nothing(api, node):
    """The token Orthanc's "Synthesize CT" button holds (role requester) may only POST /synthesize:
    one that leaks from Orthanc's configuration reads no job, audit row or patient, through the
    API or the dashboard (whose login took any valid token)."""
    secret = _token(node, 'requester', 'orthanc-button')
    requester = {"Authorization": f"Bearer {secret}"}
    for method, path in (("GET", "/jobs"), ("GET", "/audit"), ("GET", "/series"), ("POST", "/jobs/1/retry")):
        response = httpx.request(method, f"{api['base']}{path}", headers=requester)
        assert response.status_code == 403 and "requester" in response.json()["detail"], (method, path, response.text)
    asked = httpx.post(f"{api['base']}/synthesize", json={"series_uid": "1.2.3.998"}, headers=requester)
    assert asked.status_code == 404  # past the role check: no such series in Orthanc
    login = httpx.post(f"{api['base']}/dashboard/login", data={"token": secret})
    assert login.status_code == 200 and "may not read the dashboard" in login.text and "mr2ct_token" not in login.cookies
    cookie = {"mr2ct_token": secret}  # set by hand: still no page, no preview
    overview = httpx.get(f"{api['base']}/dashboard", cookies=cookie)
    assert "id='token'" in overview.text and f"job-{api['job'].id}" not in overview.text
    assert httpx.get(f"{api['base']}/dashboard/jobs/{api['job'].id}/preview.png", cookies=cookie).status_code == 401


def test_what_was_done_with_this_patients_images(api):
    jobs = httpx.get(f"{api['base']}/jobs", params={"patient_id": "AUDIT-PATIENT-1"}, headers=api["auditor"]).json()
    assert jobs["total"] == 1 and jobs["items"][0]["state"] == "done"
    detail = httpx.get(f"{api['base']}/jobs/{jobs['items'][0]['id']}", headers=api["auditor"]).json()
    assert detail["ct_series_uid"] == api["job"].ct_series_uid and detail["model_sha256"]
    assert {"job-started", "job-finished"} <= {e["action"] for e in detail["timeline"]}
    events = httpx.get(f"{api['base']}/audit", params={"patient_id": "AUDIT-PATIENT-1"}, headers=api["auditor"]).json()
    actions = {e["action"] for e in events["items"]}
    assert {"series-stable", "job-started", "job-finished", "dicom-instances-transferred"} <= actions


def test_audit_exports_csv_and_reading_it_is_audited(api, node):
    response = httpx.get(f"{api['base']}/audit", params={"format": "csv", "action": "job-finished"}, headers=api["auditor"])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows and all(r["action"] == "job-finished" for r in rows)
    sessions = init_db(node.database_url)
    with sessions() as session:
        reads = session.scalars(select(AuditEvent).where(AuditEvent.action == "instances-accessed/audit-read")).all()
    assert any(r.actor == "api:auditor-1" and r.detail["filters"].get("format") == "csv" for r in reads)


def test_retry_makes_a_new_job_that_rewrites_the_same_series_and_cancel_refuses_finished_jobs(api, node):
    job_id = api["job"].id
    retried = httpx.post(f"{api['base']}/jobs/{job_id}/retry", headers=api["admin"])
    assert retried.status_code == 201
    new_job = wait_for_job(node.database_url, api["series"].series_uid, timeout=120, done_before=job_id)
    assert new_job.id == retried.json()["job_id"] and new_job.ct_series_uid == api["job"].ct_series_uid
    refused = httpx.post(f"{api['base']}/jobs/{job_id}/cancel", headers=api["admin"])
    assert refused.status_code == 409 and "only queued or running jobs" in refused.json()["detail"]
    assert httpx.post(f"{api['base']}/jobs/999999/retry", headers=api["admin"]).status_code == 404


@pytest.mark.parametrize("offset_hours", [0, 2, -5, 5.5])
def test_time_filters_mean_the_same_moment_whatever_utc_offset_they_are_written_with(api, offset_hours):
    """An auditor in Berlin, New York or Delhi writes "since an hour ago" in local time with its
    offset, or in UTC with Z, and gets the same rows; the rows' times come back with their offset."""
    from datetime import datetime, timedelta, timezone

    zone = timezone(timedelta(hours=offset_hours))
    hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).astimezone(zone).isoformat()
    for path, key in (("/jobs", "id"), ("/associations", "id"), ("/audit", "id")):
        since = httpx.get(f"{api['base']}{path}", params={"since": hour_ago, "limit": 500}, headers=api["auditor"])
        until = httpx.get(f"{api['base']}{path}", params={"until": hour_ago}, headers=api["auditor"])
        assert since.status_code == until.status_code == 200, (since.text, until.text)
        assert since.json()["items"] and until.json()["items"] == [], path  # everything here happened in the last hour
    (job,) = [j for j in httpx.get(f"{api['base']}/jobs", params={"since": hour_ago}, headers=api["auditor"]).json()["items"]
              if j["id"] == api["job"].id]
    created = datetime.fromisoformat(job["created_at"])
    assert created.utcoffset() == timedelta(0) and abs(created - datetime.now(timezone.utc)) < timedelta(hours=1)
    naive_utc = (datetime.now(timezone.utc) - timedelta(hours=1)).replace(tzinfo=None).isoformat()  # no offset: UTC
    assert httpx.get(f"{api['base']}/jobs", params={"since": naive_utc}, headers=api["auditor"]).json()["items"]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 10_000}, {"state": "exploded"}, {"since": "yesterday"}, {"offset": -1}])
def test_bad_query_parameters_get_422_with_a_reason(api, params):
    response = httpx.get(f"{api['base']}/jobs", params=params, headers=api["auditor"])
    assert response.status_code == 422 and response.json()["detail"]


def test_metrics_count_instances_and_jobs(api):
    text = httpx.get(f"{api['base']}/metrics", headers=api["auditor"]).text
    assert "mr2ct_instances_received_total" in text and 'mr2ct_jobs{state="done"}' in text
    assert "mr2ct_job_duration_seconds_bucket" in text and "mr2ct_queue_depth" in text
    assert "\nmr2ct_instances_not_recorded_total 0\n" in text  # every row the fixture's series needed was taken
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("mr2ct_spool")}
    assert values["mr2ct_spool_instances"] >= 4 and values["mr2ct_spool_bytes"] > 4 * 48 * 48 * 2  # the series the fixture sent
    assert values["mr2ct_spool_purged_instances"] == 0  # no spool_retention_hours here


def test_tokens_are_stored_hashed_and_never_logged(api, node):
    sessions = init_db(node.database_url)
    with sessions() as session:
        stored = [t.token_sha256 for t in session.scalars(select(ApiToken))]
    assert api["admin_token"] not in stored and all(len(s) == 64 for s in stored)
    assert api["admin_token"] not in node.log_path.read_text()
    assert (node.workdir / "mr2ct.db").read_bytes().find(api["admin_token"].encode()) == -1


def test_synthesize_a_series_that_is_already_in_orthanc(api, node, orthanc, tmp_path):
    """Asked for by name, a series is synthesized even when its ImageType says LOCALIZER: the
    node's selection rules keep scouts out of routed traffic, not out of an administrator's request."""
    series = write_mr_series(tmp_path / "in-pacs", seed=610, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    for f in series.files:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
        assert httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth).status_code == 200
    response = httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["admin"], timeout=60)
    assert response.status_code == 202, response.text
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.id == response.json()["job_id"] and job.state == "done"
    assert httpx.post(f"{api['base']}/synthesize", json={"series_uid": "1.2.3.999"}, headers=api["admin"]).status_code == 404
    assert httpx.post(f"{api['base']}/synthesize", json={"series_uid": "../etc"}, headers=api["admin"]).status_code == 422
    assert httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["auditor"]).status_code == 403


def test_a_synthesis_request_refused_part_way_makes_no_job_of_the_part_it_spooled(api, node, orthanc, tmp_path):
    """A series in Orthanc whose last instance has lost its Pixel Data: the request answers 422
    naming the instance and why; the instances spooled before it are set aside (the series is
    ignored, with the reason), so the node's stability monitor makes no job of three slices of four
    later; the refusal is audited; asking again once the series is whole synthesizes it."""
    series = write_mr_series(tmp_path / "in-pacs", seed=611, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    broken = pydicom.dcmread(series.files[-1])
    del broken.PixelData
    uploads = [f.read_bytes() for f in series.files[:-1]]
    with io.BytesIO() as buffer:
        broken.save_as(buffer)
        uploads.append(buffer.getvalue())
    for data in uploads:
        assert httpx.post(f"{orthanc.url}/instances", content=data, auth=orthanc.auth).status_code == 200
    refused = httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["admin"], timeout=60)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert "of 4 in Orthanc" in detail and "cannot be synthesized" in detail and "Pixel Data" in detail
    sessions = init_db(node.database_url)
    time.sleep(3 * float(node.env["MR2CT_STABLE_SECONDS"]))  # the monitor has had its chance to make a job of what was spooled
    with sessions() as session:
        row = session.get(Series, series.series_uid)
        jobs = session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid)).all()
        (audited,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "synthesis-requested", AuditEvent.outcome == "failure",
                                                           AuditEvent.series_instance_uid == series.series_uid)).all()
    assert jobs == []
    assert audited.detail == {"reason": detail, "spooled": 3, "source": orthanc.url} and audited.actor == "api:pacs-admin"  # Orthanc lists in arrival order
    assert row.state == "ignored" and row.reason == f"POST /synthesize refused after 3 instances: {detail}"
    # the broken instance replaced in Orthanc by its whole self: asked again, the series is synthesized
    broken_id = httpx.post(f"{orthanc.url}/tools/lookup", content=str(broken.SOPInstanceUID), auth=orthanc.auth).json()[0]["ID"]
    assert httpx.delete(f"{orthanc.url}/instances/{broken_id}", auth=orthanc.auth).status_code == 200
    assert httpx.post(f"{orthanc.url}/instances", content=series.files[-1].read_bytes(), auth=orthanc.auth).status_code == 200
    asked = httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["admin"], timeout=60)
    assert asked.status_code == 202, asked.text
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.id == asked.json()["job_id"] and job.state == "done", job.error


def test_asking_for_a_series_held_for_a_refused_slice_synthesizes_what_orthanc_holds(api, node, orthanc, tmp_path):
    """A slice of a series came to the node without its Pixel Data and was refused; it will not come
    again (deleted at the scanner), so the node holds the series. The PACS administrator asks for
    the series as Orthanc holds it (three slices): it is synthesized, and the audit says the
    refusal was set aside."""
    series = write_mr_series(tmp_path / "mr", seed=612, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    broken = pydicom.dcmread(series.files[-1])
    del broken.PixelData
    assert c_store(node.port, NODE_AE, SCANNER_AE, [*map(pydicom.dcmread, series.files[:-1]), broken]) == [0, 0, 0, 0xA900]
    row = series_once_complete(node.database_url, series.series_uid)
    sessions = init_db(node.database_url)
    assert row is not None and row.state == "ignored" and "refused (0xA900" in row.reason

    def awaiting() -> float:
        text = httpx.get(f"{api['base']}/metrics", headers=api["auditor"]).text
        return float(re.search(r"^mr2ct_series_awaiting_refused_instances (\d+)$", text, re.M).group(1))

    held = awaiting()
    assert held >= 1
    for f in series.files[:-1]:  # Orthanc holds the three good slices
        assert httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth).status_code == 200
    asked = httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["admin"], timeout=60)
    assert asked.status_code == 202, asked.text
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.id == asked.json()["job_id"] and job.state == "done" and job.instance_count == 3
    with sessions() as session:
        (requested,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "synthesis-requested", AuditEvent.outcome == "success",
                                                               AuditEvent.series_instance_uid == series.series_uid)).all()
    assert requested.detail["refusals_lifted"] == 1 and awaiting() == held - 1


def test_a_synthesis_request_for_a_series_with_a_job_waiting_or_running_is_refused(orthanc, tmp_path):
    """One job per series at a time: asking again while its job waits or runs answers 409 naming
    that job, before anything is fetched; once the job has ended the request goes on (and finds
    the series missing from Orthanc). The real app on a database of its own, no worker beside it."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    uid = "1.2.826.0.1.3680043.8.498.4242"
    with sessions.begin() as session:
        session.add(Series(series_instance_uid=uid, study_instance_uid="1.2.3", modality="MR", calling_ae="SCANNER", state="stable"))
        session.flush()
        session.add(Job(series_instance_uid=uid, state="queued"))
    options = {"orthanc_url": orthanc.url, "orthanc_auth": orthanc.auth, "spool_dir": str(tmp_path / "spool")}
    with served_api(sessions, {"synth-admin": "admin"}, **options) as base:
        asked = httpx.post(f"{base}/synthesize", json={"series_uid": uid}, headers={"Authorization": "Bearer synth-admin"}, timeout=60)
        with sessions.begin() as session:
            (job,) = session.scalars(select(Job)).all()
            job.state = "running"
        running = httpx.post(f"{base}/synthesize", json={"series_uid": uid}, headers={"Authorization": "Bearer synth-admin"}, timeout=60)
        with sessions.begin() as session:
            session.scalars(select(Job)).one().state = "done"
        ended = httpx.post(f"{base}/synthesize", json={"series_uid": uid}, headers={"Authorization": "Bearer synth-admin"}, timeout=60)
    assert (asked.status_code, asked.json()["detail"]) == (409, f"series {uid} has job {job.id} queued already")
    assert (running.status_code, running.json()["detail"]) == (409, f"series {uid} has job {job.id} running already")
    assert (ended.status_code, ended.json()["detail"]) == (404, f"series {uid} is not in Orthanc")


def test_queries_are_audited_without_copying_the_patient_id(api, node):
    httpx.get(f"{api['base']}/series", params={"patient_id": "AUDIT-PATIENT-1"}, headers=api["auditor"])
    with init_db(node.database_url)() as session:
        queries = session.scalars(select(AuditEvent).where(AuditEvent.action == "query")).all()
    series_queries = [q for q in queries if q.detail.get("resource") == "series" and q.actor == "api:auditor-1"]
    assert series_queries and series_queries[-1].detail["patient_filter"] is True
    assert all("AUDIT-PATIENT-1" not in str(q.detail) for q in queries)


def test_a_training_run_is_in_the_api_with_its_losses_epoch_by_epoch(api, node, tmp_path):
    """An ML engineer trains against the node's database and follows the run in the admin API."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(out), "--epochs", "2", "--steps-per-epoch", "2",
                             "--batch-size", "2", "--subjects-per-pool", "2", "--image-size", "64", "--threads", "1"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "MR2CT_DATABASE_URL": node.database_url})
    assert result.returncode == 0, result.stderr[-2000:]
    runs = httpx.get(f"{api['base']}/training/runs", params={"state": "finished"}, headers=api["auditor"]).json()
    listed = next(r for r in runs["items"] if r["out_dir"] == str(out.resolve()))
    assert listed["epochs_completed"] == 2 and listed["last_epoch"]["epoch"] == 2 and "losses" not in listed
    detail = httpx.get(f"{api['base']}/training/runs/{listed['id']}", headers=api["auditor"]).json()
    assert [e["epoch"] for e in detail["losses"]] == [1, 2] and detail["config"]["epochs"] == 2
    assert {"ABA_reconstruction_loss", "BAB_reconstruction_loss", "DA_loss", "DB_loss", "D_loss", "G_AB_adversarial_loss",
            "G_BA_adversarial_loss", "G_loss", "reconstruction_loss"} <= set(detail["losses"][0])
    assert detail["model_sha256"] == json.loads((out / "model.json").read_text())["sha256"]
    # Registered, the model leads back to the run that trained it.
    registered = subprocess.run([sys.executable, "-m", "dicom_node.cli", "models", "register", str(out)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "MR2CT_DATABASE_URL": node.database_url})
    assert registered.returncode == 0, registered.stderr[-2000:]
    model_id = int(registered.stdout.split()[1])
    assert httpx.get(f"{api['base']}/models/{model_id}", headers=api["auditor"]).json()["training_runs"] == [listed["id"]]
    missing = httpx.get(f"{api['base']}/training/runs/999999", headers=api["auditor"])
    assert missing.status_code == 404 and "no training run" in missing.json()["detail"]
    bad = httpx.get(f"{api['base']}/training/runs", params={"state": "sleeping"}, headers=api["auditor"])
    assert bad.status_code == 422


def test_a_run_that_is_still_training_shows_each_epoch_as_it_ends(api, node, tmp_path):
    """While a run trains, the API lists it as running with its epochs so far, and its dashboard page reloads itself."""
    from dicom_node.training_runs import RunRecorder
    from training.trainer import LOSS_NAMES

    recorder = RunRecorder(init_db(node.database_url))
    run_id = recorder.start(tmp_path / "live", "mr2ct train --out live", {"epochs": 5, "seed": 1})
    cookie = {"mr2ct_token": api["admin_token"]}
    page = httpx.get(f"{api['base']}/dashboard/training/{run_id}", cookies=cookie).text
    assert "http-equiv='refresh'" in page and "No epoch has ended yet" in page
    assert httpx.get(f"{api['base']}/dashboard/training/{run_id}/losses.png", cookies=cookie).status_code == 404
    for epoch in (1, 2):
        recorder.epoch(epoch, {name: 1.0 / epoch for name in LOSS_NAMES}, seconds=3.0 * epoch)
    running = httpx.get(f"{api['base']}/training/runs", params={"state": "running"}, headers=api["auditor"]).json()
    (live,) = [r for r in running["items"] if r["id"] == run_id]
    assert live["epochs_completed"] == 2 and live["last_epoch"]["G_loss"] == 0.5 and live["epochs_planned"] == 5
    plot = httpx.get(f"{api['base']}/dashboard/training/{run_id}/losses.png", cookies=cookie)
    assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"
    recorder.end("interrupted")
    detail = httpx.get(f"{api['base']}/training/runs/{run_id}", headers=api["auditor"]).json()
    assert detail["state"] == "interrupted" and detail["ended_at"] and [e["seconds"] for e in detail["losses"]] == [3.0, 6.0]
    assert "http-equiv='refresh'" not in httpx.get(f"{api['base']}/dashboard/training/{run_id}", cookies=cookie).text


def test_the_dashboard_says_what_each_running_job_is_doing(tmp_path):
    """A job reads its originals, synthesizes (its row shows the percentage), then stores the sCT in
    the PACS: by then it is 100 % synthesized, and its row says "storing" instead of a 100 % that
    seems stuck. Rows as a worker writes them, in a real SQLite database, served by the real app."""
    from datetime import timedelta

    from dicom_node.models import utcnow

    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    rows = {"reading": (None, "reading"), "synthesizing": (0.4375, "synthesizing"), "storing": (1.0, "storing"), "claimed": (None, None)}
    with sessions.begin() as session:
        for n, name in enumerate(rows):
            session.add(Series(series_instance_uid=f"1.2.3.{n}", study_instance_uid="1.2.3", modality="MR", calling_ae="SCANNER",
                               state="stable", series_description=name))
        session.flush()
        ids = {}
        for n, (name, (progress, stage)) in enumerate(rows.items()):
            job = Job(series_instance_uid=f"1.2.3.{n}", state="running", worker="elsewhere:1", progress=progress, stage=stage,
                      lease_until=utcnow() + timedelta(hours=1))
            session.add(job)
            session.flush()
            ids[name] = job.id
    with served_api(sessions, {"watch-token": "auditor"}) as base:
        page = httpx.get(f"{base}/dashboard", cookies={"mr2ct_token": "watch-token"}).text
        detail = httpx.get(f"{base}/jobs/{ids['storing']}", headers={"Authorization": "Bearer watch-token"}).json()
    shown = {name: re.search(rf"<tr id='job-{job_id}'><td>{job_id}</td><td class='running'>([^<]*)</td>", page).group(1)
             for name, job_id in ids.items()}
    assert shown == {"reading": "running, reading", "synthesizing": "running 44%", "storing": "running, storing", "claimed": "running"}
    assert (detail["stage"], detail["progress"]) == ("storing", 1.0)
    assert "http-equiv='refresh'" in page


def _pairs(folder, seeds):
    """Small MR/CT pairs, one patient each (what a hospital exports for `evaluate --pairs`)."""
    for seed in seeds:
        mr = write_mr_series(folder / f"{seed}" / "mr", seed=seed, slices=4, size=64, pixel_spacing=4.0, slice_spacing=20.0, patient_id=f"EVAL-{seed}")
        write_mr_series(folder / f"{seed}" / "ct", seed=seed, slices=4, size=64, pixel_spacing=4.0, slice_spacing=20.0, patient_id=f"EVAL-{seed}",
                        modality="CT", study_uid=mr.study_uid)


def test_an_evaluation_on_the_hospitals_own_pairs_is_kept_with_the_model(api, node, tmp_path):
    """The ML engineer scores a model on local pairs against the active one and keeps the report;
    the registry, the API and `mr2ct models list` show it next to the model, found again by its pairs."""
    # the shipped weights run two ways (its card's 32 views would take 8x mirror's forwards)
    older, newer = shipped_weights_with_views(tmp_path / "older", "none"), shipped_weights_with_views(tmp_path / "newer", "mirror")
    _pairs(tmp_path / "pairs", (700, 701))
    env = {**os.environ, "MR2CT_DATABASE_URL": node.database_url}
    cli = [sys.executable, "-m", "dicom_node.cli"]
    scored = subprocess.run([*cli, "evaluate", str(newer), "--pairs", str(tmp_path / "pairs"), "--against", str(older), "--registry", "--label", "local pairs"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    evaluation_id = int(scored.stdout.split("recorded as evaluation ")[1].split()[0])
    again = subprocess.run([*cli, "evaluate", str(newer), "--pairs", str(tmp_path / "pairs"), "--registry", "--json"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["dataset_digest"] == report["dataset_digest"]  # the same pairs, found as such

    listed = httpx.get(f"{api['base']}/evaluations", params={"dataset_digest": report["dataset_digest"]}, headers=api["auditor"]).json()
    assert listed["total"] == 2 and [e["id"] for e in listed["items"]][1] == evaluation_id and "report" not in listed["items"][0]
    detail = httpx.get(f"{api['base']}/evaluations/{evaluation_id}", headers=api["auditor"]).json()
    assert detail["mae_hu"] == report["mae_hu"] and detail["label"] == "local pairs" and detail["pairs"] == 2
    assert detail["model_sha256"] == report["model_sha256"] == detail["against_sha256"]  # the same weights, other views
    assert detail["report"]["against"]["test_time_augmentation"] == "none" and len(detail["report"]["pairs"]) == 2
    assert "EVAL-700" not in json.dumps(detail)  # series UIDs and a digest, no patient ID

    registered = subprocess.run([*cli, "models", "register", str(older / "model.safetensors")], capture_output=True, text=True, timeout=300, env=env)
    assert registered.returncode == 0, registered.stderr[-2000:]
    model_id = int(registered.stdout.split()[1])
    model = httpx.get(f"{api['base']}/models/{model_id}", headers=api["auditor"]).json()
    assert evaluation_id in [e["id"] for e in model["evaluations"]]
    models = subprocess.run([*cli, "models", "list"], capture_output=True, text=True, timeout=300, env=env)
    line = next(line for line in models.stdout.splitlines() if line.split()[0 if line[0] != "*" else 1] == str(model_id))
    assert "own pairs: MAE" in line and "on 2 with mirror views" in line  # the views of the evaluation, as the newer card ran it

    assert httpx.get(f"{api['base']}/evaluations/999999", headers=api["auditor"]).status_code == 404
    bad = httpx.get(f"{api['base']}/evaluations", params={"model_sha256": "../etc"}, headers=api["auditor"])
    assert bad.status_code == 422 and bad.json()["detail"]
    audit = httpx.get(f"{api['base']}/audit", params={"action": "model-evaluated"}, headers=api["auditor"]).json()
    assert any(e["detail"].get("evaluation_id") == evaluation_id for e in audit["items"])


def test_evaluate_registry_stops_before_scoring_when_the_database_does_not_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--pairs", str(tmp_path), "--registry"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MR2CT_DATABASE_URL": f"sqlite:///{blocker}/sub/db.sqlite"})
    assert result.returncode == 2 and "database_url" in result.stderr and "without --registry" in result.stderr
    alone = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--registry"], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "--registry goes with --pairs" in alone.stderr


def test_asking_for_a_series_as_orthanc_holds_it_leaves_out_a_slice_deleted_there(api, node, orthanc, tmp_path):
    """The node synthesized a series of four slices; one was wrong (another patient position, a
    slice of a repeat) and the PACS administrator deleted it in Orthanc, then asked for the series
    as Orthanc holds it. The sCT is made of the three slices Orthanc holds, and Orthanc's sCT series
    holds just their three; the answer and the audit say one was set aside. Sent again, the slice
    is part of the series again. Until 2026-12-05 the node's own copy of the deleted slice went
    into the sCT whatever Orthanc held."""
    series = write_mr_series(tmp_path / "mr", seed=613, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    first = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert first.state == "done" and first.instance_count == 4, first.error
    for f in series.files[:-1]:  # Orthanc holds the series without its last slice
        assert httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth).status_code == 200
    asked = httpx.post(f"{api['base']}/synthesize", json={"series_uid": series.series_uid}, headers=api["admin"], timeout=60)
    assert asked.status_code == 202, asked.text
    assert asked.json()["set_aside"] == 1 and asked.json()["instances"] == 3
    second = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=first.id)
    assert second.id == asked.json()["job_id"] and second.state == "done" and second.instance_count == 3, second.error
    kept = {pydicom.dcmread(f).SOPInstanceUID for f in series.files[:-1]}
    (sct,) = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["SeriesInstanceUID"] == second.ct_series_uid]
    assert sorted(ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in series_datasets(orthanc, sct)) == sorted(kept)
    sessions = init_db(node.database_url)
    with sessions() as session:
        (requested,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "synthesis-requested", AuditEvent.outcome == "success",
                                                               AuditEvent.series_instance_uid == series.series_uid)).all()
        assert session.get(Series, series.series_uid).instance_count == 3
    assert requested.detail["set_aside"] == 1
    again = tmp_path / "again"
    again.mkdir()
    (again / series.files[-1].name).write_bytes(series.files[-1].read_bytes())
    assert storescu(again, node.port, NODE_AE, SCANNER_AE).returncode == 0
    third = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=second.id)
    assert third.state == "done" and third.instance_count == 4, third.error


def test_the_admin_api_answers_https_with_its_certificate(node_factory, tmp_path):
    """With api_tls_certificate and key the API answers HTTPS only: a client that trusts the CA
    gets its answers, plain HTTP gets none."""
    from tests.helpers import make_pki

    pki = make_pki(tmp_path)
    trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    node = node_factory(api_tls_certificate=str(pki / "server.pem"), api_tls_private_key=str(pki / "server.key"))
    port = node.env["MR2CT_API_PORT"]
    health = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, timeout=5)
    assert health.status_code == 200 and health.json()["database"] == "ok"
    token = api_token(node.database_url, "auditor", "over-tls")
    jobs = httpx.get(f"https://127.0.0.1:{port}/jobs", headers={"Authorization": f"Bearer {token}"}, verify=trusted)
    assert jobs.status_code == 200 and jobs.json()["total"] == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert "scheme=https" in node.log_path.read_text()


def test_the_administrator_lists_tokens_with_their_last_use_and_revokes_a_stale_one(api, node):
    """Which tokens exist, what each may do and whether anyone still uses it: `mr2ct tokens list`
    (the tokens themselves are never stored, so never shown). A revoked token is refused at once;
    revoking a name no active token has says so and exits 1 (it said "revoked 0 token(s)")."""
    used, unused = _token(node, "auditor", "reporting-job"), _token(node, "auditor", "left-over")
    browsing = _token(node, "auditor", "dashboard-only")
    assert httpx.get(f"{api['base']}/jobs", headers={"Authorization": f"Bearer {used}"}).status_code == 200
    assert "id='token'" not in httpx.get(f"{api['base']}/dashboard", cookies={"mr2ct_token": browsing}).text  # its pages, not the login
    listed = tokens_cli(node.database_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    tokens = {t["name"]: t for t in map(json.loads, listed.stdout.splitlines())}
    assert tokens["reporting-job"]["role"] == "auditor" and tokens["reporting-job"]["last_used_at"] is not None
    assert tokens["left-over"]["last_used_at"] is None and tokens["left-over"]["revoked_at"] is None
    assert tokens["dashboard-only"]["last_used_at"] is not None  # in use, though never through the API
    assert used not in listed.stdout and unused not in listed.stdout
    table = tokens_cli(node.database_url, "list").stdout.splitlines()
    assert table[0].split() == ["id", "name", "role", "created", "last", "used", "revoked"]
    (left_over,) = [line for line in table if " left-over " in line]
    assert "never" in left_over

    assert tokens_cli(node.database_url, "revoke", "--name", "left-over").stdout.strip() == "revoked 1 token(s)"
    assert httpx.get(f"{api['base']}/jobs", headers={"Authorization": f"Bearer {unused}"}).status_code == 401
    again = tokens_cli(node.database_url, "revoke", "--name", "left-over")
    assert again.returncode == 1 and "no active token is named 'left-over'" in again.stderr
    after = {t["name"]: t for t in map(json.loads, tokens_cli(node.database_url, "list", "--json").stdout.splitlines())}
    assert after["left-over"]["revoked_at"] is not None and after["reporting-job"]["revoked_at"] is None


def test_the_administrators_everyday_commands_load_neither_torch_pydicom_nor_the_web_framework(tmp_path):
    """`mr2ct tokens create|list|revoke` and `models list` touch only the database: they answer
    without importing torch, pydicom or FastAPI (on the 2-core EPYC `tokens list` took 1.8 s when the
    settings pulled in pydicom and the token store FastAPI, 0.8 s without), so that provisioning
    scripts and an administrator at the prompt do not wait on what they never use."""
    env = env_without_mr2ct()
    env["MR2CT_DATABASE_URL"] = f"sqlite:///{tmp_path / 'mr2ct.db'}"
    for args in (["tokens", "create", "--role", "auditor", "--name", "reports"], ["tokens", "list", "--json"],
                 ["tokens", "revoke", "--name", "reports"], ["models", "list"]):
        done, loaded = cli_with_imports(*args, env=env, timeout=60)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert loaded == [], (args, loaded)
        if args[1] == "create":
            token = done.stdout.splitlines()[0]
        if args[1] == "list" and args[0] == "tokens":
            (listed,) = map(json.loads, done.stdout.splitlines())
            assert listed["name"] == "reports" and listed["role"] == "auditor" and token not in done.stdout
    sessions = init_db(env["MR2CT_DATABASE_URL"])
    with sessions() as session:
        (row,) = session.scalars(select(ApiToken)).all()
    assert row.revoked_at is not None and row.token_sha256 != token


def test_making_and_revoking_a_token_are_audited_naming_who_did_it(tmp_path):
    """A token is a permission: the audit trail (and an audit record repository, as Security Alert /
    User Security Attributes Changed) shows who made it and who took it back, by the user who ran
    the command. Until 2026-12-07 a revocation left no row, and a creation named no user."""
    import getpass

    url = f"sqlite:///{tmp_path / 'mr2ct.db'}"
    assert tokens_cli(url, "create", "--role", "admin", "--name", "night-shift").returncode == 0
    assert tokens_cli(url, "revoke", "--name", "night-shift").stdout.strip() == "revoked 1 token(s)"
    assert tokens_cli(url, "revoke", "--name", "night-shift").returncode == 1  # none left: nothing changed, no row
    with init_db(url)() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action.like("security-alert/token-%")).order_by(AuditEvent.id)).all()
    user = getpass.getuser()
    assert [(r.action, r.outcome, r.actor, r.detail) for r in rows] == [
        ("security-alert/token-created", "success", f"{user} (mr2ct tokens create)", {"role": "admin", "token_name": "night-shift"}),
        ("security-alert/token-revoked", "success", f"{user} (mr2ct tokens revoke)", {"role": "admin", "token_name": "night-shift"}),
    ]


def test_a_node_says_it_started_only_once_it_listens_and_stops_naming_the_port_it_cannot_listen_on(tmp_path):
    """An administrator (or a supervisor, or the tests) takes "node started" to mean the API answers;
    and a node whose API port is taken does not run on without its API: it stops with status 2,
    naming api_port (likewise dicom_port), and the audit trail holds the failed start with why.
    Until 2026-12-07 it logged "API listening" before binding, and ran on; a taken DICOM port said
    only "Address already in use"."""
    import socket

    from dicom_node.local_stack import NodeServer, free_port

    env = env_without_mr2ct()
    env.update(MR2CT_DATABASE_URL=f"sqlite:///{tmp_path / 'mr2ct.db'}", MR2CT_SPOOL_DIR=str(tmp_path / "spool"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--role", "api"], capture_output=True, text=True,
                                 env={**env, "MR2CT_API_PORT": str(port)}, timeout=120)
        scp = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--role", "scp"], capture_output=True, text=True,
                             env={**env, "MR2CT_API_PORT": "0", "MR2CT_DICOM_PORT": str(port)}, timeout=120)
    finally:
        taken.close()
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"mr2ct: api_port: the admin API cannot listen on 127.0.0.1:{port}" in refused.stderr
    assert "API listening" not in refused.stderr and "node started" not in refused.stderr
    with init_db(env["MR2CT_DATABASE_URL"])() as session:  # the failed starts are in the audit trail, with why
        starts = session.scalars(select(AuditEvent).where(AuditEvent.action == "application-activity/start")).all()
    assert [(r.outcome, r.actor, r.detail["reason"].split(":")[0]) for r in starts] == [("failure", "mr2ct api", "api_port"),
                                                                                      ("failure", "mr2ct scp", "dicom_port")]
    assert scp.returncode == 2 and f"mr2ct: dicom_port: the SCP cannot listen on 127.0.0.1:{port} (Address already in use)" in scp.stderr, scp.stderr

    api_port = free_port()
    with NodeServer(tmp_path / "api", {**env, "MR2CT_API_PORT": str(api_port)}, free_port(), role="api"):
        assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=5).status_code == 200  # at once: no retry
