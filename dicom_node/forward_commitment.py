"""Storage commitment asked of the routing destination (``forward_commitment``; PS3.4 J, IHE
RAD-10, the node as Storage Commitment SCU): C-STORE success says an instance was received, not
that the archive has it safe. With this on, the node asks ``forward_to`` by N-ACTION, for the
originals it routed there, whether it takes responsibility for them, and spool retention deletes
an original only once the destination's N-EVENT-REPORT committed it.

- A request names up to ``BATCH`` routed originals under a Transaction UID of the node's root; the
  originals are claimed for it in the database (``Instance.forward_commitment_id``), so two node
  processes sharing one never ask twice for one instance.
- The report may come on any association (on the request's own, as some archives do, which the
  node holds open after the N-ACTION's answer for up to ``forward_commitment_linger_seconds`` or
  until the transaction's report came by either way; on one the destination opens to the node's
  SCP with SCP/SCU role selection, as Orthanc does): each
  instance it commits gets ``forward_committed_at``; each it reports failed is routed again (after
  the forwarder's growing pause) and asked for again once routed.
- A request the destination does not answer within ``forward_commitment_wait_seconds`` expires:
  its originals are asked for again in a new request (and a report that comes late still counts).
- A request that cannot be sent (destination down, the N-ACTION refused) is given back at once:
  its originals are asked for again after a growing pause.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from datetime import timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import and_, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.db import PassErrors, driver_message
from dicom_node.commitment import ALL_COMMITTED, REQUEST_COMMITMENT, SOME_FAILED, WELL_KNOWN_INSTANCE, CommitmentRefused
from dicom_node.forwarder import backoff_seconds
from dicom_node.models import ForwardCommitment, Instance, utcnow
from dicom_node.settings import parse_dicom_destination
from dicom_node.transport import NodeAE, tune
from synthesis.uids import is_valid_uid

log = logging.getLogger(__name__)

BATCH = 1000  # originals one request names
REQUESTED = "requested"
FORWARD_COMMITMENT_REQUESTED = "forward-commitment-requested"
FORWARD_COMMITMENT_REPORTED = "forward-commitment-reported"
FORWARD_COMMITMENT_EXPIRED = "forward-commitment-expired"
# N-EVENT-REPORT statuses the node answers a report with (PS3.7 10.1.1.1.8)
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT = 0x0115


def _uncommitted() -> Any:
    """Routed originals not committed yet and not named by a request that waits for its report."""
    return and_(Instance.forwarded_at.is_not(None), Instance.forward_committed_at.is_(None), Instance.forward_commitment_id.is_(None),
                Instance.purged_at.is_(None))


def parse_report(event_type: int, information: Dataset | None) -> tuple[str, list[str], list[tuple[str, int]]]:
    """(transaction UID, committed instance UIDs, [(failed instance UID, failure reason)]) of a
    storage commitment N-EVENT-REPORT; CommitmentRefused with its status when it is malformed."""
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        raise CommitmentRefused(STATUS_NO_SUCH_EVENT_TYPE, f"Event Type ID {event_type} is not 1 or 2 (a storage commitment result)")
    if information is None:
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "no Event Information")
    transaction = str(information.get("TransactionUID", "") or "")
    if not is_valid_uid(transaction):
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "Transaction UID missing or not a UID")
    committed, failed = [], []
    for item in information.get("ReferencedSOPSequence", []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not is_valid_uid(uid):
            raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "a Referenced SOP Sequence item without a valid instance UID")
        committed.append(uid)
    for item in information.get("FailedSOPSequence", []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not is_valid_uid(uid):
            raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "a Failed SOP Sequence item without a valid instance UID")
        failed.append((uid, int(item.get("FailureReason", 0) or 0)))
    return transaction, committed, failed


def apply_report(sessions: sessionmaker[Session], calling_ae: str, transaction: str, committed: list[str],
                 failed: list[tuple[str, int]], max_refusals: int = 0) -> dict[str, int]:
    """Record a report: the request's instances it commits, committed; those it reports failed,
    routed again (a failure counts as a refusal: after ``max_refusals`` of them, 0 none, the
    original is given up as one the destination refuses to store is); those of the request it
    names neither way, asked for again. Instances it names that the request did not are ignored
    (counted). CommitmentRefused for an unknown transaction."""
    now = utcnow()
    with sessions.begin() as session:
        row = session.scalar(select(ForwardCommitment).where(ForwardCommitment.transaction_uid == transaction).with_for_update())
        if row is None:
            raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "no storage commitment request of this node has this Transaction UID")
        ours = set(session.scalars(select(Instance.sop_instance_uid).where(
            Instance.forward_commitment_id == row.id, Instance.forward_committed_at.is_(None))).all())
        late = row.state != REQUESTED  # expired: its instances may be named by a newer request since
        if late:  # a late report still commits what it names, if routed and not committed since
            named = [uid for uid in committed] + [uid for uid, _ in failed]
            for start in range(0, len(named), 500):
                ours |= set(session.scalars(select(Instance.sop_instance_uid).where(
                    Instance.sop_instance_uid.in_(named[start:start + 500]), Instance.forwarded_at.is_not(None),
                    Instance.forward_committed_at.is_(None))).all())
        done = [uid for uid in committed if uid in ours]
        lost = [(uid, reason) for uid, reason in failed if uid in ours.difference(done)]
        # named committed and committed already (a late report of an older request said so first): committed for this one too
        already = 0
        if not late:
            rest = [uid for uid in committed if uid not in ours]
            for start in range(0, len(rest), 500):
                already += session.scalar(select(func.count()).select_from(Instance).where(
                    Instance.sop_instance_uid.in_(rest[start:start + 500]), Instance.forward_committed_at.is_not(None))) or 0
        for start in range(0, len(done), 500):
            session.execute(update(Instance).where(Instance.sop_instance_uid.in_(done[start:start + 500])).values(
                forward_committed_at=now, forward_commitment_id=row.id))
        given_up = []
        for uid, reason in lost:  # the destination does not have it: routed again, after the forwarder's pause
            attempts, refusals = session.execute(select(Instance.forward_attempts, Instance.forward_refusals)
                                                 .where(Instance.sop_instance_uid == uid)).one()
            refusals = (refusals or 0) + 1
            error = f"the destination reported it not committed (storage commitment failure reason 0x{reason:04X})"
            if 0 < max_refusals <= refusals:
                given_up.append(uid)
                error += f" (refused {refusals} times: given up; POST /routing/retry asks again)"
            session.execute(update(Instance).where(Instance.sop_instance_uid == uid).values(
                forwarded_at=None, forward_commitment_id=None, forward_refusals=refusals, forward_error=error,
                forward_next_at=None if uid in given_up else now + timedelta(seconds=backoff_seconds(attempts or 0))))
            if uid in given_up:
                session.add(audit.event(audit.ROUTING_GIVEN_UP, "failure", calling_ae, destination=row.destination, sop_instance_uid=uid,
                                        refusals=refusals, reason=error))
        # the request's instances the report named neither way: asked for again
        session.execute(update(Instance).where(Instance.forward_commitment_id == row.id, Instance.forward_committed_at.is_(None))
                        .values(forward_commitment_id=None))
        if not late:
            row.state = "committed" if not lost and len(done) + already >= row.instances else "partial"
            row.reported_at, row.committed, row.failed = now, len(done) + already, len(lost)
        counts = {"committed": len(done), "failed": len(lost), "already_committed": already,
                  "not_asked": len(committed) + len(failed) - len(done) - len(lost) - already}
        session.add(audit.event(FORWARD_COMMITMENT_REPORTED, "success" if not lost else "warning", calling_ae,
                                transaction_uid=transaction, destination=row.destination, late=late, **counts,
                                failure_reasons=sorted({f"0x{reason:04X}" for _, reason in lost})))
    log.info("storage commitment report from destination transaction=%s committed=%d failed=%d%s", transaction, counts["committed"],
             counts["failed"], " (after its request expired)" if late else "")
    return counts


def on_report(sessions: sessionmaker[Session], destination_ae: str, event: evt.Event, max_refusals: int = 0) -> tuple[int, None]:
    """An N-EVENT-REPORT handler (the node's SCP, and the request's own association): only the
    destination's reports of Storage Commitment Push Model are taken."""
    request, requestor = event.request, event.assoc.requestor
    sender = requestor.ae_title if event.assoc.is_acceptor else destination_ae
    try:
        if str(request.AffectedSOPClassUID) != str(StorageCommitmentPushModel):
            raise CommitmentRefused(0x0118, "N-EVENT-REPORT is taken only for Storage Commitment Push Model")
        if str(request.AffectedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
            raise CommitmentRefused(0x0112, f"the Affected SOP Instance is not {WELL_KNOWN_INSTANCE}")
        if sender != destination_ae:
            raise CommitmentRefused(0x0110, f"{sender} is not the routing destination ({destination_ae}): no request was sent to it")
        transaction, committed, failed = parse_report(int(request.EventTypeID or 0), event.event_information)
        apply_report(sessions, sender, transaction, committed, failed, max_refusals)
    except CommitmentRefused as exc:
        log.warning("storage commitment report refused calling_ae=%s status=0x%04X reason=%s", sender, exc.status, exc)
        try:
            audit.record(sessions, FORWARD_COMMITMENT_REPORTED, "failure", sender, status=f"0x{exc.status:04X}", reason=str(exc)[:500])
        except SQLAlchemyError as db_exc:
            log.error("storage commitment report refusal not audited calling_ae=%s: %s", sender, driver_message(db_exc))
        return exc.status, None
    except SQLAlchemyError as exc:  # the database away: a processing failure (the destination may send it again; unanswered,
        # the request expires and its instances are asked for again). Until 2026-12-07 a handler's traceback.
        log.error("storage commitment report not recorded calling_ae=%s: %s", sender, driver_message(exc))
        return 0x0110, None
    return 0x0000, None


class Committer:
    """Asks the destination for storage commitment of what was routed there, and expires requests
    it never answered; runs beside the forwarder."""

    def __init__(self, sessions: sessionmaker[Session], forward_to: str, calling_ae: str, uid_root: str, wait_seconds: float,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0, poll_seconds: float = 0.0002, max_refusals: int = 0,
                 linger_seconds: float = 0.0, stopping: threading.Event | None = None) -> None:
        self.sessions, self.calling_ae, self.uid_root, self.max_refusals = sessions, calling_ae, uid_root, max_refusals
        self.linger = min(linger_seconds, wait_seconds)  # the request's association held open for a report on it
        self.called_ae, self.host, self.port = parse_dicom_destination(forward_to)
        self.name = f"dicom{'s' if ssl_context else ''}://{self.called_ae}@{self.host}:{self.port}"
        self.wait, self.ssl_context, self.timeout, self.poll_seconds = timedelta(seconds=wait_seconds), ssl_context, timeout, poll_seconds
        self.failures = 0  # requests in a row that did not go: the pause before the next grows
        self.next_try = 0.0  # monotonic
        self.stopping = stopping or threading.Event()  # set when the node stops: no lingering for a report

    def expire(self) -> int:
        """Requests unanswered for ``wait``: expired, their instances to be asked for again."""
        cutoff = utcnow() - self.wait
        expired = []
        with self.sessions.begin() as session:
            stale = session.scalars(select(ForwardCommitment).where(ForwardCommitment.state == REQUESTED,
                                                                    ForwardCommitment.requested_at < cutoff)).all()
            for row in stale:  # taken by one process of several sharing the database (the state checked again as it changes)
                if not session.execute(update(ForwardCommitment).where(ForwardCommitment.id == row.id, ForwardCommitment.state == REQUESTED)
                                       .values(state="expired", last_error=f"no report within {self.wait.total_seconds():g} s: asked again")
                                       ).rowcount:
                    continue
                expired.append(row)
                session.execute(update(Instance).where(Instance.forward_commitment_id == row.id, Instance.forward_committed_at.is_(None))
                                .values(forward_commitment_id=None))
                session.add(audit.event(FORWARD_COMMITMENT_EXPIRED, "warning", f"mr2ct {self.calling_ae}", transaction_uid=row.transaction_uid,
                                        destination=row.destination, instances=row.instances))
        for row in expired:
            log.warning("storage commitment request to %s unanswered for %g s: expired, asked again transaction=%s", self.name,
                        self.wait.total_seconds(), row.transaction_uid)
        return len(expired)

    def _claim(self) -> tuple[int, str, list[tuple[str, str]]] | None:
        """A new request's row, its Transaction UID and its (class, instance) pairs, claimed."""
        transaction = generate_uid(prefix=self.uid_root)
        with self.sessions.begin() as session:
            pairs = session.execute(select(Instance.sop_class_uid, Instance.sop_instance_uid).where(_uncommitted())
                                    .order_by(Instance.forwarded_at).limit(BATCH)).all()
            if not pairs:
                return None
            row = ForwardCommitment(transaction_uid=transaction, destination=self.name, instances=0, state=REQUESTED)
            session.add(row)
            session.flush()
            claimed = 0
            uids = [p.sop_instance_uid for p in pairs]
            for start in range(0, len(uids), 500):  # another process may have claimed some meanwhile
                claimed += session.execute(update(Instance).where(Instance.sop_instance_uid.in_(uids[start:start + 500]), _uncommitted())
                                           .values(forward_commitment_id=row.id)).rowcount
            ours = session.execute(select(Instance.sop_class_uid, Instance.sop_instance_uid)
                                   .where(Instance.forward_commitment_id == row.id)).all()
            if not ours:  # all taken by another process meanwhile
                session.delete(row)
                return None
            row.instances = len(ours)
            return row.id, transaction, [(p.sop_class_uid, p.sop_instance_uid) for p in ours]

    def _send(self, transaction: str, pairs: list[tuple[str, str]]) -> None:
        """The N-ACTION; a report sent back on the same association is taken too. ConnectionError saying why it did not go."""
        ae = NodeAE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        ae.add_requested_context(StorageCommitmentPushModel)
        tls = (self.ssl_context, self.host) if self.ssl_context is not None else None
        reported = threading.Event()  # this request's report came on its association

        def on_own_report(event: evt.Event) -> tuple[int, None]:
            answer = on_report(self.sessions, self.called_ae, event, self.max_refusals)
            if str(getattr(event.event_information, "TransactionUID", "")) == transaction:
                reported.set()
            return answer

        handlers = [(evt.EVT_CONN_OPEN, lambda event: tune(event.assoc, self.poll_seconds)), (evt.EVT_N_EVENT_REPORT, on_own_report)]
        try:
            assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls, evt_handlers=handlers)
        except OSError as exc:
            raise ConnectionError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        if not assoc.is_established:
            raise ConnectionError(f"{self.name} did not accept an association for storage commitment (down, or {self.calling_ae} not allowed)")
        try:
            information = Dataset()
            information.TransactionUID = transaction
            information.ReferencedSOPSequence = []
            for sop_class, sop_instance in pairs:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
                information.ReferencedSOPSequence.append(item)
            status, _ = assoc.send_n_action(information, REQUEST_COMMITMENT, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
            if getattr(status, "Status", None) == 0x0000:
                self._linger(assoc, transaction, reported)
        except ValueError as exc:  # pynetdicom: no accepted context for the SOP class
            raise ConnectionError(f"{self.name} does not accept Storage Commitment Push Model from {self.calling_ae}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise ConnectionError(f"{self.name} answered the N-ACTION with status {'none' if code is None else f'0x{code:04X}'}")

    def _linger(self, assoc: Any, transaction: str, reported: threading.Event) -> None:
        """Hold the request's association open for ``linger`` seconds, for an archive that reports on
        it (some do, and only so); over as soon as a report came on it, the transaction was reported
        on another association (Orthanc's way: its row is no longer ``requested``), the
        destination released it, or the node stops."""
        deadline = time.monotonic() + self.linger
        while time.monotonic() < deadline and assoc.is_established and not self.stopping.is_set():
            if reported.wait(min(0.25, max(deadline - time.monotonic(), 0.0))):
                log.info("storage commitment reported on the request's association by %s transaction=%s", self.name, transaction)
                return
            with self.sessions() as session:
                if session.scalar(select(ForwardCommitment.state).where(ForwardCommitment.transaction_uid == transaction)) != REQUESTED:
                    return

    def request_due(self) -> int:
        """Expire what waited too long, then ask for every routed original not asked for yet, in
        batches; the number of requests sent."""
        self.expire()
        sent = 0
        while time.monotonic() >= self.next_try:
            claimed = self._claim()
            if claimed is None:
                break
            row_id, transaction, pairs = claimed
            try:
                self._send(transaction, pairs)
            except ConnectionError as exc:
                self.failures += 1
                pause = backoff_seconds(self.failures)
                self.next_try = time.monotonic() + pause
                with self.sessions.begin() as session:
                    session.execute(update(ForwardCommitment).where(ForwardCommitment.id == row_id).values(
                        state="refused", last_error=str(exc)[:500]))
                    session.execute(update(Instance).where(Instance.forward_commitment_id == row_id, Instance.forward_committed_at.is_(None))
                                    .values(forward_commitment_id=None))
                log.warning("storage commitment request to %s did not go (next in %.0f s): %s", self.name, pause, exc)
                break
            self.failures = 0
            sent += 1
            audit.record(self.sessions, FORWARD_COMMITMENT_REQUESTED, "success", f"mr2ct {self.calling_ae}", transaction_uid=transaction,
                         destination=self.name, instances=len(pairs))
            log.info("storage commitment asked of %s transaction=%s instances=%d", self.name, transaction, len(pairs))
        return sent

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        errors = PassErrors(log, "storage commitment requests", "storage commitment requests to the routing destination")
        while not stop.wait(max(poll_seconds, 1.0)):
            errors.attempt(self.request_due)  # the database away: try again next round


def status(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """GET /routing's ``commitment``: routed originals committed by the destination, awaiting its
    report, not asked yet; the requests by state."""
    with sessions() as session:
        routed = Instance.forwarded_at.is_not(None)
        committed = session.scalar(select(func.count()).select_from(Instance).where(routed, Instance.forward_committed_at.is_not(None)))
        awaiting = session.scalar(select(func.count()).select_from(Instance).where(
            routed, Instance.forward_committed_at.is_(None), Instance.forward_commitment_id.is_not(None)))
        not_asked = session.scalar(select(func.count()).select_from(Instance).where(_uncommitted()))
        requests = dict(session.execute(select(ForwardCommitment.state, func.count()).group_by(ForwardCommitment.state)).all())
        last = session.scalar(select(ForwardCommitment).where(ForwardCommitment.last_error.is_not(None))
                              .order_by(ForwardCommitment.id.desc()).limit(1))
    return {"committed": committed, "awaiting_report": awaiting, "not_asked": not_asked, "requests": requests,
            "last_error": last.last_error if last is not None else None}
