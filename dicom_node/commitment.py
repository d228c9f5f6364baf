"""Storage commitment (Storage Commitment Push Model, PS3.4 J): a sender asks whether the node has
taken responsibility for instances it sent (an N-ACTION naming them under a transaction UID), and
the node answers by N-EVENT-REPORT, on an association it opens to the sender's address
(``commitment_peers``), as IHE RAD-10 and Orthanc expect: the instances it holds durably in its
spool (each one's row, and its file, of the SOP class asked), and those it does not with why.

A report that cannot be delivered (the sender down) is tried again with a growing pause, up to
``MAX_ATTEMPTS`` times (about a day), and stays in the database meanwhile, so a restart of the node
loses no answer owed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import Commitment, Instance, utcnow
from dicom_node.rounds import claim, failed_attempt, run_rounds
from dicom_node.settings import parse_dicom_destination
from dicom_node.transport import NodeAE
from synthesis.uids import is_valid_uid

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = str(StorageCommitmentPushModel)
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # Storage Commitment Push Model SOP Instance
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type ID of the report
MAX_ITEMS = 100_000
MAX_ATTEMPTS = 40
MAX_PAUSE_SECONDS = 3600.0
CLAIM_SECONDS = 300.0  # a report being sent is this process's for that long (its association's timeouts are 30 s)
# Failure Reasons (PS3.4 J.3.3.1.1.1)
NO_SUCH_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110
# N-ACTION statuses the node answers with
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_INVALID_ARGUMENT = 0x0115


class CommitmentRefused(Exception):
    """A request the node cannot take: its N-ACTION status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def peers(entries: list[str]) -> dict[str, tuple[str, int]]:
    """``commitment_peers`` as AE title -> (host, port)."""
    found = {}
    for entry in entries:
        ae, host, port = parse_dicom_destination(entry)
        found[ae] = (host, port)
    return found


def parse_request(action_type: int, information: Dataset | None) -> tuple[str, list[list[str]]]:
    """(transaction UID, [[SOP class, SOP instance], ...]) of an N-ACTION's Action Information;
    CommitmentRefused saying what is wrong."""
    if action_type != REQUEST_COMMITMENT:
        raise CommitmentRefused(STATUS_NO_SUCH_ACTION, f"Action Type ID {action_type} is not 1 (Request Storage Commitment)")
    if information is None:
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "no Action Information")
    transaction = str(information.get("TransactionUID", "") or "")
    if not is_valid_uid(transaction):
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "Transaction UID missing or not a UID")
    items = []
    for item in information.get("ReferencedSOPSequence", []) or []:
        pair = [str(item.get("ReferencedSOPClassUID", "") or ""), str(item.get("ReferencedSOPInstanceUID", "") or "")]
        if not all(is_valid_uid(uid) for uid in pair):
            raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "a Referenced SOP Sequence item without a valid class or instance UID")
        items.append(pair)
    if not items:
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, "Referenced SOP Sequence missing or empty")
    if len(items) > MAX_ITEMS:
        raise CommitmentRefused(STATUS_INVALID_ARGUMENT, f"{len(items)} instances in one request, more than {MAX_ITEMS}")
    return transaction, items


def record_request(sessions: sessionmaker[Session], calling_ae: str, transaction: str, items: list[list[str]]) -> int:
    with sessions.begin() as session:
        row = Commitment(transaction_uid=transaction, calling_ae=calling_ae, items=items, state="pending", attempts=0, next_at=utcnow())
        session.add(row)
        session.add(audit.event("storage-commitment-requested", "success", calling_ae, transaction_uid=transaction, instances=len(items)))
        session.flush()
        return row.id


def answer(session: Session, items: list[list[str]]) -> tuple[list[list[str]], list[tuple[str, str, int]]]:
    """(committed [[class, instance]], failed [(class, instance, reason)]): an instance is committed
    when the node holds it (its row, not purged, its file in the spool) under the class asked."""
    held: dict[str, tuple[str, str, bool]] = {}
    uids = [instance for _, instance in items]
    for start in range(0, len(uids), 500):
        for row in session.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path, Instance.purged_at)
                                   .where(Instance.sop_instance_uid.in_(uids[start:start + 500]))).all():
            held[row.sop_instance_uid] = (row.sop_class_uid, row.path, row.purged_at is None)
    committed, failed = [], []
    for sop_class, sop_instance in items:
        found = held.get(sop_instance)
        if found is None or not found[2] or not Path(found[1]).is_file():
            failed.append((sop_class, sop_instance, NO_SUCH_INSTANCE))
        elif found[0] != sop_class:
            failed.append((sop_class, sop_instance, CLASS_INSTANCE_CONFLICT))
        else:
            committed.append([sop_class, sop_instance])
    return committed, failed


def report_dataset(transaction: str, committed: list[list[str]], failed: list[tuple[str, str, int]], retrieve_ae: str) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    if committed:
        ds.RetrieveAETitle = retrieve_ae
        ds.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
    if failed:
        ds.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in failed]
    return ds


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def report_association(ae_title: str, peer: str, host: str, port: int, timeout: float = 30.0) -> Any:
    """An association with a requester's address on which the node may send its reports: Storage
    Commitment Push Model proposed with SCP/SCU role selection (the node, requesting, takes the SCP
    role). ConnectionError saying why not."""
    ae = NodeAE(ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(host, port, ae_title=peer, ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
    if not assoc.is_established:
        raise ConnectionError(f"no association with {peer}@{host}:{port} (rejected, aborted or not listening)")
    if not any(c.abstract_syntax == STORAGE_COMMITMENT and c.as_scp for c in assoc.accepted_contexts):
        assoc.release()
        raise ConnectionError(f"{peer}@{host}:{port} did not accept the node as Storage Commitment SCP (role selection)")
    return assoc


class Reporter:
    """Sends the reports owed, from the database: the request's row says what was asked and of whom."""

    def __init__(self, sessions: sessionmaker[Session], ae_title: str, peer_addresses: dict[str, tuple[str, int]],
                 tls: tuple[Any, str] | None = None, timeout: float = 30.0) -> None:
        self.sessions, self.ae_title, self.peers, self.timeout = sessions, ae_title, peer_addresses, timeout
        self.tls = tls
        self.wake = threading.Event()

    def _send(self, row: Commitment, ds: Dataset, event_type: int) -> None:
        assoc = report_association(self.ae_title, row.calling_ae, *self.peers[row.calling_ae], self.timeout)
        try:
            status, _ = assoc.send_n_event_report(ds, event_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code != 0x0000:
            raise ConnectionError(f"{row.calling_ae} answered the N-EVENT-REPORT with status "
                                  f"{'none' if code is None else f'0x{code:04X}'}")

    def report_due(self) -> int:
        """Send every report due now; the number sent."""
        sent = 0
        with self.sessions() as session:
            due = session.scalars(select(Commitment.id).where(Commitment.state == "pending", Commitment.next_at <= utcnow())
                                  .order_by(Commitment.id)).all()
        for commitment_id in due:
            if not claim(self.sessions, Commitment, commitment_id, CLAIM_SECONDS):  # of several node processes, one reports it
                continue
            with self.sessions() as session:
                row = session.get(Commitment, commitment_id)
                if row is None or row.state != "pending":
                    continue
                committed, failed = answer(session, row.items)
                session.expunge(row)
            try:
                if row.calling_ae not in self.peers:
                    raise ConnectionError(f"{row.calling_ae} is no longer in commitment_peers: no address to report to")
                self._send(row, report_dataset(row.transaction_uid, committed, failed, self.ae_title),
                           ALL_COMMITTED if not failed else SOME_FAILED)
            except Exception as exc:
                self._failed(row, exc)
                continue
            with self.sessions.begin() as session:
                session.execute(update(Commitment).where(Commitment.id == row.id).values(
                    state="reported", reported_at=utcnow(), committed=len(committed), attempts=row.attempts + 1, last_error=None))
                session.add(audit.event("storage-commitment-reported", "success" if not failed else "warning", f"mr2ct {self.ae_title}",
                                        transaction_uid=row.transaction_uid, to=row.calling_ae, committed=len(committed),
                                        failed=len(failed)))
            log.info("storage commitment reported transaction=%s to=%s committed=%d failed=%d", row.transaction_uid, row.calling_ae,
                     len(committed), len(failed))
            sent += 1
        return sent

    def _failed(self, row: Commitment, exc: BaseException) -> None:
        with self.sessions.begin() as session:
            attempts, pause, given_up = failed_attempt(session, Commitment, row, exc, MAX_ATTEMPTS, MAX_PAUSE_SECONDS)
            if given_up:
                session.add(audit.event("storage-commitment-given-up", "failure", f"mr2ct {self.ae_title}", transaction_uid=row.transaction_uid,
                                        to=row.calling_ae, attempts=attempts, reason=str(exc)[:400]))
        log.warning("storage commitment report to %s not delivered (attempt %d)%s: %s", row.calling_ae, attempts,
                    ", given up" if given_up else f", next in {pause:.0f} s", exc)

    def loop(self, stop: threading.Event, poll_seconds: float) -> None:
        run_rounds(self.report_due, stop, self.wake, poll_seconds, "storage commitment reports", "storage commitment reports")
