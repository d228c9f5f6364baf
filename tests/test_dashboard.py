"""The PACS administrator opens the dashboard in a real (headless) Chromium: logs in with a token,
sees a finished job, and opens the MR/sCT preview; the ML engineer sees a training run and its loss
curves; screenshots are kept as test artefacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pydicom
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import free_port, storescu
from dicom_node.models import AuditEvent, Job, ModelVersion
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import api_token, c_store, env_without_mr2ct, headless_chromium, series_once_complete, wait_for
from training.phantom_dicom import write_mr_series

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_log_in_see_a_finished_job_its_preview_and_a_training_runs_losses(node, tmp_path):
    series = write_mr_series(tmp_path / "mr", seed=900, slices=8, size=128, pixel_spacing=2.0, slice_spacing=6.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done"
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0  # sent again unchanged: its sCT kept
    kept = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=job.id)
    assert kept.state == "done" and kept.reused_job_id == job.id
    # a series with a slice refused (no Pixel Data) is set aside, not synthesized with the gap
    held = write_mr_series(tmp_path / "held", seed=902, slices=3, size=32, pixel_spacing=8.0, slice_spacing=8.0)
    broken = pydicom.dcmread(held.files[0])
    del broken.PixelData
    assert c_store(node.port, NODE_AE, SCANNER_AE, [broken, *map(pydicom.dcmread, held.files[1:])]) == [0xA900, 0, 0]
    assert series_once_complete(node.database_url, held.series_uid).state == "ignored"
    env = env_without_mr2ct()
    env["MR2CT_DATABASE_URL"] = node.database_url
    token = subprocess.run([sys.executable, "-m", "dicom_node.cli", "tokens", "create", "--role", "admin", "--name", "browser"],
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    trained = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(tmp_path / "run"), "--epochs", "3",
                              "--steps-per-epoch", "2", "--batch-size", "2", "--subjects-per-pool", "2", "--image-size", "64", "--threads", "1"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_id = int(trained.stderr.split("training run ")[1].split(":")[0])
    # The ML engineer keeps a model's score on local MR/CT pairs; the dashboard lists it.
    pair = write_mr_series(tmp_path / "pairs" / "mr", seed=901, slices=4, size=64, pixel_spacing=4.0, slice_spacing=20.0, patient_id="DASH-1")
    write_mr_series(tmp_path / "pairs" / "ct", seed=901, slices=4, size=64, pixel_spacing=4.0, slice_spacing=20.0, patient_id="DASH-1",
                    modality="CT", study_uid=pair.study_uid)
    evaluated = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "--pairs", str(tmp_path / "pairs"), "--registry",
                                "--label", "dashboard pairs"], capture_output=True, text=True, env=env, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    evaluation_id = int(evaluated.stdout.split("recorded as evaluation ")[1].split()[0])
    mae_hu = json.loads(evaluated.stdout.strip().splitlines()[-1])["mae_hu"]
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    ARTIFACTS.mkdir(exist_ok=True)
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/dashboard")
        page.fill("#token", "not-a-token")
        with page.expect_navigation():
            page.click("#login")
        assert "not valid" in page.content()
        page.fill("#token", token)
        with page.expect_navigation():
            page.click("#login")
        row = page.locator(f"#job-{job.id}")
        assert row.locator(".done").inner_text() == "done"
        assert page.locator(f"#job-{kept.id} .done").inner_text() == f"done (kept: job {job.id}'s sCT, unchanged)"
        assert "refused (0xA900: the instance has no Pixel Data)" in page.locator("#set-aside").inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard-jobs.png"), full_page=True)
        evaluation = page.locator(f"#evaluation-{evaluation_id}").inner_text()
        assert "dashboard pairs (1 pairs" in evaluation and f"{mae_hu:.1f} HU" in evaluation
        row.locator("a.preview").click()
        page.wait_for_function("document.querySelector('#preview') && document.querySelector('#preview').naturalWidth > 0", timeout=60_000)
        assert "explorer.html#study?uuid=" in page.get_attribute("#orthanc-link", "href")
        page.screenshot(path=str(ARTIFACTS / "dashboard-preview.png"), full_page=True)
        page.goto(f"{base}/dashboard")
        run = page.locator(f"#run-{run_id}")
        assert run.locator(".finished").inner_text() == "finished" and "3/3" in run.inner_text()
        run.locator("a.losses").click()
        page.wait_for_function("document.querySelector('#losses') && document.querySelector('#losses').naturalWidth > 0", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-training.png"), full_page=True)
    assert (ARTIFACTS / "dashboard-preview.png").stat().st_size > 10_000
    assert (ARTIFACTS / "dashboard-training.png").stat().st_size > 10_000
    # Without the login cookie the plot is not served.
    assert httpx.get(f"{base}/dashboard/training/{run_id}/losses.png").status_code == 401


def _logged_in(browser: Any, base: str, token: str) -> Any:
    """A new browser page on the dashboard, logged in with ``token`` (its own cookie jar)."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{base}/dashboard")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("#login")
    return page


def test_an_administrator_retries_a_failed_job_from_the_dashboard_and_an_auditor_cannot(node, tmp_path):
    """A job failed (its originals removed from the spool by hand): the administrator presses its
    retry button in the dashboard (headless Chromium) and sees the new job; a retry the API would
    refuse is refused on a page saying why. An auditor's dashboard has no such button, and a POST
    with an auditor's cookie is refused (403) and audited."""
    series = write_mr_series(tmp_path / "mr", seed=903, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done", job.error
    spool = Path(node.env["MR2CT_SPOOL_DIR"]) / series.study_uid / series.series_uid
    for path in spool.iterdir():
        path.unlink()
    admin, auditor = api_token(node.database_url, "admin", "retry-admin"), api_token(node.database_url, "auditor", "retry-auditor")
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    retried = httpx.post(f"{base}/jobs/{job.id}/retry", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert retried.status_code == 201, retried.text
    failed = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=job.id)
    assert failed.state == "failed" and "no longer in the spool" in (failed.error or ""), failed.error
    with headless_chromium() as browser:
        page = _logged_in(browser, base, auditor)
        assert page.locator(f"#job-{failed.id} .failed").inner_text() == "failed"
        assert page.locator(f"#retry-{failed.id}").count() == 0  # an auditor reads only
        refused = page.request.post(f"{base}/dashboard/jobs/{failed.id}/retry")
        assert refused.status == 403 and "may not retry" in refused.text()
        page.context.close()
        page = _logged_in(browser, base, admin)
        assert page.locator(f"#retry-{job.id}").count() == 0  # a done job has no button (the API's retry makes it again)
        with page.expect_navigation():
            page.click(f"#retry-{failed.id}")
        with init_db(node.database_url)() as session:
            newest = session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid).order_by(Job.id.desc())).first()
        assert newest.id > failed.id and page.locator(f"#job-{newest.id}").count() == 1
        missing = page.request.post(f"{base}/dashboard/jobs/999999/retry")  # the API's refusals, said on a page
        assert missing.status == 404 and "no job 999999" in missing.text()
    with init_db(node.database_url)() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(("job-retry", "security-alert")))
                                 .order_by(AuditEvent.id)).all()
    assert any(e.action == "job-retry" and e.job_id == newest.id and e.detail.get("via") == "dashboard" and e.actor == "api:retry-admin"
               for e in events), [(e.action, e.actor, e.detail) for e in events]
    assert any(e.action == "security-alert" and e.actor == "api:retry-auditor" for e in events)


def test_an_administrator_cancels_a_queued_job_from_the_dashboard(node_factory, tmp_path):
    """Orthanc is away, so a job waits in the queue to try again: the administrator presses its
    cancel button (headless Chromium); the job is cancelled by that token, audited as from the
    dashboard, and its row offers retry instead."""
    node = node_factory(orthanc_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    series = write_mr_series(tmp_path / "mr", seed=904, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    sessions = init_db(node.database_url)

    def waiting() -> Job | None:
        with sessions() as session:
            return session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid, Job.state == "queued",
                                                     Job.error.is_not(None))).first()

    job = wait_for(waiting, 120, "no job waited for Orthanc")
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    with headless_chromium() as browser:
        page = _logged_in(browser, base, api_token(node.database_url, "admin", "cancel-admin"))
        with page.expect_navigation():
            page.click(f"#cancel-{job.id}")
        assert page.locator(f"#job-{job.id} .cancelled").inner_text() == "cancelled"
        assert page.locator(f"#retry-{job.id}").count() == 1 and page.locator(f"#cancel-{job.id}").count() == 0
        refused = page.request.post(f"{base}/dashboard/jobs/{job.id}/cancel")  # pressed twice (an old page): said why not
        assert refused.status == 409 and "only queued or running jobs can be cancelled" in refused.text()
    with sessions() as session:
        cancelled = session.get(Job, job.id)
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "job-cancelled", AuditEvent.job_id == job.id)).one()
    assert cancelled.state == "cancelled" and cancelled.error.startswith("cancelled by api:cancel-admin")
    assert event.actor == "api:cancel-admin" and event.detail.get("via") == "dashboard"


def test_an_administrator_activates_a_registered_model_from_the_dashboard_and_is_told_what_it_never_learned(node_factory, tmp_path):
    """The ML engineer promotes a model without touching files: the dashboard lists the registered
    models; an administrator presses activate on one trained on T2 pelvises and reads, on the page
    that follows, what the node's selection (T1 heads) lets through that the model never learned;
    the model is active. An auditor gets no button, and a POST with its cookie is refused (403)."""
    import torch

    from synthesis.model_file import default_model_path, load_model, save_model
    from synthesis.networks import ResnetGenerator

    node = node_factory()
    run = tmp_path / "run-pelvis"
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k != "sha256"}
    card.update(name="run-pelvis", mr_contrasts=["T2"], mr_body_parts=["PELVIS"])
    torch.manual_seed(11)
    new = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)  # the shipped card's size
    env = env_without_mr2ct() | {"MR2CT_DATABASE_URL": node.database_url}
    registered = subprocess.run([sys.executable, "-m", "dicom_node.cli", "models", "register", str(run)], capture_output=True, text=True,
                                env=env, timeout=120)
    assert registered.returncode == 0, registered.stderr
    with init_db(node.database_url)() as session:
        model = session.scalars(select(ModelVersion).where(ModelVersion.sha256 == new["sha256"])).one()
    admin, auditor = api_token(node.database_url, "admin", "ml-admin"), api_token(node.database_url, "auditor", "ml-auditor")
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    with headless_chromium() as browser:
        page = _logged_in(browser, base, auditor)
        row = page.locator(f"#model-{model.id}")
        assert "run-pelvis" in row.inner_text() and "T2, PELVIS" in row.inner_text()
        assert page.locator(f"#activate-{model.id}").count() == 0  # an auditor reads only
        refused = page.request.post(f"{base}/dashboard/models/{model.id}/activate")
        assert refused.status == 403 and "may not activate" in refused.text()
        page.context.close()
        page = _logged_in(browser, base, admin)
        with page.expect_navigation():
            page.click(f"#activate-{model.id}")
        warnings = page.locator("#warnings").inner_text()
        assert "select_acquisition_contrasts ['T1'] lets through ['T1']" in warnings, warnings
        assert "select_body_parts" in warnings and "['HEAD', 'BRAIN', 'SKULL']" in warnings, warnings
        page.screenshot(path=str(ARTIFACTS / "dashboard-model-activated.png"))
        page.goto(f"{base}/dashboard")
        assert "active" in page.locator(f"#model-{model.id}").inner_text() and page.locator(f"#activate-{model.id}").count() == 0
        missing = page.request.post(f"{base}/dashboard/models/999999/activate")
        assert missing.status == 404 and "no model 999999" in missing.text()
    with init_db(node.database_url)() as session:
        assert session.get(ModelVersion, model.id).active
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(("model-activated", "security-alert")))).all()
    assert any(e.action == "model-activated" and e.actor == "api:ml-admin" for e in events), [(e.action, e.actor) for e in events]
    assert any(e.action == "security-alert" and e.actor == "api:ml-auditor" for e in events)


def test_an_administrator_judges_a_set_aside_series_again_from_the_dashboard_once_the_model_learned_it(node_factory, tmp_path):
    """With select_follow_model, a T2 series the shipped T1 model's card kept out is judged again
    with the "judge again" button once a model that learned T2 is active: a job is made and the sCT
    follows. The dashboard says what is synthesized now and from whose card; an auditor gets no
    button, and a POST with its cookie is refused (403)."""
    import torch

    from synthesis.contrast import EXAMPLE_TIMINGS
    from synthesis.model_file import default_model_path, load_model, save_model
    from synthesis.networks import ResnetGenerator

    node = node_factory(select_follow_model="true")
    t2 = write_mr_series(tmp_path / "t2", seed=1601, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                         mr_timing=EXAMPLE_TIMINGS["T2"], series_description="t2_tse")
    assert storescu(t2.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert series_once_complete(node.database_url, t2.series_uid).reason_code == "contrast"
    run = tmp_path / "run-t1t2"
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k != "sha256"}
    card.update(name="run-t1t2", mr_contrasts=["T1", "T2"])
    torch.manual_seed(12)
    new = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    env = env_without_mr2ct() | {"MR2CT_DATABASE_URL": node.database_url}
    for args in (("models", "register", str(run)), ("models", "activate", new["sha256"][:12])):
        done = subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
    admin, auditor = api_token(node.database_url, "admin", "pacs-admin"), api_token(node.database_url, "auditor", "pacs-auditor")
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    button = f"[id='rejudge-{t2.series_uid}']"
    with headless_chromium() as browser:
        page = _logged_in(browser, base, auditor)
        assert "MR contrasts T1, T2" in page.locator("#selection").inner_text() and "'run-t1t2'" in page.locator("#selection").inner_text()
        assert page.locator(button).count() == 0  # an auditor reads only
        refused = page.request.post(f"{base}/dashboard/series/{t2.series_uid}/rejudge")
        assert refused.status == 403 and "may not judge series again" in refused.text()
        page.context.close()
        page = _logged_in(browser, base, admin)
        with page.expect_navigation():
            page.click(button)
        bad = page.request.post(f"{base}/dashboard/series/1.2.x/rejudge")
        assert bad.status == 422 and "not valid UIDs" in bad.text()
    job = wait_for_job(node.database_url, t2.series_uid, timeout=120)
    assert job.state == "done" and job.model_sha256 == new["sha256"]


def test_an_auditor_asks_the_dashboard_where_a_patients_images_went_for_training(node, orthanc, tmp_path):
    """A patient withdraws consent: the auditor types their ID into the dashboard's lineage form
    (headless Chromium) and sees the study `mr2ct pull` copied and into which folder, the training
    run that read it, and whether the active model learned from it; the ID stays out of the page's
    address, and the question is audited without it. A patient never pulled has none."""
    import requests

    env = env_without_mr2ct()
    env["MR2CT_DATABASE_URL"] = node.database_url
    series = [write_mr_series(tmp_path / modality, seed=950 + n, slices=4, size=32, pixel_spacing=8.0, slice_spacing=10.0,
                              patient_id=f"DASH-LINEAGE-{modality}", series_description=f"DASHLINEAGE {modality}", modality=modality)
              for n, modality in enumerate(("MR", "CT"))]
    uploaded = [requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30).json()["ParentSeries"]
                for s in series for path in s.files]
    try:
        pulled = subprocess.run([sys.executable, "-m", "dicom_node.cli", "pull", "--url", f"{orthanc.url}/dicom-web", "--cache",
                                 str(tmp_path / "cache"), "--description", "^DASHLINEAGE ", "--validation-fraction", "0",
                                 "--username", orthanc.username, "--password", orthanc.password],
                                capture_output=True, text=True, env=env, timeout=300)
        assert pulled.returncode == 0 and "fetched 2," in pulled.stdout, pulled.stderr[-2000:]
    finally:
        for series_id in set(uploaded):
            requests.delete(f"{orthanc.url}/series/{series_id}", auth=orthanc.auth, timeout=30)
    trained = subprocess.run([sys.executable, "-m", "dicom_node.cli", "train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "cache"),
                              "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--threads", "1"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_id = int(trained.stderr.split("training run ")[1].split(":")[0])
    auditor = api_token(node.database_url, "auditor", "lineage-auditor")
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    with headless_chromium() as browser:
        page = _logged_in(browser, base, auditor)
        with page.expect_navigation():
            page.click("#lineage-link")
        page.fill("#patient_id", "DASH-LINEAGE-MR")
        with page.expect_navigation():
            page.click("#ask")
        assert "DASH-LINEAGE" not in page.url  # asked by a form: not in the address, nor the history
        pulls = page.locator("#lineage-pulls").inner_text()
        assert series[0].study_uid in pulls and str((tmp_path / "cache").resolve()) in pulls and series[1].study_uid not in pulls
        assert page.locator(f"#lineage-run-{run_id}").count() == 1
        assert "did not learn" in page.locator("#verdict").inner_text()  # the node's active model is the shipped one
        page.screenshot(path=str(ARTIFACTS / "dashboard-lineage.png"), full_page=True)
        page.goto(f"{base}/dashboard/lineage")
        page.fill("#patient_id", "NEVER-PULLED")
        with page.expect_navigation():
            page.click("#ask")
        assert page.locator("#no-pulls").count() == 1 and page.locator("#lineage-pulls").count() == 0
    with init_db(node.database_url)() as session:
        asked = session.scalars(select(AuditEvent).where(AuditEvent.action == "query").order_by(AuditEvent.id)).all()
    asked = [e for e in asked if e.detail.get("resource") == "dashboard/lineage"]
    assert [(e.actor, e.detail["pulls"]) for e in asked] == [("api:lineage-auditor", 1), ("api:lineage-auditor", 0)]
    assert not any("DASH-LINEAGE" in json.dumps(e.detail) or "NEVER-PULLED" in json.dumps(e.detail) for e in asked)
