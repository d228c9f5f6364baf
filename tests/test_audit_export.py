"""The audit trail sent to an audit record repository (IHE ATNA) as DICOM audit messages
(PS3.15 A.5) in syslog, to a real rsyslogd: over TLS with certificates checked both ways, in order,
nothing lost while the repository is down."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import httpx
import pytest

from dicom_node import atna, audit
from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import free_port, storescu
from dicom_node.models import AuditEvent, Series
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import api_token, env_without_mr2ct, make_pki, syslog_messages, syslog_repository
from training.phantom_dicom import write_mr_series


def _event_id(xml: str) -> str:
    return ET.fromstring(xml).find("EventIdentification/EventID").get("csd-code")


def _objects(root: ET.Element) -> dict[str, str]:
    """ParticipantObjectID by its ID type's code (110180 study UID, 2 patient number)."""
    return {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
            for o in root.findall("ParticipantObjectIdentification")}


def test_the_audit_trail_reaches_a_repository_over_tls_as_dicom_audit_messages(node_factory, tmp_path):
    """A scanner's store, the sCT made and stored, the node's start and stop: each a DICOM audit
    message naming the study and the patient, sent over TLS to rsyslogd (which checks the node's
    client certificate), in the order they happened. The patient ID goes to the repository, never
    into the node's log."""
    pki = make_pki(tmp_path)
    with syslog_repository(tmp_path / "arr", tls=pki) as (port, received):
        node = node_factory(audit_syslog=f"tls://127.0.0.1:{port}", audit_syslog_ca_file=str(pki / "ca.pem"),
                            audit_syslog_certificate=str(pki / "client.pem"), audit_syslog_private_key=str(pki / "client.key"),
                            audit_enterprise_site_id="Test Hospital")
        series = write_mr_series(tmp_path / "mr", seed=431, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, patient_id="PATATNA01")
        assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
        assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
        node.stop()
        messages = syslog_messages(received, 5)
    roots = [ET.fromstring(xml) for xml in messages]
    events = [_event_id(xml) for xml in messages]
    # the node's start (recorded once all its parts run: a store may come first) ... its stop, last
    types = [r.find("EventIdentification/EventTypeCode") for r in roots]
    assert [t.get("csd-code") for t in types if t is not None] == ["110120", "110121"] and events[-1] == "110100", events
    stores = [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110104"]
    received_from_scanner = [r for r in stores if r.find("ActiveParticipant/RoleIDCode").get("csd-code") == "110153"
                             and r.find("ActiveParticipant").get("UserID") == SCANNER_AE]
    assert len(received_from_scanner) == 1
    store = received_from_scanner[0]
    assert _objects(store) == {"110180": series.study_uid, "2": "PATATNA01"}
    assert store.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass").get("NumberOfInstances") == "4"
    assert store.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    destination = [p for p in store.findall("ActiveParticipant") if p.find("RoleIDCode").get("csd-code") == "110152"]
    assert destination[0].get("UserID") == NODE_AE
    assert events.index("110103") > roots.index(store)  # the sCT made after the store, as it happened
    made = [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110103"]
    assert made and made[0].find("EventIdentification").get("EventActionCode") == "C" and _objects(made[0])["2"] == "PATATNA01"
    stored_to_orthanc = [r for r in stores if r is not store]
    assert stored_to_orthanc and stored_to_orthanc[0].findall("ActiveParticipant")[1].get("UserID").startswith("http://127.0.0.1:")
    for root in roots:
        source = root.find("AuditSourceIdentification")
        assert source.get("AuditSourceID") == NODE_AE and source.get("AuditEnterpriseSiteID") == "Test Hospital"
        stamp = datetime.fromisoformat(root.find("EventIdentification").get("EventDateTime"))
        assert stamp.tzinfo is not None and abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 600
    assert "PATATNA01" not in node.log_path.read_text(errors="replace")


def test_nothing_is_lost_while_the_repository_is_down(node_factory, tmp_path):
    """The repository unreachable: the node keeps working, GET /audit/export says how far behind
    it is and why; once the repository listens, every message is sent, in order, none twice."""
    port = free_port()
    node = node_factory(audit_syslog=f"tcp://127.0.0.1:{port}")
    series = write_mr_series(tmp_path / "mr", seed=432, slices=3, size=48, pixel_spacing=5.0, slice_spacing=10.0, patient_id="PATATNA02")
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    auditor = {"Authorization": f"Bearer {api_token(node.database_url, 'auditor', 'atna-check')}"}
    url = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/audit/export"
    stands = httpx.get(url, headers=auditor, timeout=10).json()
    assert stands["destination"] == f"tcp://127.0.0.1:{port}" and stands["behind"] > 0 and stands["sent"] == 0
    assert "Connection refused" in (stands["last_error"] or ""), stands
    with syslog_repository(tmp_path / "arr", port=port) as (_, received):
        sessions = init_db(node.database_url)
        assert atna.wait_until_sent(sessions, f"tcp://127.0.0.1:{port}", timeout=90)
        stands = httpx.get(url, headers=auditor, timeout=10).json()
        messages = syslog_messages(received, stands["sent"])
    assert stands["behind"] == 0 and stands["last_error"] is None and stands["sent"] == len(messages) > 0
    assert len(set(messages)) == len(messages)  # none twice
    with sessions() as session:
        rows = session.query(AuditEvent).order_by(AuditEvent.id).all()
        source = atna.Source(source_id=NODE_AE, ae_title=NODE_AE)
        expected = [_event_id(xml) for xml in (atna.message(row, source, atna.subjects_of(session, row)) for row in rows) if xml]
    # the export began with the node's first start: the rows it sent are the table's own, in order
    assert [_event_id(xml) for xml in messages] == expected[-len(messages):]
    assert stands["skipped"] > 0  # series-stable, job-started: the node's own work, no DICOM audit message
    assert any("PATATNA02" in xml for xml in messages)


@pytest.mark.parametrize("action, actor, outcome, event, kind", [
    (audit.SECURITY_ALERT, "EVIL@10.0.0.66", "failure", "110113", "110126"),  # a calling AE refused: node authentication
    (audit.SECURITY_ALERT, "api@10.0.0.7", "failure", "110114", "110122"),  # a bad bearer token: a failed login
    ("user-authentication", "api:physicist", "success", "110114", "110122"),
    ("model-activated", "mr2ct models", "success", "110113", "110131"),  # software configuration changed
])
def test_security_events_map_to_the_dicom_event_and_type_codes(tmp_path, action, actor, outcome, event, kind):
    row = AuditEvent(id=1, at=datetime.now(timezone.utc), action=action, outcome=outcome, actor=actor, detail={"reason": "x < y & z"})
    xml = atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT"))
    root = ET.fromstring(xml)  # well formed, the reason escaped
    assert root.find("EventIdentification/EventID").get("csd-code") == event
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == kind
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == ("0" if outcome == "success" else "4")
    assert root.find("EventIdentification/EventOutcomeDescription").text == "x < y & z"
    requestor = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert requestor and requestor[0].get("UserID") in (actor.split("@")[0].replace("api", "unknown"), actor.removeprefix("api:"), "MR2CT")
    # the schema's order: event, participants, source, objects
    assert [child.tag for child in root][0] == "EventIdentification" and [child.tag for child in root][-1] == "AuditSourceIdentification"
    assert atna.syslog_message(xml, atna.Source(source_id="MR2CT", ae_title="MR2CT")).startswith(b"<85>1 ")


def test_a_series_a_user_had_the_node_read_from_orthanc_is_an_instances_transferred_message():
    """POST /synthesize (Orthanc's button): a user made the node copy a patient's series from
    Orthanc; until 2026-12-05 the repository heard nothing of it (the node's own work, it said)."""
    row = AuditEvent(id=1, at=datetime.now(timezone.utc), action="synthesis-requested", outcome="success", actor="api:physicist",
                     detail={"source": "http://127.0.0.1:8042", "instances": 4})
    root = ET.fromstring(atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT")))
    assert root.find("EventIdentification/EventID").get("csd-code") == "110104"  # DICOM Instances Transferred
    assert root.find("EventIdentification").get("EventActionCode") == "C"
    people = {p.get("UserID"): (p.get("UserIsRequestor"), p.find("RoleIDCode").get("csd-code") if p.find("RoleIDCode") is not None else None)
              for p in root.findall("ActiveParticipant")}
    assert people == {"physicist": ("true", None), "http://127.0.0.1:8042": ("false", "110153"), "MR2CT": ("false", "110152")}
    orthanc = next(p for p in root.findall("ActiveParticipant") if p.get("UserID").startswith("http"))
    assert (orthanc.get("NetworkAccessPointID"), orthanc.get("NetworkAccessPointTypeCode")) == ("http://127.0.0.1:8042", "5")
    from dicom_node.api.app import _without_credentials  # what the API writes as the row's source: no password in it

    assert _without_credentials("https://mr2ct:secret@pacs.example:8043/orthanc") == "https://pacs.example:8043/orthanc"
    assert _without_credentials("http://[::1]:8042") == "http://[::1]:8042"


def test_the_node_s_own_work_is_no_audit_message_and_a_bad_setting_names_its_key():
    from dicom_node.settings import Settings

    row = AuditEvent(id=1, at=datetime.now(timezone.utc), action=audit.SERIES_STABLE, outcome="success", actor="stability monitor", detail={})
    assert atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT")) is None
    with pytest.raises(ValueError, match="audit_syslog"):
        Settings(audit_syslog="https://arr.example:6514")
    with pytest.raises(ValueError, match="audit_syslog_ca_file needs audit_syslog = tls://"):
        Settings(audit_syslog="udp://127.0.0.1:514", audit_syslog_ca_file="/etc/hostname")
    assert Series  # the patient comes from the series table (subjects_of), as the tests above show


def test_config_check_connects_to_the_repository(orthanc, tmp_path):
    """`mr2ct config check` before the node takes traffic: the repository reached over TLS with its
    certificate checked (and over RELP in TLS, a session opened); one signed by another CA, a
    listener that speaks no RELP named as RELP, or none listening, fails naming the setting; UDP,
    which nothing answers, is named as best effort."""
    from tests.conftest import node_env
    from tests.test_config_check import _check, _lines

    pki = make_pki(tmp_path)
    env = node_env(tmp_path / "node", free_port(), orthanc)
    client = {"audit_syslog_certificate": str(pki / "client.pem"), "audit_syslog_private_key": str(pki / "client.key")}
    with syslog_repository(tmp_path / "arr", tls=pki) as (port, _):
        good = _check(env, audit_syslog=f"tls://127.0.0.1:{port}", audit_syslog_ca_file=str(pki / "ca.pem"), **client)
        assert good.returncode == 0 and _lines(good)["audit syslog"].startswith("ok"), good.stdout
        (tmp_path / "other").mkdir()
        other_ca = make_pki(tmp_path / "other")
        untrusted = _check(env, audit_syslog=f"tls://127.0.0.1:{port}", audit_syslog_ca_file=str(other_ca / "ca.pem"), **client)
        assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in _lines(untrusted)["audit syslog"], untrusted.stdout
    with syslog_repository(tmp_path / "relp", tls=pki, relp=True) as (port, _):  # RELP in TLS: a session opened
        relp = _check(env, audit_syslog=f"relp+tls://127.0.0.1:{port}", audit_syslog_ca_file=str(pki / "ca.pem"), **client)
        assert relp.returncode == 0 and _lines(relp)["audit syslog"].startswith("ok"), relp.stdout
        assert "accepts a RELP session (syslog offered) (TLS: the repository's certificate checked)" in relp.stdout
    with syslog_repository(tmp_path / "plain") as (port, _):  # a plain syslog listener named as RELP: it never answers
        not_relp = _check(env, audit_syslog=f"relp://127.0.0.1:{port}")
        assert not_relp.returncode == 1 and _lines(not_relp)["audit syslog"].startswith("FAIL audit_syslog relp://"), not_relp.stdout
    gone = _check(env, audit_syslog=f"tcp://127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and _lines(gone)["audit syslog"].startswith("FAIL audit_syslog tcp://127.0.0.1:"), gone.stdout
    udp = _check(env, audit_syslog="udp://127.0.0.1:514")
    assert udp.returncode == 0 and _lines(udp)["audit syslog"].startswith("warn") and "best effort" in udp.stdout


def test_a_reason_with_control_characters_still_makes_well_formed_xml():
    """A reason from the wire (an exception's text) may hold characters XML 1.0 cannot carry."""
    row = AuditEvent(id=1, at=datetime.now(timezone.utc), action=audit.INSTANCE_REFUSED, outcome="failure", actor="SCAN\x01NER",
                     detail={"reason": "bad value b'\x00\x07' in (0010,0010)"})
    root = ET.fromstring(atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT")))
    assert "\x00" not in root.find("EventIdentification/EventOutcomeDescription").text
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "4"


def test_a_repository_that_restarted_gets_what_follows_on_a_new_connection(tmp_path):
    """The repository restarted between two batches (its end of the kept stream closed): the next
    batch goes on a new connection, not into the dead one, where it would vanish."""
    from dicom_node.db import init_db

    sessions = init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    port = free_port()
    destination = f"tcp://127.0.0.1:{port}"
    atna.start_position(sessions, destination)
    exporter = atna.Exporter(sessions, atna.Transport(destination), atna.Source(source_id="MR2CT", ae_title="MR2CT"), holder="test")
    with syslog_repository(tmp_path / "first", port=port) as (_, received):
        audit.record(sessions, audit.APPLICATION_START, "success", "mr2ct all")
        assert exporter.send_pending() == 1
        assert len(syslog_messages(received, 1)) == 1
    with syslog_repository(tmp_path / "second", port=port) as (_, received):
        audit.record(sessions, audit.APPLICATION_STOP, "success", "mr2ct all")
        assert exporter.send_pending() == 1
        stopped = syslog_messages(received, 1, timeout=10)
    assert len(stopped) == 1 and "110121" in stopped[0]
    exporter.release()


def test_a_tls_stream_is_kept_between_batches(tmp_path):
    """Over TLS the stream is kept from batch to batch (a TLS 1.3 server's session ticket makes it
    readable: that is no close), so a repository is not handed a new handshake for every event."""
    from dicom_node.db import init_db

    pki = make_pki(tmp_path)
    sessions = init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    with syslog_repository(tmp_path / "arr", tls=pki) as (port, received):
        destination = f"tls://127.0.0.1:{port}"
        atna.start_position(sessions, destination)
        context = atna.client_context(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
        transport = atna.Transport(destination, context)
        exporter = atna.Exporter(sessions, transport, atna.Source(source_id="MR2CT", ae_title="MR2CT"), holder="test")
        audit.record(sessions, audit.APPLICATION_START, "success", "mr2ct all")
        assert exporter.send_pending() == 1
        first = transport.sock
        syslog_messages(received, 1)
        audit.record(sessions, audit.APPLICATION_STOP, "success", "mr2ct all")
        assert exporter.send_pending() == 1
        assert transport.sock is first
        assert len(syslog_messages(received, 2)) == 2
        exporter.release()


def test_history_is_sent_again_from_a_time_an_administrator_names(tmp_path):
    """`mr2ct audit export --resend-since T`: a repository connected to a node that ran before it,
    or one that lost its data, gets the rows from T on, in order (the rewind itself audited)."""
    import subprocess
    import sys

    from dicom_node.db import init_db

    database_url = f"sqlite:///{tmp_path / 'audit.db'}"
    sessions = init_db(database_url)
    port = free_port()
    destination = f"tcp://127.0.0.1:{port}"
    audit.record(sessions, audit.APPLICATION_START, "success", "mr2ct all")  # before the export began
    atna.start_position(sessions, destination)
    env = {**env_without_mr2ct(), "MR2CT_DATABASE_URL": database_url,
           "MR2CT_AUDIT_SYSLOG": destination}
    said = subprocess.run([sys.executable, "-m", "dicom_node.cli", "audit", "export", "--resend-since", "2000-01-01"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert said.returncode == 0, said.stderr
    exporter = atna.Exporter(sessions, atna.Transport(destination), atna.Source(source_id="MR2CT", ae_title="MR2CT"), holder="test")
    with syslog_repository(tmp_path / "arr", port=port) as (_, received):
        assert exporter.send_pending() == 1  # the start again; the rewind row is the node's own, no audit message
        assert "110120" in syslog_messages(received, 1)[0]
    exporter.release()
    bad = subprocess.run([sys.executable, "-m", "dicom_node.cli", "audit", "export", "--resend-since", "yesterday"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr


@pytest.mark.parametrize("secured", [True, False], ids=["relp+tls", "relp"])
def test_over_relp_the_repository_acknowledges_every_message(tmp_path, secured):
    """To rsyslogd's RELP input (imrelp; in TLS with certificates checked both ways, or plain):
    more messages than one window of answers, in order, on one session kept between batches."""
    sessions = init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    pki = make_pki(tmp_path) if secured else None
    with syslog_repository(tmp_path / "arr", tls=pki, relp=True) as (port, received):
        destination = f"relp{'+tls' if secured else ''}://127.0.0.1:{port}"
        atna.start_position(sessions, destination)
        context = atna.client_context(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")) if pki else None
        transport = atna.Transport(destination, context)
        exporter = atna.Exporter(sessions, transport, atna.Source(source_id="MR2CT", ae_title="MR2CT"), holder="test")
        for n in range(atna.RELP_WINDOW + 30):
            audit.record(sessions, audit.SECURITY_ALERT, "failure", f"EVIL{n}@10.0.0.66", reason=f"calling AE title {n} not allowed")
        assert exporter.send_pending() == atna.RELP_WINDOW + 30
        session = transport.sock
        audit.record(sessions, audit.APPLICATION_STOP, "success", "mr2ct all")
        assert exporter.send_pending() == 1 and transport.sock is session
        messages = syslog_messages(received, atna.RELP_WINDOW + 31)
        exporter.release()
    assert len(messages) == atna.RELP_WINDOW + 31 and "110121" in messages[-1]
    assert [f'UserID="EVIL{n}"' in xml for n, xml in enumerate(messages[:-1])] == [True] * (atna.RELP_WINDOW + 30)  # in order


def test_a_batch_the_repository_did_not_acknowledge_whole_is_sent_again(tmp_path):
    """The repository went down mid-batch, having answered two of its messages: the export's
    position does not move, and the next repository on that address gets the whole batch (the
    two it had taken, again); over plain syslog the batch would count as sent."""
    import socket
    import threading

    sessions = init_db(f"sqlite:///{tmp_path / 'audit.db'}")
    port = free_port()
    destination = f"relp://127.0.0.1:{port}"
    atna.start_position(sessions, destination)
    for n in range(5):
        audit.record(sessions, audit.SECURITY_ALERT, "failure", f"EVIL{n}@10.0.0.66", reason="calling AE title not allowed")
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(30)

    def dies_mid_batch() -> None:  # answers the session's open and two messages, then the stream ends
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(10)
            received = b""
            for answer, awaited in ((b"1 rsp 37 200 OK\nrelp_version=0\ncommands=syslog\n", b" open "),
                                    (b"2 rsp 6 200 OK\n3 rsp 6 200 OK\n", b"6 syslog ")):  # all five sent before any answer
                while awaited not in received:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    received += chunk
                connection.sendall(answer)

    peer = threading.Thread(target=dies_mid_batch, daemon=True)
    peer.start()
    exporter = atna.Exporter(sessions, atna.Transport(destination, timeout=10), atna.Source(source_id="MR2CT", ae_title="MR2CT"),
                             holder="test")
    with pytest.raises(ConnectionResetError, match="closed the stream before it answered"):
        exporter.send_pending()
    peer.join()
    listener.close()
    with sessions() as session:
        assert atna.status(session, destination)["behind"] == 5  # nothing counted as sent
    with syslog_repository(tmp_path / "arr", port=port, relp=True) as (_, received):
        assert exporter.send_pending() == 5
        messages = syslog_messages(received, 5)
    assert [f'UserID="EVIL{n}"' in xml for n, xml in enumerate(messages)] == [True] * 5
    exporter.release()
