"""Storage commitment asked of the routing destination (forward_commitment): the node deletes a
routed original from its spool only once the destination said, by N-EVENT-REPORT, that it took
responsibility for it; an original it reports failed is routed again; a report from another AE,
or for a transaction the node never opened, is refused."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom.sop_class import MRImageStorage, StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.local_stack import NodeServer, OrthancServer, free_port, storescu
from dicom_node.models import AuditEvent, ForwardCommitment, Instance
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token, commitment_peer, env_without_mr2ct, wait_for as _wait
from training.phantom_dicom import write_mr_series

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def _rows(database_url: str) -> list[Instance]:
    with init_db(database_url)() as session:
        return session.query(Instance).order_by(Instance.sop_instance_uid).all()


def _node(tmp_path: Path, orthanc: OrthancServer, port: int, destination: str, allowed: str, **settings: str) -> NodeServer:
    env = node_env(tmp_path / "node", port, orthanc)
    env.update({"MR2CT_ALLOWED_AES": allowed, "MR2CT_FORWARD_ORIGINALS": "true", "MR2CT_FORWARD_TO": destination,
                "MR2CT_FORWARD_COMMITMENT": "true", "MR2CT_SELECT_MIN_SLICES": "100",  # ignored by the rules: no job to wait for
                "MR2CT_POLL_SECONDS": "0.5"})
    env.update({f"MR2CT_{key.upper()}": value for key, value in settings.items()})
    return NodeServer(tmp_path / "node", env, port)


def test_retention_waits_for_the_destinations_commitment_and_a_request_unanswered_is_asked_again(tmp_path):
    """Orthanc as the routing destination. At first it has a wrong port for the node in its
    DicomModalities (it takes the node's C-STORE, but its report goes nowhere): the routed originals
    stay in the spool however old, where without forward_commitment retention deletes them once
    routed. Once Orthanc has the node's address, the expired request is asked again, Orthanc reports
    on an association of its own (role selection), and retention deletes them."""
    node_port, nowhere = free_port(), free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", nowhere]}) as orthanc:
        destination = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        with _node(tmp_path, orthanc, node_port, destination, f"{SCANNER_AE},{orthanc.aet}@127.0.0.1",
                   spool_retention_hours="0.0003", forward_commitment_wait_seconds="4") as node:
            url = node.env["MR2CT_DATABASE_URL"]
            series = write_mr_series(tmp_path / "mr", seed=451, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            _wait(lambda: len(rows := _rows(url)) == 3 and all(r.forwarded_at for r in rows), 60, "the originals were not routed")
            assert len(orthanc.get("/instances")) == 3
            time.sleep(8)  # retention's rounds (each second here) pass over them: routed, more than 1 s old, not committed
            rows = _rows(url)
            assert all(r.purged_at is None and Path(r.path).is_file() for r in rows), "an original not committed was deleted"
            assert not any(r.forward_committed_at for r in rows)
            with init_db(url)() as session:
                asked = session.query(ForwardCommitment).order_by(ForwardCommitment.id).all()
            assert asked and all(r.state in ("requested", "expired", "refused") for r in asked), [(r.state, r.last_error) for r in asked]
            admin = {"Authorization": f"Bearer {api_token(url, 'auditor', 'routing')}"}
            routing = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/routing", headers=admin, timeout=10).json()
            assert routing["commitment"]["committed"] == 0 and routing["routed"] == 3, routing
            env = env_without_mr2ct() | node.env
            spool = subprocess.run([sys.executable, "-m", "dicom_node.cli", "spool", "status"], capture_output=True, text=True, env=env,
                                   timeout=120)
            assert f"forward_commitment: 0 routed originals committed by {destination}; kept until it commits them" in spool.stdout, spool

            added = httpx.put(f"{orthanc.url}/modalities/mr2ct", json={"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port},
                              auth=orthanc.auth, timeout=10)
            assert added.status_code == 200, added.text
            _wait(lambda: all(r.forward_committed_at for r in _rows(url)), 60, "Orthanc's commitment was not recorded")
            _wait(lambda: all(r.purged_at for r in _rows(url)), 30, "the committed originals were not deleted")
            assert not any(Path(r.path).exists() for r in _rows(url))
            with init_db(url)() as session:
                states = [r.state for r in session.query(ForwardCommitment).order_by(ForwardCommitment.id)]
                reported = session.query(AuditEvent).filter(AuditEvent.action == "forward-commitment-reported").all()
            assert states[-1] == "committed" and set(states[:-1]) <= {"expired", "refused"}, states
            assert [e.outcome for e in reported] == ["success"] and reported[0].actor == orthanc.aet
            routing = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/routing", headers=admin, timeout=10).json()
            assert routing["commitment"]["committed"] == 3 and routing["commitment"]["not_asked"] == 0, routing


def _archive(port: int, node_port: int | None, lose_first: bool = False, lose_always: bool = False,
             same_association: bool = False) -> AbstractContextManager[dict[str, list]]:
    """A DICOM archive (pynetdicom) that stores and answers storage commitment on an association
    it opens to the node (none without ``node_port``), or with ``same_association`` on the
    request's own, after its answer (as fo-dicom's synchronous reports do; ``report_statuses``
    then records None where the association was gone): with ``lose_first``, its first report says
    it lost the first instance it was asked for (as an archive whose disk failed after C-STORE
    success would); with ``lose_always``, every report says so of that instance."""
    def lose(requests: list[list[str]]) -> list[str]:
        first = requests[0][0]
        return [first] if (lose_first and len(requests) == 1) or (lose_always and first in requests[-1]) else []

    return commitment_peer(port, "ARCHIVE", lose, report_to=(node_port, NODE_AE) if node_port is not None else None,
                           on_request_association=same_association, storage=[MRImageStorage])


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MRImageStorage, uid
    if reason is not None:
        item.FailureReason = reason
    return item


def test_an_original_the_destination_lost_is_routed_again_and_strangers_reports_are_refused(tmp_path):
    node_port, archive_port = free_port(), free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc, _archive(archive_port, node_port, lose_first=True) as seen:
        with _node(tmp_path, orthanc, node_port, f"ARCHIVE@127.0.0.1:{archive_port}", f"{SCANNER_AE},ARCHIVE@127.0.0.1") as node:
            url = node.env["MR2CT_DATABASE_URL"]
            series = write_mr_series(tmp_path / "mr", seed=452, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            uids = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in series.files)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0

            # Settled: every original committed and every request reported on (the archive records the
            # node's answer to a report after the node committed its rows). The routing may take the
            # series in one pass or, when an original reached the spool after a pass began (a loaded
            # machine), in two: one request per pass, then one for the lost original.
            def settled() -> bool:
                rows = _rows(url)
                return (len(rows) == 3 and all(r.forward_committed_at for r in rows) and len(seen["requests"]) >= 2
                        and len(seen["report_statuses"]) == len(seen["requests"]))

            try:
                _wait(settled, 120, "the archive's commitment to be recorded for all")
            except AssertionError as exc:
                states = [(r.sop_instance_uid[-6:], bool(r.forwarded_at), bool(r.forward_committed_at), r.forward_error) for r in _rows(url)]
                raise AssertionError(f"{exc}: archive saw {seen}; rows {states}") from None
            lost = seen["requests"][0][0]
            assert sorted(seen["stored"]) == sorted([*uids, lost])  # the lost one routed a second time
            assert seen["report_statuses"] == [0x0000] * len(seen["requests"])
            # each original asked for once, the lost one twice (again after its failure came)
            assert sorted(uid for asked in seen["requests"] for uid in asked) == sorted([*uids, lost]), seen["requests"]
            with init_db(url)() as session:
                rows = session.query(ForwardCommitment).order_by(ForwardCommitment.id).all()
                expected = [("partial", len(seen["requests"][0]) - 1, 1)]
                expected += [("committed", len(asked), 0) for asked in seen["requests"][1:]]
                assert [(r.state, r.committed, r.failed) for r in rows] == expected
                transaction = rows[0].transaction_uid
                warned = session.query(AuditEvent).filter(AuditEvent.action == "forward-commitment-reported",
                                                          AuditEvent.outcome == "warning").one()
                assert warned.detail["failed"] == 1 and warned.detail["failure_reasons"] == ["0x0110"]

            def report_as(calling: str, transaction_uid: str) -> int:
                information = Dataset()
                information.TransactionUID = transaction_uid
                information.ReferencedSOPSequence = [_item(uids[0])]
                sender = AE(calling)
                sender.add_requested_context(StorageCommitmentPushModel)
                assoc = sender.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
                assert assoc.is_established
                status, _ = assoc.send_n_event_report(information, 1, StorageCommitmentPushModel, WELL_KNOWN)
                assoc.release()
                return int(status.Status)

            assert report_as(SCANNER_AE, transaction) == 0x0110  # not the destination: no request went to it
            assert report_as("ARCHIVE", generate_uid()) == 0x0115  # no such transaction of this node
            with init_db(url)() as session:
                refused = session.query(AuditEvent).filter(AuditEvent.action == "forward-commitment-reported",
                                                           AuditEvent.outcome == "failure").all()
            assert sorted(e.detail["status"] for e in refused) == ["0x0110", "0x0115"]


def test_an_archive_that_reports_on_the_requests_own_association_commits_what_it_keeps(tmp_path):
    """An archive that knows no address of the node and reports on the request's association once
    it has answered it (fo-dicom's synchronous way): the node holds that association open for the
    report (forward_commitment_linger_seconds), commits the originals and retention deletes them.
    With the linger at 0 the association is gone before the report: nothing is committed."""
    for linger, committed in (("0", False), ("10", True)):
        node_port, archive_port = free_port(), free_port()
        with OrthancServer(tmp_path / f"orthanc{linger}", free_port(), free_port()) as orthanc, \
                _archive(archive_port, None, same_association=True) as seen:
            with _node(tmp_path / linger, orthanc, node_port, f"ARCHIVE@127.0.0.1:{archive_port}", f"{SCANNER_AE},ARCHIVE@127.0.0.1",
                       spool_retention_hours="0.0003", forward_commitment_linger_seconds=linger) as node:
                url = node.env["MR2CT_DATABASE_URL"]
                series = write_mr_series(tmp_path / f"mr{linger}", seed=454, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
                assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
                _wait(lambda: len(seen["report_statuses"]) >= 1, 60, "the archive was not asked for storage commitment")
                if committed:
                    assert seen["report_statuses"][0] == 0x0000
                    _wait(lambda: len(rows := _rows(url)) == 3 and all(r.forward_committed_at and r.purged_at for r in rows), 60,
                          "the originals reported on the request's association were not committed and deleted")
                    with init_db(url)() as session:
                        # one request, or two when the routing took the series in two passes: all committed
                        states = [r.state for r in session.query(ForwardCommitment)]
                        assert states and set(states) == {"committed"}, states
                    assert "storage commitment reported on the request's association" in node.log_path.read_text()
                else:
                    assert seen["report_statuses"][0] is None  # released at once: the report had nowhere to go
                    time.sleep(3)  # retention's rounds pass over them
                    assert not any(r.forward_committed_at or r.purged_at for r in _rows(url))


def test_an_original_the_destination_never_commits_is_given_up_after_forward_max_refusals(tmp_path):
    """A commitment failure counts as a refusal: after ``forward_max_refusals`` of them the
    original is given up (listed by GET /routing, audited) instead of routed every five minutes
    for ever, and kept in the spool."""
    node_port, archive_port = free_port(), free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc, _archive(archive_port, node_port, lose_always=True) as seen:
        with _node(tmp_path, orthanc, node_port, f"ARCHIVE@127.0.0.1:{archive_port}", f"{SCANNER_AE},ARCHIVE@127.0.0.1",
                   forward_max_refusals="2", spool_retention_hours="0.0003") as node:
            url = node.env["MR2CT_DATABASE_URL"]
            series = write_mr_series(tmp_path / "mr", seed=453, slices=2, size=32, pixel_spacing=6.0, slice_spacing=10.0)
            assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
            _wait(lambda: len(seen["report_statuses"]) >= 2 and any(r.forward_error and "given up" in r.forward_error for r in _rows(url)),
                  60, "the original never committed was not given up")
            time.sleep(4)  # the forwarder's passes and retention's rounds: it is neither routed again nor deleted
            lost = seen["requests"][0][0]
            # routed twice and asked for twice, then given up (the two originals may be asked for in
            # one request or, when the second reached the spool after the first pass, in two)
            assert seen["stored"].count(lost) == 2 and sum(lost in asked for asked in seen["requests"]) == 2, seen["requests"]
            rows = {r.sop_instance_uid: r for r in _rows(url)}
            assert rows[lost].forward_next_at is None and rows[lost].purged_at is None and Path(rows[lost].path).is_file()
            assert all(r.purged_at for uid, r in rows.items() if uid != lost)  # the committed one went
            admin = {"Authorization": f"Bearer {api_token(url, 'auditor', 'routing')}"}
            routing = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/routing", headers=admin, timeout=10).json()
            assert routing["given_up"] == 1 and routing["failures"][0]["sop_instance_uid"] == lost, routing
            with init_db(url)() as session:
                assert session.query(AuditEvent).filter(AuditEvent.action == "routing-given-up").count() == 1


def test_forward_commitment_settings_name_the_key():
    from dicom_node.settings import Settings

    with pytest.raises(ValueError, match="forward_commitment needs forward_to"):
        Settings(forward_commitment=True, forward_originals=True)
    with pytest.raises(ValueError, match="forward_commitment needs forward_to's AE title PACS in allowed_aes"):
        Settings(forward_commitment=True, forward_originals=True, forward_to="PACS@10.0.0.5:104", allowed_aes="SCANNER1")
    assert Settings(forward_commitment=True, forward_originals=True, forward_to="PACS@10.0.0.5:104",
                    allowed_aes="SCANNER1,PACS@10.0.0.5").forward_commitment
    with pytest.raises(ValueError, match="forward_commitment_linger_seconds"):
        Settings(forward_commitment_linger_seconds=-1)


def test_config_check_asks_the_destination_for_storage_commitment(tmp_path):
    """`mr2ct config check` with forward_commitment: Orthanc takes Storage Commitment Push Model;
    a destination that stores but does not commit is a failure naming the key (retention would
    keep every routed original for ever)."""
    from tests.test_config_check import _check, _lines

    node_port, store_only_port = free_port(), free_port()
    store_only = AE("STOREONLY")
    store_only.add_supported_context(MRImageStorage)
    store_only.add_supported_context("1.2.840.10008.1.1")  # Verification
    server = store_only.start_server(("127.0.0.1", store_only_port), block=False)
    try:
        with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]}) as orthanc:
            env = {**node_env(tmp_path / "node", node_port, orthanc), "MR2CT_ALLOWED_AES": f"{SCANNER_AE},{orthanc.aet},STOREONLY",
                   "MR2CT_FORWARD_ORIGINALS": "true", "MR2CT_FORWARD_COMMITMENT": "true"}
            good = _check(env, forward_to=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
            assert good.returncode == 0 and _lines(good)["routing"].endswith("takes storage commitment requests"), good.stdout
            bad = _check(env, forward_to=f"STOREONLY@127.0.0.1:{store_only_port}")
            assert bad.returncode != 0 and _lines(bad)["routing"].startswith(
                "FAIL forward_commitment: forward_to STOREONLY@127.0.0.1"), bad.stdout
    finally:
        server.shutdown()


def test_two_node_processes_sharing_a_database_ask_for_each_original_once(tmp_path):
    """Scale-out: every SCP process runs a committer; an original is named by one request only."""
    from datetime import timedelta

    from dicom_node.forward_commitment import Committer
    from dicom_node.models import Series, utcnow

    sessions = init_db(f"sqlite:///{tmp_path / 'shared.db'}")
    study, routed = generate_uid(), utcnow() - timedelta(minutes=5)
    with sessions.begin() as session:
        series_uid = generate_uid()
        session.add(Series(series_instance_uid=series_uid, study_instance_uid=study, modality="MR", calling_ae=SCANNER_AE, instance_count=1500,
                           state="stable"))
        session.flush()
        uids = sorted(generate_uid() for _ in range(1500))
        session.add_all(Instance(sop_instance_uid=uid, sop_class_uid=str(MRImageStorage), series_instance_uid=series_uid,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(tmp_path / f"{uid}.dcm"), size_bytes=1,
                                 received_at=routed, forwarded_at=routed) for uid in uids)
    port = free_port()
    with _archive(port, None) as seen:
        committers = [Committer(sessions, f"ARCHIVE@127.0.0.1:{port}", NODE_AE, "1.2.826.0.1.3680043.8.498.", 3600) for _ in range(2)]
        threads = [threading.Thread(target=c.request_due) for c in committers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    named = [uid for request in seen["requests"] for uid in request]
    assert sorted(named) == uids, f"{len(named)} named for {len(uids)} originals in {len(seen['requests'])} requests"
    assert all(len(request) <= 1000 for request in seen["requests"])
    with sessions() as session:
        rows = session.query(ForwardCommitment).all()
        assert sorted(r.instances for r in rows if r.state == "requested") == sorted(len(r) for r in seen["requests"])
        assert session.query(Instance).filter(Instance.forward_commitment_id.is_(None)).count() == 0


def test_a_request_whose_originals_a_late_report_committed_first_is_committed_not_partial(tmp_path):
    """A request expires unanswered, its originals are asked for again, and the first request's
    report comes late, committing them. The second request's report then names them committed:
    until 2026-12-05 it was labelled partial with 0 committed (the label only: nothing was routed
    or asked again); it is committed, its count saying so."""
    from datetime import timedelta

    from dicom_node.forward_commitment import apply_report
    from dicom_node.models import Series, utcnow

    sessions = init_db(f"sqlite:///{tmp_path / 'node.db'}")
    routed = utcnow() - timedelta(hours=2)
    uids = sorted(generate_uid() for _ in range(3))
    with sessions.begin() as session:
        series_uid = generate_uid()
        session.add(Series(series_instance_uid=series_uid, study_instance_uid=generate_uid(), modality="MR", calling_ae=SCANNER_AE,
                           instance_count=3, state="stable"))
        first = ForwardCommitment(transaction_uid=generate_uid(), destination="ARCHIVE@127.0.0.1:104", instances=3, state="expired")
        second = ForwardCommitment(transaction_uid=generate_uid(), destination="ARCHIVE@127.0.0.1:104", instances=3)
        session.add_all([first, second])
        session.flush()
        session.add_all(Instance(sop_instance_uid=uid, sop_class_uid=str(MRImageStorage), series_instance_uid=series_uid,
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path=str(tmp_path / f"{uid}.dcm"), size_bytes=1,
                                 received_at=routed, forwarded_at=routed, forward_commitment_id=second.id) for uid in uids)
        transactions = first.transaction_uid, second.transaction_uid
    late = apply_report(sessions, "ARCHIVE", transactions[0], uids, [])
    assert late["committed"] == 3
    on_time = apply_report(sessions, "ARCHIVE", transactions[1], uids, [])
    assert (on_time["committed"], on_time["already_committed"], on_time["not_asked"]) == (0, 3, 0)
    with sessions() as session:
        row = session.scalar(select(ForwardCommitment).where(ForwardCommitment.transaction_uid == transactions[1]))
        assert (row.state, row.committed, row.failed) == ("committed", 3, 0)
        assert session.query(Instance).filter(Instance.forward_committed_at.is_(None)).count() == 0
