"""The audit trail sent to an audit record repository (IHE ATNA): each audit row that a DICOM audit
message stands for (PS3.15 A.5.3) becomes one such message (the schema of PS3.15 A.5.1) in an RFC
5424 syslog message, sent over TLS (RFC 5425), UDP (RFC 5426), plain TCP (octet-counted, RFC
6587: a local relay only) or RELP (rsyslog's Reliable Event Logging Protocol, plain or in TLS),
where the repository acknowledges every message.

Delivery: in the order the rows were written, each at least once (over TLS and TCP): the rows
after the last one sent are read in batches, a batch is sent, then the position is committed; a
repository that cannot be reached is tried again with a growing pause, and nothing is skipped
meanwhile. Syslog has no acknowledgement: a kept stream the repository closed is noticed before a
batch (it is readable: a receiver never writes) and a new one opened, but a batch written in the
very instant the repository goes down is lost with the stream. Over RELP the position moves only
once the repository has answered 200 to every message of the batch: a batch it did not
acknowledge whole is sent again (what it had taken of it, twice). Over UDP a datagram lost on the way is lost (the transport says nothing). Of several
node processes sharing one database, one sends at a time (a lease on the export's row).

The messages name the patient (Patient ID, from the series the row is about), as ATNA asks: they
go to the repository, never into a log line.
"""

from __future__ import annotations

import logging
import os
import re
import select as io_select
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.sax.saxutils import quoteattr as _quoteattr

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import AuditEvent, AuditExport, Series, utcnow
from dicom_node.retention import SPOOL_PURGED
from dicom_node.settings import SYSLOG_TLS_SCHEMES
from dicom_node.tokens import TOKEN_CREATED, TOKEN_REVOKED

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
BATCH = 200
MAX_PAUSE_SECONDS = 60.0
PRI = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice), as IHE ITI TF-2 asks
MSGID = "IHE+RFC-3881"
APP_NAME = "mr2ct"
BOM = "\ufeff"  # RFC 5424: a UTF-8 MSG starts with the byte order mark

# DICOM event IDs (DCM, PS3.16 CID 400) and event type codes (CID 401, 403, 404)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
USER_SECURITY_ATTRIBUTES_CHANGED = ("110137", "User Security Attributes Changed")
# active participant roles (CID 402)
APPLICATION = ("110150", "Application")
DESTINATION = ("110152", "Destination Role ID")
SOURCE = ("110153", "Source Role ID")

# mr2ct's action -> (event ID, event type code or None, event action code). The actions not named
# here (series-stable, job-started, job-retry, job-cancelled, routing-retry,
# training-*, model-evaluated, spool-recovery, ...) are the node's own work: no DICOM audit message
# stands for them; they are counted as skipped and stay in the node's audit table.
EVENTS: dict[str, tuple[tuple[str, str], tuple[str, str] | None, str]] = {
    audit.APPLICATION_START: (APPLICATION_ACTIVITY, APPLICATION_START, "E"),
    audit.APPLICATION_STOP: (APPLICATION_ACTIVITY, APPLICATION_STOP, "E"),
    audit.ASSOCIATION: (INSTANCES_TRANSFERRED, None, "C"),  # only an association that stored or refused instances
    audit.INSTANCE_REFUSED: (INSTANCES_TRANSFERRED, None, "C"),
    audit.INSTANCES_TRANSFERRED: (INSTANCES_TRANSFERRED, None, "C"),
    audit.ROUTING_GIVEN_UP: (INSTANCES_TRANSFERRED, None, "C"),
    "results-delivered": (INSTANCES_TRANSFERRED, None, "C"),  # an sCT and its SR Orthanc sent on at the node's request (deliver_to)
    "results-delivery-given-up": (INSTANCES_TRANSFERRED, None, "C"),
    # a user had the node read a series from Orthanc (POST /synthesize, Orthanc's button): until 2026-12-05 not sent
    audit.SYNTHESIS_REQUESTED: (INSTANCES_TRANSFERRED, None, "C"),
    # a user's `mr2ct pull` or `pull-pairs` copied a study's series from a PACS into a training cache or a pairs folder
    audit.DATA_PULLED: (INSTANCES_TRANSFERRED, None, "C"),
    audit.PULLED_DATA_REMOVED: (INSTANCES_ACCESSED, None, "D"),  # those copies deleted (--prune)
    audit.JOB_FINISHED: (INSTANCES_ACCESSED, None, "C"),  # derived instances created from the MR
    audit.JOB_FAILED: (INSTANCES_ACCESSED, None, "C"),
    SPOOL_PURGED: (INSTANCES_ACCESSED, None, "D"),
    "instances-accessed/preview": (INSTANCES_ACCESSED, None, "R"),
    "instances-accessed/audit-read": (AUDIT_LOG_USED, None, "R"),
    "query": (QUERY, None, "E"),
    "user-authentication": (USER_AUTHENTICATION, LOGIN, "E"),
    audit.SECURITY_ALERT: (SECURITY_ALERT, NODE_AUTHENTICATION, "E"),  # or a refused login: see _event
    TOKEN_CREATED: (SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "E"),
    TOKEN_REVOKED: (SECURITY_ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, "E"),
    "model-registered": (SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E"),
    "model-activated": (SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E"),
    "model-card-updated": (SECURITY_ALERT, SOFTWARE_CONFIGURATION, "E"),
}
# A refused instance, a refused association or login is the node working as meant: minor failure.
MINOR_FAILURES = {audit.INSTANCE_REFUSED, audit.SECURITY_ALERT, audit.ASSOCIATION, "user-authentication"}


@dataclass(frozen=True)
class Source:
    """Who reports: the node (AuditSourceIdentification, and its own active participant)."""

    source_id: str
    ae_title: str
    site_id: str | None = None
    host: str = field(default_factory=socket.gethostname)
    process_id: str = field(default_factory=lambda: str(os.getpid()))


@dataclass(frozen=True)
class Subject:
    """A study the row is about, and its patient (from the series table)."""

    study_uid: str
    patient_id: str
    instances: int | None = None


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(value: str) -> str:
    """``value`` without the characters XML 1.0 cannot carry (control characters a reason or an
    identifier from the wire may hold): the message stays well formed."""
    return _NOT_XML.sub("\ufffd", value)


def quoteattr(value: str) -> str:
    return _quoteattr(_clean(value))


def _code(tag: str, code: tuple[str, str], system: str = "DCM") -> str:
    return f"<{tag} csd-code={quoteattr(code[0])} codeSystemName={quoteattr(system)} originalText={quoteattr(code[1])}/>"


def _participant(user_id: str, requestor: bool, *, role: tuple[str, str] | None = None, access_point: str | None = None,
                 access_point_type: str | None = None, alternative: str | None = None) -> str:
    attrs = [f"UserID={quoteattr(user_id or 'unknown')}"]
    if alternative:
        attrs.append(f"AlternativeUserID={quoteattr(alternative)}")
    attrs.append(f'UserIsRequestor="{"true" if requestor else "false"}"')
    if access_point:
        attrs.append(f"NetworkAccessPointID={quoteattr(access_point)}")
        attrs.append(f'NetworkAccessPointTypeCode="{access_point_type or "1"}"')
    inner = _code("RoleIDCode", role) if role else ""
    return f"<ActiveParticipant {' '.join(attrs)}>{inner}</ActiveParticipant>" if inner else f"<ActiveParticipant {' '.join(attrs)}/>"


def _peer(actor: str) -> tuple[str, str | None, str | None]:
    """(user ID, network access point, its type) of the actor an audit row names: ``AE@address``
    (a DICOM peer), ``api:name`` (a token's name), ``api@client`` / ``dashboard@client`` (a
    caller that did not authenticate), or the node's own part (``worker ...``, ``forwarder``)."""
    if actor.startswith("api:"):
        return actor[4:], None, None
    name, at, address = actor.partition("@")
    if at:
        kind = "2" if address.replace(".", "").isdigit() or ":" in address else "1"
        return ("unknown" if name in ("api", "dashboard") else name), address, kind
    return actor, None, None


def _event(row: AuditEvent) -> tuple[tuple[str, str], tuple[str, str] | None, str] | None:
    found = EVENTS.get(row.action)
    if found is None:
        return None
    if row.action == audit.ASSOCIATION and not (row.detail or {}).get("instances_stored") and not (row.detail or {}).get("instances_refused"):
        # an association that moved nothing: a rejected one is a refused node; an echo is nothing to audit
        return (SECURITY_ALERT, NODE_AUTHENTICATION, "E") if row.outcome == "failure" else None
    if row.action == audit.SECURITY_ALERT and (row.actor.split("@")[0] in ("api", "dashboard") or row.actor.startswith("api:")):
        return (USER_AUTHENTICATION, LOGIN, "E")  # a token refused by the API or the dashboard's login
    return found


def _outcome(row: AuditEvent) -> str:
    if row.outcome == "success":
        return "0"
    if row.outcome == "warning" or row.action in MINOR_FAILURES:
        return "4"
    return "8"


def message(row: AuditEvent, source: Source, subjects: Iterable[Subject] = ()) -> str | None:
    """The DICOM audit message (one line of XML) for ``row``; None when none stands for its action."""
    event = _event(row)
    if event is None:
        return None
    event_id, type_code, action_code = event
    detail = row.detail or {}
    at = row.at if row.at.tzinfo else row.at.replace(tzinfo=timezone.utc)
    parts = [f'<EventIdentification EventActionCode="{action_code}" EventDateTime={quoteattr(at.isoformat(timespec="milliseconds"))} '
             f'EventOutcomeIndicator="{_outcome(row)}">', _code("EventID", event_id)]
    if type_code:
        parts.append(_code("EventTypeCode", type_code))
    if detail.get("reason"):
        parts.append(f"<EventOutcomeDescription>{_text(str(detail['reason']))}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    user, address, address_type = _peer(row.actor)
    own = dict(access_point=source.host, alternative=source.process_id)
    if event_id == INSTANCES_TRANSFERRED and row.action in (audit.ASSOCIATION, audit.INSTANCE_REFUSED):
        # a DICOM peer stored to the node
        parts.append(_participant(user, True, role=SOURCE, access_point=address, access_point_type=address_type))
        parts.append(_participant(source.ae_title, False, role=DESTINATION, **own))
    elif row.action in (audit.SYNTHESIS_REQUESTED, audit.DATA_PULLED):
        # a user (the requestor) had the node copy a series from Orthanc into its spool, or had `mr2ct pull` copy
        # series from a PACS into a folder on this host: the source its URL, the destination the node or the folder
        origin = str(detail.get("source") or "Orthanc")
        copied_to = str(detail.get("destination") or "") if row.action == audit.DATA_PULLED else source.ae_title
        parts.append(_participant(user, True, access_point=address, access_point_type=address_type))
        parts.append(_participant(origin, False, role=SOURCE, access_point=origin if "://" in origin else None, access_point_type="5"))
        parts.append(_participant(copied_to, False, role=DESTINATION, **own))
    elif row.action == audit.PULLED_DATA_REMOVED:
        # a user's --prune deleted the copies in a folder on this host
        parts.append(_participant(user, True))
        parts.append(_participant(str(detail.get("destination") or ""), False, **own))
    elif event_id == INSTANCES_TRANSFERRED:
        # the node stored to Orthanc (an sCT), routed originals to their destination, or had Orthanc send an sCT on
        destination = str(detail.get("destination") or "")
        parts.append(_participant(source.ae_title, True, role=SOURCE, **own))
        parts.append(_participant(destination, False, role=DESTINATION, access_point=destination if "://" in destination else None,
                                  access_point_type="5"))
    elif event_id == APPLICATION_ACTIVITY:
        parts.append(_participant(source.ae_title, False, role=APPLICATION, **own))
        parts.append(_participant(row.actor, True))  # what started or stopped it: the node's command
    elif address or row.actor.startswith("api:"):  # a caller: the API's, the dashboard's, a refused peer
        parts.append(_participant(user, True, access_point=address, access_point_type=address_type))
        parts.append(_participant(source.ae_title, False, role=APPLICATION, **own))
    else:  # the node's own part (a worker, retention, the model registry's command)
        parts.append(_participant(source.ae_title, True, role=APPLICATION, **own))
    site = f" AuditEnterpriseSiteID={quoteattr(source.site_id)}" if source.site_id else ""
    parts.append(f"<AuditSourceIdentification AuditSourceID={quoteattr(source.source_id)}{site}>"
                 '<AuditSourceTypeCode csd-code="4" codeSystemName="DCM" originalText="Application Server process tier in a multi-tier system"/>'
                 "</AuditSourceIdentification>")
    patients: dict[str, None] = {}
    for subject in subjects:
        description = (f'<ParticipantObjectDescription><SOPClass NumberOfInstances="{int(subject.instances)}"/></ParticipantObjectDescription>'
                       if subject.instances is not None else "")
        parts.append(f'<ParticipantObjectIdentification ParticipantObjectID={quoteattr(subject.study_uid)} ParticipantObjectTypeCode="2" '
                     f'ParticipantObjectTypeCodeRole="3">{_code("ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))}'
                     f"{description}</ParticipantObjectIdentification>")
        if subject.patient_id:
            patients[subject.patient_id] = None
    for patient_id in patients:
        parts.append(f'<ParticipantObjectIdentification ParticipantObjectID={quoteattr(patient_id)} ParticipantObjectTypeCode="1" '
                     f'ParticipantObjectTypeCodeRole="1">{_code("ParticipantObjectIDTypeCode", ("2", "Patient Number"), "RFC-3881")}'
                     "</ParticipantObjectIdentification>")
    return '<?xml version="1.0" encoding="UTF-8"?><AuditMessage>' + "".join(parts) + "</AuditMessage>"


def _text(value: str) -> str:
    return _clean(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def subjects_of(session: Session, row: AuditEvent) -> list[Subject]:
    """The studies (and patients) a row is about: its series' (and, for a received association,
    the series it stored), else its study with no patient known."""
    detail = row.detail or {}
    uids = [row.series_instance_uid] if row.series_instance_uid else []
    if row.action == audit.ASSOCIATION:
        uids += [str(uid) for uid in detail.get("series") or []]
    found: dict[str, Subject] = {}
    if uids:
        for study_uid, patient_id in session.execute(select(Series.study_instance_uid, Series.patient_id).where(
                Series.series_instance_uid.in_(uids))).all():
            found.setdefault(study_uid, Subject(study_uid, patient_id or ""))
    if row.study_instance_uid and row.study_instance_uid not in found:  # its patient where the row says it (a pull's)
        found[row.study_instance_uid] = Subject(row.study_instance_uid, str(detail.get("patient_id") or ""))
    instances = detail.get("instances_stored", detail.get("instances"))
    if len(found) == 1 and isinstance(instances, int):
        (only,) = found.values()
        found[only.study_uid] = Subject(only.study_uid, only.patient_id, instances)
    return list(found.values())


def syslog_message(xml: str, source: Source, at: datetime | None = None) -> bytes:
    """RFC 5424: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG``, MSG UTF-8 with its BOM."""
    stamp = (at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = "".join(c for c in source.host if 33 <= ord(c) <= 126)[:255] or "-"
    return f"<{PRI}>1 {stamp} {host} {APP_NAME} {source.process_id} {MSGID} - {BOM}{xml}".encode()


# RELP (librelp's doc/relp.md): frames "TXNR SP COMMAND SP DATALEN [SP DATA] LF"; every command
# but the hints (TXNR 0) is answered by a "rsp" of the same TXNR whose data starts with 200 (taken)
# or 500 (not).
RELP_HEADER = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})([ \n])")
RELP_WINDOW = 100  # messages sent before their answers are read (librelp's own window is 128)
RELP_MAX_ANSWER = 1 << 20


class RelpRefused(OSError):
    """The repository answered a RELP command with other than 200, or spoke no RELP."""


class Transport:
    """One destination, ``tls://``, ``udp://``, ``tcp://``, ``relp://`` or ``relp+tls://`` host:port;
    a stream (and over RELP, its session) is kept open."""

    def __init__(self, url: str, context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rpartition(":")
        self.url, self.scheme, self.host, self.port, self.timeout = url, scheme, host.strip("[]"), int(port), timeout
        self.context = context
        self.relp = scheme in ("relp", "relp+tls")
        self.sock: socket.socket | None = None
        self._txnr = 0
        self._received = b""

    def send(self, messages: list[bytes]) -> None:
        if self.scheme == "udp":
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for data in messages:
                    sock.sendto(data, (self.host, self.port))
            return
        if self.sock is not None and not self._alive():
            # the receiver closed the stream (a restart): a send into it now would vanish with the reset
            self._drop()
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if self.scheme in ("tls", "relp+tls"):
                assert self.context is not None
                try:
                    sock = self.context.wrap_socket(sock, server_hostname=self.host)
                except (OSError, ssl.SSLError):
                    sock.close()
                    raise
            self.sock = sock
            if self.relp:
                try:
                    self._relp_open()
                except OSError:
                    self._drop()
                    raise
        try:
            if self.relp:
                self._relp_syslog(messages)
            else:
                self.sock.sendall(b"".join(str(len(data)).encode() + b" " + data for data in messages))  # octet counting
        except OSError:
            self._drop()
            raise

    def _relp_frame(self, command: bytes, data: bytes = b"") -> tuple[int, bytes]:
        self._txnr = self._txnr % 999_999_999 + 1  # 1 after 999,999,999, as the protocol latches it
        return self._txnr, b"%d %s %d" % (self._txnr, command, len(data)) + (b" " + data if data else b"") + b"\n"

    def _relp_answer(self, txnr: int) -> bytes:
        """The data of the repository's "rsp" to command ``txnr``. Raises OSError for a stream
        closed, a hint that the repository closes it, a frame that is not RELP or answers another
        command."""
        assert self.sock is not None
        while True:
            header = RELP_HEADER.match(self._received)
            if header:
                length, separator = int(header.group(3)), header.group(4)
                end = header.end() + (length + 1 if length else 0)
                if length > RELP_MAX_ANSWER or (length == 0) != (separator == b"\n"):
                    raise RelpRefused(f"RELP: a malformed frame from the repository: {self._received[:80]!r}")
                if len(self._received) >= end:
                    frame, self._received = self._received[:end], self._received[end:]
                    data = frame[header.end():-1] if length else b""
                    if length and frame[-1:] != b"\n":
                        raise RelpRefused(f"RELP: a frame from the repository without its trailer: {frame[:80]!r}")
                    got, command = int(header.group(1)), header.group(2)
                    if got == 0:  # a hint: "serverclose" (the repository shuts the session)
                        raise ConnectionResetError(f"RELP: the repository closed the session ({command.decode(errors='replace')})")
                    if command != b"rsp" or got != txnr:
                        raise RelpRefused(f"RELP: the repository answered {command.decode(errors='replace')} {got} where the "
                                          f"answer to {txnr} was due")
                    return data
            elif len(self._received) > 64 or (self._received and not self._received[:1].isdigit()):
                raise RelpRefused(f"RELP: the repository does not speak RELP: {self._received[:80]!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("RELP: the repository closed the stream before it answered")
            self._received += chunk

    def _relp_open(self) -> None:
        """The session's "open": the repository must offer a RELP version and the syslog command."""
        from dicom_node import __version__

        assert self.sock is not None
        self._txnr, self._received = 0, b""
        txnr, frame = self._relp_frame(b"open", b"relp_version=0\nrelp_software=mr2ct,%s\ncommands=syslog" % __version__.encode())
        self.sock.sendall(frame)
        status, _, offered = self._relp_answer(txnr).partition(b"\n")
        if not status.startswith(b"200"):
            raise RelpRefused(f"RELP: the repository refused the session: {status.decode(errors='replace')[:200]}")
        offers = dict(line.partition(b"=")[::2] for line in offered.splitlines() if line)
        if b"relp_version" not in offers or b"syslog" not in offers.get(b"commands", b"").split(b","):
            raise RelpRefused(f"RELP: the repository does not offer the syslog command ({offered.decode(errors='replace')[:200]!r})")

    def _relp_syslog(self, messages: list[bytes]) -> None:
        """Each message a "syslog" command, ``RELP_WINDOW`` at a time; returns once the repository
        has answered 200 to every one (raises otherwise: the batch is sent again)."""
        assert self.sock is not None
        for first in range(0, len(messages), RELP_WINDOW):
            frames = [self._relp_frame(b"syslog", data) for data in messages[first:first + RELP_WINDOW]]
            self.sock.sendall(b"".join(frame for _, frame in frames))
            for txnr, _ in frames:
                answer = self._relp_answer(txnr)
                if not answer.startswith(b"200"):
                    raise RelpRefused(f"RELP: the repository did not take a message: {answer.decode(errors='replace')[:200]}")

    def _alive(self) -> bool:
        """Whether the kept stream is still open: a syslog receiver writes no data, so a readable
        stream has been closed, unless what came was only TLS records (a TLS 1.3 session ticket)."""
        assert self.sock is not None
        if not io_select.select([self.sock], [], [], 0)[0]:
            return True
        self.sock.setblocking(False)
        try:
            # b"": closed; over RELP, anything unasked is the repository's "serverclose" hint
            return bool(self.sock.recv(4096)) and not self.relp
        except (ssl.SSLWantReadError, BlockingIOError):
            return True  # TLS records only, no data
        except OSError:  # reset, or a TLS alert: gone
            return False
        finally:
            self.sock.settimeout(self.timeout)

    def close(self) -> None:
        """Ends the stream in order: over RELP the session's "close" first (its answer awaited
        briefly), then TLS's close_notify."""
        if self.relp and self.sock is not None:
            try:
                self.sock.settimeout(min(self.timeout, 2.0))
                txnr, frame = self._relp_frame(b"close")
                self.sock.sendall(frame)
                self._relp_answer(txnr)
            except OSError:
                pass
        self._drop()

    def _drop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()  # close_notify: the repository reads the end as orderly
        except (OSError, ValueError):
            pass
        sock.close()


def client_context(ca_file: str | None, certificate: str | None, private_key: str | None) -> ssl.SSLContext:
    """TLS towards the repository: its certificate checked against ``ca_file`` (or the system's
    CAs) and its host name; the node's own certificate presented when it has one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate and private_key:
        context.load_cert_chain(certificate, private_key)
    return context


def context_for(settings: Any) -> ssl.SSLContext | None:
    """The TLS context ``audit_syslog`` needs (None unless tls:// or relp+tls://), from the node's settings."""
    if not (settings.audit_syslog or "").startswith(SYSLOG_TLS_SCHEMES):
        return None
    paths = (settings.audit_syslog_ca_file, settings.audit_syslog_certificate, settings.audit_syslog_private_key)
    return client_context(*(str(path) if path else None for path in paths))


def start_position(sessions: sessionmaker[Session], destination: str) -> AuditExport:
    """The export's row, made on the first start with ``audit_syslog`` set: it begins after the
    rows already written (the history before is not sent)."""
    try:
        with sessions.begin() as session:
            if session.get(AuditExport, destination) is None:
                newest = session.scalar(select(func.coalesce(func.max(AuditEvent.id), 0)))
                session.add(AuditExport(destination=destination, last_id=int(newest or 0), sent=0, skipped=0))
    except IntegrityError:  # another node process sharing the database made it first: its row stands
        pass
    with sessions() as session:
        row = session.get(AuditExport, destination)
        assert row is not None
        session.expunge(row)
    return row


def rewind(sessions: sessionmaker[Session], destination: str, since: datetime) -> int:
    """Move the export's position back to just before the first row written at or after ``since``
    (UTC), so that the running node sends those rows again; audited. Returns the new position."""
    start_position(sessions, destination)
    with sessions.begin() as session:
        first = session.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.at >= since))
        newest = session.scalar(select(func.coalesce(func.max(AuditEvent.id), 0)))
        position = (first - 1) if first is not None else int(newest or 0)
        session.execute(update(AuditExport).where(AuditExport.destination == destination).values(last_id=position))
        session.add(audit.event("audit-export-rewound", "success", "mr2ct audit export", destination=destination,
                                since=since.isoformat(), position=position))
    return position


class Exporter:
    """Sends what the audit table gained since the last row sent; one process at a time holds it."""

    def __init__(self, sessions: sessionmaker[Session], transport: Transport, source: Source, holder: str) -> None:
        self.sessions, self.transport, self.source, self.holder = sessions, transport, source, holder
        self.destination = transport.url
        self.lock = threading.Lock()

    def _claim(self) -> bool:
        now = utcnow()
        with self.sessions.begin() as session:
            claimed = session.execute(
                update(AuditExport).where(AuditExport.destination == self.destination,
                                          (AuditExport.holder == self.holder) | AuditExport.lease_until.is_(None)
                                          | (AuditExport.lease_until < now))
                .values(holder=self.holder, lease_until=now + timedelta(seconds=LEASE_SECONDS))
            ).rowcount
        return bool(claimed)

    def _next_batch(self) -> tuple[int, int, list[bytes]] | None:
        """(last row id, rows skipped, messages) of the next batch after the position; None when
        the position is the newest row."""
        with self.sessions() as session:
            export = session.get(AuditExport, self.destination)
            assert export is not None
            rows = session.scalars(select(AuditEvent).where(AuditEvent.id > export.last_id).order_by(AuditEvent.id).limit(BATCH)).all()
            if not rows:
                return None
            messages, skipped = [], 0
            for row in rows:
                xml = message(row, self.source, subjects_of(session, row))
                if xml is None:
                    skipped += 1
                else:
                    messages.append(syslog_message(xml, self.source))
            return rows[-1].id, skipped, messages

    def _behind(self) -> bool:
        with self.sessions() as session:
            last_id = session.scalar(select(AuditExport.last_id).where(AuditExport.destination == self.destination))
            return session.scalar(select(AuditEvent.id).where(AuditEvent.id > (last_id or 0)).limit(1)) is not None

    def send_pending(self) -> int:
        """Send every row after the position, batch by batch; the number of messages sent. Raises
        what the transport raises (the position stays at the last batch sent whole)."""
        total = 0
        with self.lock:
            if not self._behind() or not self._claim():  # idle: a read, no write transaction every poll
                return 0
            while True:
                batch = self._next_batch()
                if batch is None:
                    return total
                last_id, skipped, messages = batch
                if messages:
                    self.transport.send(messages)
                with self.sessions.begin() as session:
                    session.execute(update(AuditExport).where(AuditExport.destination == self.destination).values(
                        last_id=last_id, sent=AuditExport.sent + len(messages), skipped=AuditExport.skipped + skipped,
                        last_sent_at=utcnow() if messages else AuditExport.last_sent_at, last_error=None,
                        lease_until=utcnow() + timedelta(seconds=LEASE_SECONDS)))
                total += len(messages)

    def note_error(self, exc: BaseException) -> None:
        with self.sessions.begin() as session:
            session.execute(update(AuditExport).where(AuditExport.destination == self.destination, AuditExport.holder == self.holder)
                            .values(last_error=f"{type(exc).__name__}: {exc}"[:500]))

    def release(self) -> None:
        self.transport.close()
        with self.sessions.begin() as session:
            session.execute(update(AuditExport).where(AuditExport.destination == self.destination, AuditExport.holder == self.holder)
                            .values(holder=None, lease_until=None))

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        pause = poll_seconds
        while not stop.is_set():
            try:
                self.send_pending()
                pause = poll_seconds
            except Exception as exc:  # the repository unreachable, a refused certificate: try again, skip nothing
                pause = min(max(pause * 2, 1.0), MAX_PAUSE_SECONDS)
                log.warning("audit export to %s failed, trying again in %.0f s: %s", self.destination, pause, exc)
                try:
                    self.note_error(exc)
                except Exception:  # the database itself: the next round says so again
                    log.exception("audit export: cannot record the error")
            stop.wait(pause)


def status(session: Session, destination: str | None) -> dict[str, Any]:
    """Where the export stands, for ``GET /audit/export``."""
    if destination is None:
        return {"destination": None}
    row = session.get(AuditExport, destination)
    newest = int(session.scalar(select(func.coalesce(func.max(AuditEvent.id), 0))) or 0)
    if row is None:
        return {"destination": destination, "started": False, "behind": None}
    return {"destination": destination, "started": True, "last_id": row.last_id, "behind": max(0, newest - row.last_id), "sent": row.sent,
            "skipped": row.skipped, "last_sent_at": row.last_sent_at.isoformat() if row.last_sent_at else None,
            "last_error": row.last_error, "holder": row.holder}


def wait_until_sent(sessions: sessionmaker[Session], destination: str, timeout: float) -> bool:
    """Whether the export caught up with the audit table within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            if status(session, destination).get("behind") == 0:
                return True
        time.sleep(0.1)
    return False
