"""Storage commitment: Orthanc (a real Storage Commitment SCU, as a scanner is) asks the node
whether it holds what was sent, and gets the node's N-EVENT-REPORT on an association the node
opens: the instances in its spool committed, the others failed with the reason, and a report
owed survives the requester being down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.db import init_db
from dicom_node.local_stack import NodeServer, OrthancServer, free_port, storescu
from dicom_node.models import AuditEvent, Commitment
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token
from training.phantom_dicom import write_mr_series


def _report(orthanc: OrthancServer, transaction: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = orthanc.get(f"/storage-commitment/{transaction}")
        if report.get("Status") != "Pending":
            return report
        time.sleep(0.3)
    raise AssertionError(f"no storage commitment report for {transaction} in {timeout} s")


@contextmanager
def _requester(port: int) -> Iterator[list[Dataset]]:
    """A scanner's Storage Commitment SCU listening for its reports (pynetdicom): the reports it took."""
    from pynetdicom import evt

    reports: list[Dataset] = []

    def on_report(event):
        reports.append(event.event_information)
        return 0x0000, None

    scanner = AE(SCANNER_AE)
    scanner.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = scanner.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        yield reports
    finally:
        server.shutdown()


def _node(tmp_path, orthanc: OrthancServer, port: int, allowed: str, peers: str) -> NodeServer:
    env = node_env(tmp_path / "node", port, orthanc)
    env["MR2CT_ALLOWED_AES"], env["MR2CT_COMMITMENT_PEERS"] = allowed, peers
    return NodeServer(tmp_path / "node", env, port)


def test_orthanc_asks_for_storage_commitment_and_the_node_reports_what_it_holds(tmp_path):
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]}) as orthanc:
        with _node(tmp_path, orthanc, node_port, f"{orthanc.aet}@127.0.0.1,{SCANNER_AE}", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}") as node:
            series = write_mr_series(tmp_path / "mr", seed=441, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            held = [{"SOPClassUID": str(MRImageStorage), "SOPInstanceUID": str(pydicom.dcmread(p).SOPInstanceUID)} for p in series.files]
            never_sent = {"SOPClassUID": str(MRImageStorage), "SOPInstanceUID": generate_uid()}
            asked = httpx.post(f"{orthanc.url}/modalities/mr2ct/storage-commitment", json={"DicomInstances": [*held, never_sent]},
                               auth=orthanc.auth, timeout=30)
            assert asked.status_code == 200, asked.text
            report = _report(orthanc, asked.json()["ID"])
            assert report["Status"] == "Failure", report  # one instance the node never received
            assert sorted(i["SOPInstanceUID"] for i in report["Success"]) == sorted(i["SOPInstanceUID"] for i in held)
            assert [f["SOPInstanceUID"] for f in report["Failures"]] == [never_sent["SOPInstanceUID"]]
            assert report["Failures"][0]["FailureReason"] == 0x0112  # no such object instance
            only_held = httpx.post(f"{orthanc.url}/modalities/mr2ct/storage-commitment", json={"DicomInstances": held},
                                   auth=orthanc.auth, timeout=30)
            assert _report(orthanc, only_held.json()["ID"])["Status"] == "Success"
            admin = {"Authorization": f"Bearer {api_token(node.env['MR2CT_DATABASE_URL'], 'auditor', 'commitments')}"}
            listed = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/commitments", headers=admin, timeout=10).json()
            assert listed["counts"] == {"reported": 2} and [i["instances"] for i in listed["items"]] == [3, 4]
            assert listed["items"][1]["committed"] == 3 and listed["items"][1]["calling_ae"] == orthanc.aet
            with init_db(node.env["MR2CT_DATABASE_URL"])() as session:
                rows = session.query(Commitment).order_by(Commitment.id).all()
                assert [(r.state, r.committed, r.calling_ae) for r in rows] == [("reported", 3, orthanc.aet), ("reported", 3, orthanc.aet)]
                assert session.query(AuditEvent).filter(AuditEvent.action == "storage-commitment-reported").count() == 2


def test_a_request_from_an_ae_without_an_address_is_refused_and_a_report_waits_for_its_requester(tmp_path):
    """No address for the calling AE: the N-ACTION fails with the reason (0x0110), nothing is owed.
    The requester down when the report is due: it is sent once the requester listens again."""
    node_port, peer_port = free_port(), free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc:
        with _node(tmp_path, orthanc, node_port, f"{SCANNER_AE},STRANGER", f"{SCANNER_AE}@127.0.0.1:{peer_port}") as node:
            series = write_mr_series(tmp_path / "mr", seed=442, slices=2, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in series.files]
            request = Dataset()
            request.TransactionUID = generate_uid()
            request.ReferencedSOPSequence = []
            for uid in uids:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MRImageStorage, uid
                request.ReferencedSOPSequence.append(item)

            def ask(calling: str) -> int:
                scu = AE(calling)
                scu.add_requested_context(StorageCommitmentPushModel)
                assoc = scu.associate("127.0.0.1", node.port, ae_title=NODE_AE)
                assert assoc.is_established
                status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
                assoc.release()
                return status.Status

            assert ask("STRANGER") == 0x0110
            assert ask(SCANNER_AE) == 0x0000  # the scanner's report is owed; nothing listens at its address yet
            sessions = init_db(node.env["MR2CT_DATABASE_URL"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with sessions() as session:
                    row = session.query(Commitment).one()
                    if row.attempts >= 1:
                        break
                time.sleep(0.2)
            assert row.state == "pending" and "no association" in (row.last_error or ""), row.last_error
            with _requester(peer_port) as reports:
                deadline = time.monotonic() + 60  # the next attempt comes after a pause of 2 s, then 4 s
                while not reports and time.monotonic() < deadline:
                    time.sleep(0.2)
            assert reports, "the report owed was not sent once the requester listened"
            assert reports[0].TransactionUID == request.TransactionUID
            assert sorted(i.ReferencedSOPInstanceUID for i in reports[0].ReferencedSOPSequence) == sorted(uids)
            assert "FailedSOPSequence" not in reports[0]
            with sessions() as session:
                assert session.query(AuditEvent).filter(AuditEvent.action == "storage-commitment-requested",
                                                        AuditEvent.outcome == "failure").count() == 1


def test_a_bad_commitment_peer_stops_start_up_naming_the_key():
    import pytest

    from dicom_node.settings import Settings

    assert Settings(commitment_peers="SCANNER1@10.0.0.21:104, ORTHANC@127.0.0.1:4242").commitment_peers == [
        "SCANNER1@10.0.0.21:104", "ORTHANC@127.0.0.1:4242"]
    for bad, said in (("SCANNER1@10.0.0.21", "is not AE@host:port"), ("A@h:1,A@h:2", "listed more than once")):
        with pytest.raises(ValueError, match="commitment_peers") as raised:
            Settings(commitment_peers=bad)
        assert said in str(raised.value)


def test_two_node_processes_sharing_a_database_send_a_report_once(tmp_path):
    """Scale-out: every SCP process runs a reporter; a report due is taken by one of them."""
    import threading

    from dicom_node.commitment import Reporter, record_request

    sessions = init_db(f"sqlite:///{tmp_path / 'shared.db'}")
    peer_port = free_port()
    record_request(sessions, SCANNER_AE, generate_uid(), [[str(MRImageStorage), generate_uid()]])
    with _requester(peer_port) as reports:
        reporters = [Reporter(sessions, NODE_AE, {SCANNER_AE: ("127.0.0.1", peer_port)}) for _ in range(2)]
        threads = [threading.Thread(target=r.report_due) for r in reporters]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(reports) == 1 and "FailedSOPSequence" in reports[0]  # never received: failed, 0x0112
    assert reports[0].FailedSOPSequence[0].FailureReason == 0x0112
    with sessions() as session:
        assert session.query(Commitment).one().state == "reported"


def test_config_check_asks_each_requester_for_the_reports_association(tmp_path):
    """`mr2ct config check`: Orthanc takes the association the reports go on (the node as Storage
    Commitment SCP by role selection); an address where nothing listens is a warning naming it."""
    from tests.test_config_check import _check, _lines

    node_port, nobody = free_port(), free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]}) as orthanc:
        env = {**node_env(tmp_path / "node", node_port, orthanc), "MR2CT_ALLOWED_AES": f"{orthanc.aet}@127.0.0.1,{SCANNER_AE}"}
        good = _check(env, commitment_peers=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        assert good.returncode == 0 and _lines(good)["commitment"].startswith("ok"), good.stdout
        off = _check(env, commitment_peers=f"{SCANNER_AE}@127.0.0.1:{nobody}")
        assert off.returncode == 0 and _lines(off)["commitment"].startswith(f"warn commitment_peers {SCANNER_AE}@127.0.0.1:{nobody}"), off.stdout
