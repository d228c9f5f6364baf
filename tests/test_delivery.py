"""Delivery of results (deliver_to): a done job's sCT series and SR are sent on by Orthanc to a
modality declared there, a treatment planning system here (dcmtk's storescp); while it is down the
delivery waits with the reason and goes once it listens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node import atna
from dicom_node.db import init_db
from dicom_node.local_stack import NodeServer, OrthancServer, free_port, start_storescp, stop_process, storescu
from dicom_node.models import AuditEvent, Delivery, Job
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token, wait_for as _wait
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
            finally:
                stop_process(tps)
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


def test_config_check_asks_orthanc_for_each_modality_of_deliver_to(tmp_path):
    """Declared and answering: ok; declared but off: a warning (deliveries wait); not declared in
    Orthanc: a failure naming the key (nothing would ever be delivered)."""
    from tests.test_config_check import _check, _lines

    node_port, tps_port, off_port = free_port(), free_port(), free_port()
    modalities = {"mr2ct": [NODE_AE, "127.0.0.1", node_port], "tps": ["TPS", "127.0.0.1", tps_port], "off": ["OFF", "127.0.0.1", off_port]}
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
            missing = _check(env, deliver_to="nosuch")
            assert missing.returncode != 0 and _lines(missing)["deliver to"].startswith(
                "FAIL deliver_to nosuch: Orthanc declares no DICOM modality 'nosuch'"), missing.stdout
    finally:
        stop_process(tps)
