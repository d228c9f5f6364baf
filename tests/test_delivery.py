"""Delivery of results (deliver_to): a done job's sCT series and SR are sent on by Orthanc to a
modality declared there, a treatment planning system here (dcmtk's storescp); while it is down the
delivery waits with the reason and goes once it listens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import update

from dicom_node import atna
from dicom_node.db import init_db
from dicom_node.delivery import Deliverer, add_deliveries
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import NodeServer, OrthancServer, free_port, start_storescp, stop_process, storescu
from dicom_node.models import AuditEvent, Delivery, Job, Series, utcnow
from dicom_node.orthanc_store import OrthancStore
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token, commitment_peer, wait_for as _wait
from training.phantom_dicom import write_mr_series


def _deliveries(url: str) -> list[Delivery]:
    with init_db(url)() as session:
        return session.query(Delivery).order_by(Delivery.id).all()


def test_the_sct_and_its_sr_reach_the_planning_system_once_it_listens(tmp_path):
    node_port, tps_port = free_port(), free_port()
    modalities = {"mr2ct": [NODE_AE, "127.0.0.1", node_port], "tps": ["TPS", "127.0.0.1", tps_port]}
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities=modalities) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env.update(MR2CT_DELIVER_TO="tps", MR2CT_POLL_SECONDS="0.5")
        with NodeServer(tmp_path / "node", env, node_port) as node:
            url = env["MR2CT_DATABASE_URL"]
            series = write_mr_series(tmp_path / "mr", seed=461, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            # the planning system is down: the delivery waits, saying why
            _wait(lambda: any(d.attempts >= 1 for d in _deliveries(url)), 120, "no delivery was tried")
            (waiting,) = _deliveries(url)
            assert waiting.state == "pending" and waiting.modality == "tps" and "tps" in (waiting.last_error or ""), waiting.last_error
            with init_db(url)() as session:
                job = session.get(Job, waiting.job_id)
                assert job.state == "done"
                ct_uid, sr_uid = job.ct_series_uid, job.sr_series_uid
            reader = {"Authorization": f"Bearer {api_token(url, 'auditor', 'deliveries')}"}
            api = f"http://127.0.0.1:{env['MR2CT_API_PORT']}"
            listed = httpx.get(f"{api}/deliveries", headers=reader, timeout=10).json()
            assert listed["counts"] == {"pending": 1} and listed["items"][0]["ct_series_uid"] == ct_uid
            received = tmp_path / "tps"
            received.mkdir()
            tps = start_storescp(received, tps_port, "TPS")
            try:
                _wait(lambda: _deliveries(url)[0].state == "sent", 60, "the delivery did not go once the planning system listened")
                # the scanner's route fires again, the series unchanged: its sCT is kept, and not sent to the planning system again
                assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
                kept = wait_for_job(url, series.series_uid, timeout=120, done_before=waiting.job_id)
                assert kept.state == "done" and kept.reused_job_id == waiting.job_id, (kept.state, kept.error)
                time.sleep(2)  # a delivery made would be sent within a round (0.5 s)
                assert len(_deliveries(url)) == 1 and len(list(received.iterdir())) == 4
            finally:
                stop_process(tps)
            with httpx.Client(base_url=f"http://127.0.0.1:{env['MR2CT_API_PORT']}", timeout=10) as browser:  # both jobs' sCT went there
                browser.post("/dashboard/login", data={"token": api_token(url, "auditor", "dashboard")}, follow_redirects=True)
                page = browser.get("/dashboard").text
            for job_id in (waiting.job_id, kept.id):
                assert "<td class='delivered'>delivered to tps</td>" in page.split(f"<tr id='job-{job_id}'>")[1].split("</tr>")[0]
            files = [pydicom.dcmread(p) for p in received.iterdir()]
            assert sorted(ds.Modality for ds in files) == ["CT", "CT", "CT", "SR"]
            assert {str(ds.SeriesInstanceUID) for ds in files if ds.Modality == "CT"} == {ct_uid}
            assert {str(ds.SeriesInstanceUID) for ds in files if ds.Modality == "SR"} == {sr_uid}
            assert _deliveries(url)[0].instances == 4
            with init_db(url)() as session:
                (delivered,) = session.query(AuditEvent).filter(AuditEvent.action == "results-delivered", AuditEvent.job_id == job.id).all()
                # with audit_syslog, the DICOM audit message sent for it: Instances Transferred, to the modality, naming the study
                xml = atna.message(delivered, atna.Source("MR2CT", NODE_AE), atna.subjects_of(session, delivered))
            assert xml is not None and 'csd-code="110104"' in xml and 'UserID="Orthanc modality tps"' in xml
            assert f'ParticipantObjectID="{files[0].StudyInstanceUID}"' in xml
            admin = {"Authorization": f"Bearer {api_token(url, 'admin', 'deliveries-admin')}"}
            assert httpx.post(f"{api}/deliveries/retry", headers=admin, timeout=10).json() == {"rescheduled": 0}  # a sent one stays sent
            assert 'mr2ct_deliveries{state="sent"} 1' in httpx.get(f"{api}/metrics", headers=reader, timeout=10).text


def test_deliver_to_names_are_checked_naming_the_key():
    from dicom_node.settings import Settings

    assert Settings(deliver_to="tps, eclipse-1").deliver_to == ["tps", "eclipse-1"]
    for bad in ("../system", "..", "tps,tps"):
        with pytest.raises(ValueError, match="deliver_to"):
            Settings(deliver_to=bad)
    with pytest.raises(ValueError, match="deliver_commitment needs deliver_to"):
        Settings(deliver_commitment=True)
    with pytest.raises(ValueError, match="deliver_commitment_wait_seconds"):
        Settings(deliver_to="tps", deliver_commitment=True, deliver_commitment_wait_seconds=0)


@contextmanager
def _committing_tps(port: int, orthanc: OrthancServer, reports: list[str]) -> Iterator[dict[str, list]]:
    """A planning system (pynetdicom) that stores anything and answers storage commitment requests,
    one after another as ``reports`` says: ``none`` (no report ever), ``lose-first`` (the first
    instance asked for failed, 0x0110), ``all`` (every instance committed); the report goes to
    Orthanc's DICOM port on an association of its own, as most archives send them."""
    def lose(requests: list[list[str]]) -> list[str] | None:
        how = reports[min(len(requests), len(reports)) - 1]
        return None if how == "none" else requests[-1][:1] if how == "lose-first" else []

    with commitment_peer(port, "TPS", lose, report_to=(orthanc.dicom_port, orthanc.aet)) as seen:
        yield seen


def test_with_deliver_commitment_a_delivery_counts_once_the_planning_system_committed_it(tmp_path):
    """deliver_commitment: Orthanc asks the planning system for storage commitment of the sCT and
    SR it sent. No report within deliver_commitment_wait_seconds, then a report of a lost instance:
    each a failed attempt, saying why, and everything is sent and asked for again; a report of all
    four committed: the delivery is sent, with when, and audited once as delivered and committed."""
    node_port, tps_port = free_port(), free_port()
    modalities = {"mr2ct": [NODE_AE, "127.0.0.1", node_port], "tps": ["TPS", "127.0.0.1", tps_port]}
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities=modalities) as orthanc, \
            _committing_tps(tps_port, orthanc, ["none", "lose-first", "all"]) as tps:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env.update(MR2CT_DELIVER_TO="tps", MR2CT_DELIVER_COMMITMENT="true", MR2CT_DELIVER_COMMITMENT_WAIT_SECONDS="3",
                   MR2CT_POLL_SECONDS="0.5")
        with NodeServer(tmp_path / "node", env, node_port) as node:
            url = env["MR2CT_DATABASE_URL"]
            series = write_mr_series(tmp_path / "mr", seed=462, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            for path in series.files:  # the scanner sends to Orthanc too: the note on its MR series says where the sCT went
                mr_id = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=orthanc.auth, timeout=30).json()["ParentSeries"]
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            _wait(lambda: _deliveries(url) and _deliveries(url)[0].state == "committing", 180, "the sCT was not sent with commitment asked")
            assert len(tps["stored"]) == 4  # the sCT's 3 slices and its SR
            _wait(lambda: "sent no storage commitment report within 3 s" in (_deliveries(url)[0].last_error or ""), 30,
                  "a delivery whose report never came was not sent again")
            _wait(lambda: "committed 3 of the 4 instances sent, failure reason 0x0110" in (_deliveries(url)[0].last_error or ""), 30,
                  "a report of a lost instance did not fail the attempt")
            _wait(lambda: _deliveries(url)[0].state == "sent", 30, "the delivery did not count once every instance was committed")
            (delivery,) = _deliveries(url)
            assert delivery.committed_at is not None and delivery.last_error is None and delivery.attempts == 3 and delivery.instances == 4
            assert len(tps["requests"]) == 3 and len(tps["stored"]) == 12  # sent three times, four each
            with init_db(url)() as session:
                job = session.get(Job, delivery.job_id)
                events = session.query(AuditEvent).filter(AuditEvent.action == "results-delivered", AuditEvent.job_id == job.id).all()
            assert len(events) == 1 and events[0].detail.get("committed") is True, [e.detail for e in events]
            reader = {"Authorization": f"Bearer {api_token(url, 'auditor', 'deliveries')}"}
            listed = httpx.get(f"http://127.0.0.1:{env['MR2CT_API_PORT']}/deliveries", headers=reader, timeout=10).json()
            assert listed["counts"] == {"sent": 1} and listed["items"][0]["commitment_uid"] == delivery.commitment_uid
            assert listed["items"][0]["committed_at"]
            detail = httpx.get(f"http://127.0.0.1:{env['MR2CT_API_PORT']}/jobs/{delivery.job_id}", headers=reader, timeout=10).json()
            assert [(d["modality"], d["state"], d["standing"]) for d in detail["deliveries"]] == [("tps", "sent", "delivered to tps, committed")]
            with httpx.Client(base_url=f"http://127.0.0.1:{env['MR2CT_API_PORT']}", timeout=10) as browser:  # the dashboard says so
                admin = api_token(url, "admin", "dashboard")
                assert browser.post("/dashboard/login", data={"token": admin}, follow_redirects=True).status_code == 200
                page = browser.get("/dashboard").text
            row = page.split(f"<tr id='job-{delivery.job_id}'>")[1].split("</tr>")[0]
            assert "<td class='delivered'>delivered to tps, committed</td>" in row, row

            def note() -> str:
                answer = httpx.get(f"{orthanc.url}/series/{mr_id}/metadata/Mr2ctOutcome", auth=orthanc.auth, timeout=10)
                return answer.text if answer.status_code == 200 else ""

            _wait(lambda: note().endswith("; delivered to tps, committed"), 30, "the MR series' note in Orthanc did not say where the sCT went")
            assert f"sCT stored in this study: CT series {job.ct_series_uid}" in note()


def test_config_check_asks_orthanc_for_each_modality_of_deliver_to(tmp_path):
    """Declared and answering: ok; declared but off: a warning (deliveries wait); not declared in
    Orthanc: a failure naming the key (nothing would ever be delivered); with deliver_commitment, a
    modality whose N-EVENT-REPORT Orthanc refuses: a failure (nothing would ever be committed)."""
    from tests.test_config_check import _check, _lines

    node_port, tps_port, off_port = free_port(), free_port(), free_port()
    modalities: dict[str, Any] = {"mr2ct": [NODE_AE, "127.0.0.1", node_port], "tps": ["TPS", "127.0.0.1", tps_port],
                                  "off": ["OFF", "127.0.0.1", off_port],
                                  "deaf": {"AET": "TPS", "Host": "127.0.0.1", "Port": tps_port, "AllowEventReport": False}}
    received = tmp_path / "tps"
    received.mkdir()
    tps = start_storescp(received, tps_port, "TPS")
    try:
        with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities=modalities) as orthanc:
            env = {**node_env(tmp_path / "node", node_port, orthanc), "MR2CT_ALLOWED_AES": f"{SCANNER_AE},{orthanc.aet}"}
            good = _check(env, deliver_to="tps")
            assert good.returncode == 0 and _lines(good)["deliver to"] == "ok deliver_to tps (TPS@127.0.0.1:%d) answers Orthanc's C-ECHO" % tps_port, good.stdout
            off = _check(env, deliver_to="off")
            assert off.returncode == 0 and _lines(off)["deliver to"].startswith("warn deliver_to off (OFF@127.0.0.1"), off.stdout
            committing = _check(env, deliver_to="tps", deliver_commitment="true")
            assert committing.returncode == 0 and _lines(committing)["deliver to"].startswith("ok deliver_to tps"), committing.stdout
            deaf = _check(env, deliver_to="deaf", deliver_commitment="true")  # Orthanc would refuse its reports
            assert deaf.returncode != 0 and "Orthanc refuses that modality's N-EVENT-REPORT (AllowEventReport false" in _lines(deaf)["deliver to"], deaf.stdout
            assert _check(env, deliver_to="deaf").returncode == 0  # without deliver_commitment its reports are not wanted
            missing = _check(env, deliver_to="nosuch")
            assert missing.returncode != 0 and _lines(missing)["deliver to"].startswith(
                "FAIL deliver_to nosuch: Orthanc declares no DICOM modality 'nosuch'"), missing.stdout
    finally:
        stop_process(tps)


def test_a_pending_storage_commitment_report_is_read_less_often_the_longer_it_is_awaited(tmp_path):
    """A planning system that never reports: its report is read at most once a second at first,
    then after a tenth of the time awaited (at most 30 s, never past deliver_commitment_wait_seconds),
    not every round: hundreds of deliveries awaiting one would otherwise ask Orthanc hundreds of
    times a second. Once the wait is over the delivery fails, to be sent again."""
    tps_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"tps": ["TPS", "127.0.0.1", tps_port]}) as orthanc, \
            _committing_tps(tps_port, orthanc, ["none"]) as tps:
        sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
        sct, sr = (write_mr_series(tmp_path / name, seed=470 + n, slices=1, size=16, pixel_spacing=8.0) for n, name in enumerate(("ct", "sr")))
        for series in (sct, sr):  # stand-ins for the sCT and its SR in Orthanc
            httpx.post(f"{orthanc.url}/instances", content=series.files[0].read_bytes(), auth=orthanc.auth, timeout=30)
        with sessions.begin() as session:
            session.add(Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", modality="MR", calling_ae=SCANNER_AE, state="done"))
            job = Job(series_instance_uid="1.2.3.4", state="done", instance_count=1, ct_series_uid=sct.series_uid, sr_series_uid=sr.series_uid)
            session.add(job)
            session.flush()
            add_deliveries(session, job.id, ["tps"])
        deliverer = Deliverer(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password), commitment=True,
                              commitment_wait_seconds=300)
        assert deliverer.deliver_due() == 1 and len(tps["requests"]) == 1
        assert _deliveries(f"sqlite:///{tmp_path / 'mr2ct.db'}")[0].state == "committing"
        for _ in range(20):  # rounds in quick succession: the first reads it, Pending
            assert deliverer.check_commitments() == 0
        assert deliverer.reports_read == 1
        time.sleep(1.1)
        assert deliverer.check_commitments() == 0 and deliverer.reports_read == 2  # a second later: read again
        with sessions.begin() as session:  # awaited 200 s: read again after 20 s, not every second
            session.execute(update(Delivery).values(sent_at=utcnow() - timedelta(seconds=200)))
        time.sleep(1.1)
        assert deliverer.check_commitments() == 0 and deliverer.reports_read == 3
        time.sleep(1.1)
        assert deliverer.check_commitments() == 0 and deliverer.reports_read == 3
        with sessions.begin() as session:  # the wait is over: failed, to be sent again, at the next read
            session.execute(update(Delivery).values(sent_at=utcnow() - timedelta(seconds=301)))
        restarted = Deliverer(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password), commitment=True,
                              commitment_wait_seconds=300)  # a node process started since: reads it at once
        assert restarted.check_commitments() == 1 and restarted.reports_read == 1
        (delivery,) = _deliveries(f"sqlite:///{tmp_path / 'mr2ct.db'}")
        assert delivery.state == "pending" and "sent no storage commitment report within 300 s" in (delivery.last_error or "")
