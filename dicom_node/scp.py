"""The C-STORE SCP: pynetdicom events bound to small handlers.

A C-STORE handler validates, hands the bytes as received to the ingest layer
(spool + database) and returns a status. It knows nothing of jobs or models.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import ssl
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.dataset import Dataset
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.commitment import STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE, CommitmentRefused, parse_request, record_request
from dicom_node.db import driver_message
from dicom_node.deferred import Journal, make_entry
from dicom_node.ingest import SUPPORTED_SOP_CLASSES, DatasetMismatch, Ingest, validate
from dicom_node.models import Association, utcnow
from dicom_node.spool import SpoolFull, file_meta_header
from dicom_node.transport import NodeAE, tune
from synthesis.errors import InvalidInstance
from synthesis.uids import is_valid_uid

log = logging.getLogger(__name__)

# How long an A-RELEASE waits for the rows of what its association spooled before it is answered:
# within a sender's ACSE timeout (dcmtk's default 30 s). The spool holds the instances and the rows
# follow once the database answers; until 2026-12-07 the wait was 120 s, and with the database
# away a sender's release failed (``Association Release Failed``) although every instance was kept.
RELEASE_FLUSH_SECONDS = 10.0

# Everything pydicom can decode with the pixel-data plugins installed (pylibjpeg, pyjpegls):
# the spool keeps each instance exactly as received; decoding happens when the series is synthesized.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
]

def supported_contexts(forward_only: frozenset[str] = frozenset()) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) the Storage SCP accepts: Verification, Storage Commitment
    Push Model, the MR storage classes and the SOP classes accepted only to be routed, in every
    syntax pydicom decodes here."""
    return [(str(Verification), [str(ts) for ts in DEFAULT_TRANSFER_SYNTAXES]),  # what add_supported_context gives by default
            (STORAGE_COMMITMENT, [str(ts) for ts in DEFAULT_TRANSFER_SYNTAXES]),  # requests answered (commitment_peers)
            *((str(c), [str(ts) for ts in TRANSFER_SYNTAXES]) for c in [*SUPPORTED_SOP_CLASSES, *sorted(forward_only)])]


STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_PROJECT = str(Path(__file__).resolve().parent.parent)
_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s?([0-9A-Fa-f]{4})\)")


def unexpected_reason(exc: BaseException) -> str:
    """An unexpected error while taking an instance, as a reason fit for a log line and an audit
    row: the exception type, where it was raised and the element it names, never its message
    (pydicom's messages can quote element values, patient names among them)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    ours = [f for f in frames if f.filename.startswith(_PROJECT) and ".venv" not in f.filename]
    if ours and ours[-1] is not frames[-1]:
        where += f" via {Path(ours[-1].filename).name}:{ours[-1].lineno}"
    tag = _TAG.search(str(exc))
    element = f", element ({tag.group(1).upper()},{tag.group(2).upper()})" if tag else ""
    if isinstance(exc, OSError) and exc.errno is not None:
        element += f", {errno.errorcode.get(exc.errno, exc.errno)}"
    return f"the instance could not be read or stored ({type(exc).__name__}{where}{element})"


def _series_of(event: evt.Event) -> str | None:
    """The series a refused instance belongs to, when its data set names one with a well-formed UID."""
    try:
        value = str(event.dataset.get("SeriesInstanceUID", "") or "")
    except Exception:  # a data set that cannot be read at all
        return None
    return value if is_valid_uid(value) else None


class HostCheckingAE(NodeAE):
    """An AE whose calling-AE allow-list can also restrict each title to a host.

    pynetdicom checks ``require_calling_aet`` while negotiating, in the
    association's own thread; the list returned here depends on the address
    of the peer of that thread's association.
    """

    def __init__(self, ae_title: str, allowed: list[tuple[str, str | None]]) -> None:
        super().__init__(ae_title=ae_title)
        self.allowed = allowed

    def titles_for(self, address: str | None) -> list[str]:
        return [title for title, host in self.allowed if host is None or host == address]

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if not self.allowed:
            return []
        assoc = threading.current_thread()
        address = getattr(getattr(assoc, "requestor", None), "address", None)
        return self.titles_for(address) or ["\\no title from this host"]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:  # pynetdicom's __init__ sets it
        pass


def parse_allowed(entries: list[str]) -> list[tuple[str, str | None]]:
    """``AE`` or ``AE@host``; host names are resolved to addresses once, at start."""
    allowed: list[tuple[str, str | None]] = []
    for entry in entries:
        title, _, host = entry.partition("@")
        address = socket.gethostbyname(host) if host else None
        allowed.append((title, address))
    return allowed


class StoreSCP:
    def __init__(
        self, ae_title: str, allowed_aes: list[str], ingest: Ingest, sessions: sessionmaker[Session],
        max_associations: int = 16, on_released: Callable[[set[str]], None] | None = None,
        forward_only: frozenset[str] = frozenset(), poll_seconds: float = 0.0002, check_called_ae: bool = False,
        commitment_peers: frozenset[str] = frozenset(), on_commitment: Callable[[], None] | None = None,
        reports_from: str | None = None, max_refusals: int = 0, journal: Journal | None = None,
    ) -> None:
        # what the handlers write beside the instances (refusals, associations, their audit rows):
        # kept there while the database is away, written once it answers (its loop: the service's thread)
        self.journal = journal or Journal(ingest.spool.root, sessions)
        self.journal.rows_first = ingest.flush  # an association's instances recorded before its row links them
        self.reports_from = reports_from  # forward_commitment: the routing destination's AE title, whose reports are taken
        self.max_refusals = max_refusals  # forward_max_refusals: commitment failures of one original before it is given up
        self.commitment_peers = commitment_peers  # AE titles whose storage commitment requests are answered
        self.on_commitment = on_commitment
        self.ae_title = ae_title
        self.poll_seconds = poll_seconds
        self.ingest = ingest
        self.sessions = sessions
        self.on_released = on_released
        self.ae = HostCheckingAE(ae_title, parse_allowed(allowed_aes))
        self.ae.maximum_associations = max_associations
        self.ae.require_called_aet = check_called_ae  # pynetdicom rejects: permanent, "called AE title not recognised"
        self.ae.maximum_pdu_size = 0  # no limit on what we receive
        self.forward_only = forward_only
        for sop_class, syntaxes in supported_contexts(forward_only):
            if sop_class == STORAGE_COMMITMENT and reports_from:  # the destination may send its reports as SCP (role selection)
                self.ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
            else:
                self.ae.add_supported_context(sop_class, syntaxes)
        self._associations: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    # -- association bookkeeping -------------------------------------------------
    def _on_connection(self, event: evt.Event) -> None:
        tune(event.assoc, self.poll_seconds)  # TCP_NODELAY, and the reader's idle poll (dicom_poll_ms)

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        assoc_id: int | None = None
        try:
            with self.sessions.begin() as session:
                row = Association(
                    calling_ae=requestor.ae_title, called_ae=self.ae_title, peer_address=f"{requestor.address}:{requestor.port}",
                )
                session.add(row)
                session.flush()
                assoc_id = row.id
        except SQLAlchemyError as exc:  # the database away: the association goes on, its instances spooled (their rows follow)
            log.warning("association not recorded at its start calling_ae=%s peer=%s (its row is written with its end): %s",
                        requestor.ae_title, requestor.address, driver_message(exc))
        with self._lock:
            self._associations[id(event.assoc)] = {"id": assoc_id, "stored": 0, "refused": 0, "series": set(), "started_at": utcnow()}
        log.info("association accepted assoc=%s calling_ae=%s peer=%s", assoc_id if assoc_id is not None else "-", requestor.ae_title,
                 requestor.address)

    def _on_pdu_received(self, event: evt.Event) -> None:
        """An A-RELEASE-RQ: commit the rows of everything spooled so far before the DUL thread (this
        thread) can send the release response, so a released sender finds its instances recorded."""
        if isinstance(event.pdu, A_RELEASE_RQ):
            recorded = self.ingest.flush(RELEASE_FLUSH_SECONDS)
            with self._lock:
                state = self._associations.get(id(event.assoc))
                if state is not None:
                    state["recorded"] = recorded  # nothing more can arrive on it: what its release reads

    def _on_end(self, event: evt.Event, outcome: str) -> None:
        with self._lock:
            state = self._associations.pop(id(event.assoc), None)
        if state is None:
            return
        # Released: the rows were flushed before the release was answered; asking again held the
        # association's thread (one of max_associations) another RELEASE_FLUSH_SECONDS during a
        # database outage, until 2026-12-07. Aborted: no A-RELEASE-RQ came, so the wait is here.
        recorded = state["recorded"] if "recorded" in state else self.ingest.flush(RELEASE_FLUSH_SECONDS)
        requestor = event.assoc.requestor
        shown = state["id"] if state["id"] is not None else "-"
        ended = make_entry(audit.ASSOCIATION, "success" if outcome == "released" else "warning", f"{requestor.ae_title}@{requestor.address}",
                      association_outcome=outcome, instances_stored=state["stored"], instances_refused=state["refused"],
                      series=sorted(state["series"]))
        ended["association"] = self._association_fields(state, event) | {"outcome": outcome, "stored": state["stored"],
                                                                          "refused": state["refused"]}
        if state.get("unlinked"):
            ended["association"]["instances"] = state["unlinked"]
        self.journal.record(ended, f"association {outcome} assoc={shown}", rows_recorded=recorded)
        log.info("association %s assoc=%s stored=%d refused=%d", outcome, shown, state["stored"], state["refused"])
        if outcome == "released" and self.on_released is not None and state["series"]:
            if not recorded or self.journal.pending_series() & state["series"]:
                # completed now, a series would be judged (and synthesized) without the rows still to come (an
                # instance's, or the refusal the series waits for)
                log.warning("series of assoc=%s not completed at its release: their rows are not all recorded yet (the stability "
                            "monitor completes them once they are and have been quiet)", shown)
                return
            try:
                self.on_released(set(state["series"]))
            except SQLAlchemyError as exc:  # its series complete once they have been quiet (the stability monitor)
                log.warning("series of assoc=%s not completed at its release: %s", shown, driver_message(exc))

    def _association_fields(self, state: dict[str, Any], event: evt.Event) -> dict[str, Any]:
        """What a journal entry needs to find or insert an association's row (``deferred.apply_entry``)."""
        requestor = event.assoc.requestor
        return {"id": state["id"], "calling_ae": requestor.ae_title, "called_ae": self.ae_title,
                "peer_address": f"{requestor.address}:{requestor.port}", "started_at": state.get("started_at", utcnow()).isoformat()}

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
        if self.ae.require_called_aet and called != self.ae_title:
            # a sender set up for another node (check_called_ae): the title it called is no secret
            reason, action = f"called AE title {called[:16]!r} is not this node's ({self.ae_title})", audit.ASSOCIATION
        elif self.ae.allowed and requestor.ae_title not in self.ae.titles_for(requestor.address):
            reason, action = "calling AE title not allowed from this host", audit.SECURITY_ALERT
        else:
            reason, action = "too many concurrent associations", audit.ASSOCIATION
        log.warning("association rejected calling_ae=%s peer=%s reason=%s", requestor.ae_title, requestor.address, reason)
        self.journal.record(make_entry(action, "failure", f"{requestor.ae_title}@{requestor.address}", reason=reason, called_ae=self.ae_title),
                            "association rejection")

    # -- DIMSE handlers ----------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_n_action(self, event: evt.Event) -> tuple[int | Dataset, None]:
        """A storage commitment request: recorded, answered later by N-EVENT-REPORT (dicom_node.commitment)."""
        request, requestor = event.request, event.assoc.requestor
        actor = f"{requestor.ae_title}@{requestor.address}"
        try:
            if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT:
                raise CommitmentRefused(0x0118, "N-ACTION is answered only for Storage Commitment Push Model")  # no such SOP class
            if str(request.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
                raise CommitmentRefused(0x0112, f"the Requested SOP Instance is not {WELL_KNOWN_INSTANCE}")  # no such SOP instance
            transaction, items = parse_request(int(request.ActionTypeID or 0), event.action_information)
            if requestor.ae_title not in self.commitment_peers:
                raise CommitmentRefused(0x0110, f"{requestor.ae_title} is not in commitment_peers: no address to send the report to")
        except CommitmentRefused as exc:
            log.warning("storage commitment refused calling_ae=%s status=0x%04X reason=%s", requestor.ae_title, exc.status, exc)
            self.journal.record(make_entry("storage-commitment-requested", "failure", actor, status=f"0x{exc.status:04X}", reason=str(exc)[:500]),
                                "storage commitment refusal")
            status = Dataset()
            status.Status, status.ErrorComment = exc.status, str(exc)[:64]
            return status, None
        try:
            record_request(self.sessions, requestor.ae_title, transaction, items)
        except SQLAlchemyError as exc:  # not taken on: the requester hears a failure and may ask again (was a handler's traceback)
            log.error("storage commitment request not recorded calling_ae=%s: %s", requestor.ae_title, driver_message(exc))
            status = Dataset()
            status.Status, status.ErrorComment = 0x0110, "request not recorded: the node's database is away; ask again"[:64]
            return status, None
        log.info("storage commitment requested calling_ae=%s transaction=%s instances=%d", requestor.ae_title, transaction, len(items))
        if self.on_commitment is not None:
            self.on_commitment()
        return STATUS_SUCCESS, None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            state = self._associations.get(id(event.assoc), {"id": None, "stored": 0, "refused": 0, "series": set()})
        request = event.request
        calling_ae = event.assoc.requestor.ae_title
        try:
            sop_class = str(request.AffectedSOPClassUID)
            sop_uid = str(request.AffectedSOPInstanceUID)
            transfer_syntax = event.context.transfer_syntax
            info = validate(event.dataset, sop_class, sop_uid, self.forward_only, transfer_syntax)
            # The bytes exactly as received, behind a file meta header (what event.encoded_dataset()
            # gives, without building and encoding a pydicom file meta data set each time).
            data = [file_meta_header(sop_class, sop_uid, transfer_syntax), event.encoded_dataset(include_meta=False)]
            self.ingest.store(info, data, str(transfer_syntax), calling_ae, state["id"])
        except SpoolFull as exc:
            return self._refuse(state, calling_ae, STATUS_OUT_OF_RESOURCES, str(exc), event)
        except DatasetMismatch as exc:
            return self._refuse(state, calling_ae, STATUS_DATASET_MISMATCH, str(exc), event)
        except InvalidInstance as exc:
            return self._refuse(state, calling_ae, STATUS_CANNOT_UNDERSTAND, str(exc), event)
        except Exception as exc:  # a data set pydicom cannot parse, a disk error: refuse, keep serving
            return self._refuse(state, calling_ae, STATUS_CANNOT_UNDERSTAND, unexpected_reason(exc), event)
        with self._lock:
            state["stored"] += 1
            state["series"].add(info.series_uid)
            if state["id"] is None:  # its row not written (the database away): the instances it links once it is
                state.setdefault("unlinked", []).append(info.sop_instance_uid)
        return STATUS_SUCCESS

    def _refuse(self, state: dict[str, Any], calling_ae: str, status: int, reason: str, event: evt.Event) -> int:
        with self._lock:
            state["refused"] += 1
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")[:64]
        series_uid = _series_of(event)
        log.warning("C-STORE refused status=0x%04X assoc=%s reason=%s", status, state["id"], reason)
        refused = make_entry(audit.INSTANCE_REFUSED, "failure", calling_ae, series_uid=series_uid, association_id=state["id"],
                        status=f"0x{status:04X}", reason=reason[:500], sop_instance_uid=sop_uid)
        if series_uid is not None and is_valid_uid(sop_uid):  # the series waits for it
            refused["refusal"] = {"sop_uid": sop_uid, "series_uid": series_uid, "status": status, "reason": reason}
        if state["id"] is None and "started_at" in state:  # its row not written yet: this entry finds or inserts it
            refused["association"] = self._association_fields(state, event)
        # the database away: kept, and the sender hears the refusal's own status, not a handler's failure
        self.journal.record(refused, f"C-STORE refusal assoc={state['id']}")
        return status

    # -- lifecycle -----------------------------------------------------------------
    def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, lambda e: self._on_end(e, "released")),
            (evt.EVT_ABORTED, lambda e: self._on_end(e, "aborted")),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_PDU_RECV, self._on_pdu_received),
        ]
        if self.reports_from:
            from dicom_node.forward_commitment import on_report

            handlers.append((evt.EVT_N_EVENT_REPORT, lambda event: on_report(self.sessions, str(self.reports_from), event, self.max_refusals)))
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
        log.info("SCP listening ae_title=%s address=%s:%d tls=%s", self.ae_title, host, port, "on" if ssl_context else "off")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
