"""Routing: every received original is also stored at a destination — Orthanc over REST, or any
DICOM AE by C-STORE (``forward_to = "AE@host:port"``) — retried with backoff until it lands."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless, UID)
from orthanc_api_client.exceptions import HttpError
from pynetdicom import evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.db import PassErrors
from dicom_node.models import Instance, utcnow
from dicom_node.outcomes import mark_due_unwritten
from dicom_node.orthanc_store import ROUTED_BY_NODE, ROUTED_FLAG, OrthancStore
from dicom_node.settings import parse_dicom_destination
from dicom_node.transport import NodeAE, tune

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)
UNCOMPRESSED_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_UNCOMPRESSED = frozenset(UNCOMPRESSED_LITTLE_ENDIAN)


def _can_encode(syntax: UID) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(syntax).is_available)
    except Exception:  # no encoder in this pydicom at all
        return False


# Lossless syntaxes pydicom encodes with this node's plugins (pyjpegls, pylibjpeg-openjpeg,
# pydicom's own RLE), in the node's order of preference: offered to a destination that keeps only
# compressed data, so that an instance it takes neither as received nor uncompressed can still go,
# re-encoded without loss. Never a lossy syntax: routing must not lose what the scanner sent.
LOSSLESS_REENCODE = tuple(ts for ts in (JPEGLSLossless, JPEG2000Lossless, RLELossless) if _can_encode(ts))
# Contexts a pass may propose per (SOP class, syntax) of its instances: its own, a plain little
# endian twin for compressed data, and one for each lossless syntax encoded here (one context
# each, so that the peer accepts every one it keeps: an encoder that cannot take an instance's
# pixels then leaves another).
CONTEXTS_PER_KIND = 2 + len(LOSSLESS_REENCODE)
# Kinds one pass takes: their contexts and the Verification context fit in one association.
KINDS_PER_PASS = (MAX_CONTEXTS - 1) // CONTEXTS_PER_KIND


def _reencode_names() -> str:
    return ", ".join(ts.name for ts in LOSSLESS_REENCODE) or "none: no encoder installed"


# C-STORE statuses that mean the instance was stored: success and the three warnings.
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}

Send = Callable[[Path, str, str], None]  # (file, SOP class, transfer syntax); raises RoutingDown or InstanceNotTaken


class RoutingDown(Exception):
    """The destination cannot be reached: stop this pass and back off."""


class InstanceNotTaken(Exception):
    """The destination refused this one instance: back off for it, go on with the others."""


class Destination(Protocol):
    name: str
    holds_notes: bool  # the Orthanc the series' notes go to (dicom_node.outcomes)

    def session(self, contexts: set[tuple[str, str]]) -> AbstractContextManager[Send]: ...


def backoff_seconds(attempts: int) -> float:
    """1, 2, 4, ... seconds, at most five minutes."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, attempts - 1))


REMARK_AFTER_SECONDS = 2.0  # an instance routed into a series after this pause looks at its mark again


class OrthancRestDestination:
    """Orthanc's REST API (POST /instances): the file as it was received. Each series it puts in
    Orthanc is marked there (``Mr2ctRouted``, when Orthanc runs mr2ct's plugin), so that the plugin
    does not send it back to the node, which synthesizes it already: without the mark every series
    a scanner sent to the node was synthesized twice."""

    holds_notes = True  # the node's orthanc_url, where results and the series' notes go

    def __init__(self, store: OrthancStore) -> None:
        self.store, self.name = store, store.url
        # Orthanc series ids marked (or found marked) by this process, and when an instance last went
        # into each (monotonic seconds), oldest first
        self._marked: dict[str, float] = {}
        self._no_flag_until = 0.0  # Orthanc without the plugin's metadata: do not try again before then

    @contextmanager
    def session(self, contexts: set[tuple[str, str]]) -> Iterator[Send]:
        def send(path: Path, sop_class: str, transfer_syntax: str) -> None:
            try:
                answer = self.store.upload(path.read_bytes())  # a corrected re-send replaces what Orthanc holds
            except Exception as exc:  # Orthanc down or refusing: back off
                raise RoutingDown(f"{self.name}: {exc}") from exc
            if isinstance(answer, dict) and answer.get("ParentSeries"):
                self._mark_routed(str(answer["ParentSeries"]))

        yield send

    def _mark_routed(self, series_id: str) -> None:
        """Mark a series the node routed into Orthanc right after its first instance landed (long
        before Orthanc finds it stable), unless it has a routing state already (the plugin sent it,
        or a user pressed its button); looked at again when an instance goes into it after a pause
        (``REMARK_AFTER_SECONDS``): Orthanc drops a series' metadata with the series when it
        overwrites the series' only instance (a corrected re-send of a one-instance series, such as
        an enhanced multi-frame MR), and until 2026-12-05 such a series, its mark gone, was sent back
        to the node and synthesized twice. A failure here costs a second synthesis at worst: logged,
        never a reason to send the instance again."""
        now = time.monotonic()
        if now < self._no_flag_until:
            return
        last = self._marked.pop(series_id, None)
        self._marked[series_id] = now  # the newest last
        if last is not None and now - last < REMARK_AFTER_SECONDS:
            return  # the same burst of a series: marked (or found marked) moments ago
        while len(self._marked) > 10_000:
            del self._marked[next(iter(self._marked))]
        path = f"series/{series_id}/metadata/{ROUTED_FLAG}"
        try:
            self.store.client.get(path)
            return  # a state already: the plugin's, or an earlier mark
        except HttpError as exc:
            if exc.http_status_code != 404:
                log.warning("cannot read series %s's %s in %s: HTTP %s", series_id, ROUTED_FLAG, self.name, exc.http_status_code)
                return
        except Exception as exc:
            log.warning("cannot read series %s's %s in %s: %s", series_id, ROUTED_FLAG, self.name, exc)
            return
        try:
            self.store.client.put(path, data=ROUTED_BY_NODE.encode())
        except HttpError as exc:
            if exc.http_status_code == 404:  # Orthanc declares no such metadata: it runs without mr2ct's plugin
                self._no_flag_until = time.monotonic() + 600
                log.info("%s has no %s metadata (no mr2ct plugin there): routed series are not marked", self.name, ROUTED_FLAG)
            else:
                log.warning("cannot mark series %s routed in %s: HTTP %s", series_id, self.name, exc.http_status_code)
        except Exception as exc:
            log.warning("cannot mark series %s routed in %s: %s", series_id, self.name, exc)


def requested_contexts(contexts: set[tuple[str, str]], reencode: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    """The presentation contexts a routing association proposes for a pass whose instances are of
    these (SOP class, transfer syntax) kinds: each kind as received (uncompressed little endian
    with the other uncompressed little endian syntax beside it), plain little endian for a SOP class
    that came only compressed, deflated or big endian (decoded here if that is all the peer takes),
    and, for the SOP classes in ``reencode`` (ones the destination took in none of those), one
    context per lossless syntax this node encodes. At most ``CONTEXTS_PER_KIND`` per kind."""
    proposed: list[tuple[str, list[str]]] = []
    fallback = set()
    for sop_class, transfer_syntax in sorted(contexts):  # at most KINDS_PER_PASS (forward_pending)
        if transfer_syntax in UNCOMPRESSED_LITTLE_ENDIAN:
            proposed.append((sop_class, [transfer_syntax, *(ts for ts in UNCOMPRESSED_LITTLE_ENDIAN if ts != transfer_syntax)]))
        else:  # compressed, deflated or big endian: also offer plain little endian, decoded here if need be
            proposed.append((sop_class, [transfer_syntax]))
            fallback.add(sop_class)
    for sop_class in sorted(fallback - {c for c, ts in contexts if ts in UNCOMPRESSED_LITTLE_ENDIAN}):
        proposed.append((sop_class, list(UNCOMPRESSED_LITTLE_ENDIAN)))
    for sop_class in sorted({c for c, _ts in contexts} & set(reencode)):
        for lossless in LOSSLESS_REENCODE:
            proposed.append((sop_class, [lossless]))
    return proposed


class CStoreDestination:
    """Any DICOM AE by C-STORE: one association per pass, one presentation context per SOP class and
    transfer syntax in the pass. An instance goes in the syntax it came in when the peer takes it;
    otherwise uncompressed little endian data goes in the other uncompressed little endian syntax,
    and compressed, deflated or big endian data is decoded here and goes as explicit VR little
    endian (a context offered for that). A peer that takes neither (an archive that keeps only
    compressed data) gets it re-encoded here in a lossless syntax it accepted (``LOSSLESS_REENCODE``,
    one more context per SOP class and syntax). Those contexts are proposed only for a SOP class
    the destination took in none of the others: learnt from an association that left some of the
    pass's instances no way to go, released at once and asked again with them, and remembered for
    the destination's later passes (a peer that takes uncompressed data never sees them).

    Every association also proposes Verification, which any storage SCP accepts: one that takes
    none of a pass's storage contexts still makes an association, released in good order (learnt
    from, or each instance refused), not one pynetdicom aborts and logs as an error."""

    holds_notes = False  # forward_to: an archive, not the Orthanc the series' notes go to

    def __init__(
        self, spec: str, calling_ae: str, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None, poll_seconds: float = 0.0002,
    ) -> None:
        self.called_ae, self.host, self.port = parse_dicom_destination(spec)
        self.calling_ae, self.timeout, self.ssl_context = calling_ae, timeout, ssl_context
        self.poll_seconds = poll_seconds
        self.name = f"dicom{'s' if ssl_context else ''}://{self.called_ae}@{self.host}:{self.port}"
        self.reencode_for: set[str] = set()  # SOP classes it took in no syntax but a lossless one encoded here

    def _associate(self, contexts: set[tuple[str, str]]) -> Any:
        ae = NodeAE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for sop_class, syntaxes in requested_contexts(contexts, self.reencode_for):
            ae.add_requested_context(sop_class, syntaxes)
        ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
        tls = (self.ssl_context, self.host) if self.ssl_context is not None else None
        try:
            return ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=tls,
                                evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: tune(event.assoc, self.poll_seconds))])
        except OSError as exc:  # TLS handshake failures (ssl.SSLError) included
            raise RoutingDown(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def session(self, contexts: set[tuple[str, str]]) -> Iterator[Send]:
        assoc = self._associate(contexts)
        stranded = _stranded(contexts, assoc) - self.reencode_for if LOSSLESS_REENCODE else set()
        if stranded:  # it takes these SOP classes only compressed, in syntaxes the pass did not propose
            log.info("%s took %d SOP class(es) in none of the syntaxes proposed: asking again with lossless re-encode contexts",
                     self.name, len(stranded))
            if assoc.is_established:
                assoc.release()
            self.reencode_for |= stranded
            assoc = self._associate(contexts)
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # It accepted the association but no context, not even Verification (pynetdicom then aborts):
            # each instance of this pass is refused, not the destination down.
            def refused(path: Path, sop_class: str, transfer_syntax: str) -> None:
                raise InstanceNotTaken(_none_taken(self.name, sop_class))

            yield refused
            return
        if not assoc.is_established:
            raise RoutingDown(f"{self.name} did not accept an association from {self.calling_ae} (down, or {self.calling_ae} not allowed)")

        taken = _taken(assoc)

        def send(path: Path, sop_class: str, transfer_syntax: str) -> None:
            if not assoc.is_established:
                raise RoutingDown(f"{self.name} ended the association")
            takes = taken.get(sop_class, set())
            if not takes:  # it took Verification only, or other SOP classes: not this one in any syntax
                raise InstanceNotTaken(_none_taken(self.name, sop_class))
            try:
                # Asked first, not tried: pynetdicom logs a refused attempt as an error, and this is no error.
                if transfer_syntax in takes or (transfer_syntax in UNCOMPRESSED_LITTLE_ENDIAN and takes & _UNCOMPRESSED):
                    status = assoc.send_c_store(path)
                else:  # not in its own syntax: decoded, or re-encoded, it may go
                    status = self._send_converted(assoc, takes, path, sop_class, transfer_syntax)
            except (RoutingDown, InstanceNotTaken):
                raise
            except Exception as exc:  # an unreadable spool file and the like: this instance only, with backoff
                raise InstanceNotTaken(f"cannot send it to {self.name}: {type(exc).__name__}") from exc
            if not status:  # no response: aborted, timed out
                raise RoutingDown(f"{self.name} aborted or did not answer the C-STORE (does it allow {self.calling_ae} to store?)")
            if int(status.Status) not in STORED_STATUSES:
                raise InstanceNotTaken(f"{self.name} answered C-STORE status 0x{int(status.Status):04X}")

        try:
            yield send
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_converted(self, assoc: Any, takes: set[str], path: Path, sop_class: str, transfer_syntax: str) -> Any:
        """An instance the destination does not take in its own syntax: its pixel data decoded
        (pydicom's handlers; lossless unless the original was lossy already) and sent in explicit
        VR little endian; if the destination takes no uncompressed data for its SOP class either,
        re-encoded in the first lossless syntax of ``LOSSLESS_REENCODE`` it accepted that can encode
        these pixels (``takes``: the syntaxes it accepted for ``sop_class``). The same instance (same
        UIDs) either way; the spool keeps the original."""
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            try:
                ds.decompress(generate_instance_uid=False)  # the same instance, its pixels decoded: the same UID
            except Exception as exc:  # no handler for it
                raise InstanceNotTaken(f"{self.name} does not take {transfer_syntax} and it could not be decoded here: "
                                       f"{type(exc).__name__}") from exc
        elif ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:  # inflated on reading
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        # (explicit VR big endian: pynetdicom re-encodes uncompressed data for the accepted syntax)
        if takes & _UNCOMPRESSED:
            status = assoc.send_c_store(ds)
            log.info("routed decoded sop_class=%s from=%s to=%s", sop_class, transfer_syntax, self.name)
            return status
        targets = [ts for ts in LOSSLESS_REENCODE if ts in takes]
        if not targets or "PixelData" not in ds:
            raise InstanceNotTaken(f"{self.name} accepted no presentation context for {sop_class} in {transfer_syntax}, "
                                   f"uncompressed, or a lossless syntax this node encodes ({_reencode_names()})")
        failures = []
        for target in targets:  # the next one it accepted when an encoder cannot take these pixels
            try:
                ds.compress(target, generate_instance_uid=False)  # lossless: the decoded pixels, bit for bit
            except Exception as exc:  # bit depth, float pixels, an image smaller than JPEG 2000's 6 levels ...
                failures.append(f"{target.name}: {type(exc).__name__}: {str(exc)[:200]}")
                continue  # pydicom changes the data set only once the encoder has succeeded
            status = assoc.send_c_store(ds)
            log.info("routed re-encoded sop_class=%s from=%s to=%s as=%s", sop_class, transfer_syntax, self.name, target)
            return status
        raise InstanceNotTaken(f"{self.name} takes {sop_class} only compressed, and this instance could not be encoded here in "
                               f"any lossless syntax it accepted ({'; '.join(failures)})")


def _none_taken(name: str, sop_class: str) -> str:
    return (f"{name} accepted no presentation context for {sop_class} (it takes it in none of the syntaxes offered: "
            f"as received, uncompressed, or a lossless syntax this node encodes: {_reencode_names()})")


def _taken(assoc: Any) -> dict[str, set[str]]:
    """SOP class -> the transfer syntaxes the destination accepted for it."""
    taken: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        taken.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return taken


def _stranded(contexts: set[tuple[str, str]], assoc: Any) -> set[str]:
    """The SOP classes of a pass with instances the association leaves no way to go: the destination
    took neither their syntax, nor uncompressed data, nor a lossless syntax they could be re-encoded
    in (all of them when it accepted no context, not even Verification: pynetdicom then aborts, the
    contexts still listed)."""
    if not assoc.is_established and not (assoc.rejected_contexts and not assoc.accepted_contexts):
        return set()  # not an association at all (down, or the calling AE refused): nothing learnt
    taken = _taken(assoc) if assoc.is_established else {}
    stranded = set()
    for sop_class, transfer_syntax in contexts:
        takes = taken.get(sop_class, set())
        if transfer_syntax not in takes and not takes & (_UNCOMPRESSED | set(LOSSLESS_REENCODE)):
            stranded.add(sop_class)
    return stranded


def forward_pending(sessions: sessionmaker[Session], destination: Destination, limit: int = 200, max_refusals: int = 0,
                    stop: threading.Event | None = None) -> tuple[int, int]:
    """One pass: forward due instances. Returns (forwarded, failed). An instance the destination
    refuses ``max_refusals`` times (0: no limit) is given up until an administrator asks again.
    ``stop`` (the node shutting down) ends the pass after the instance in flight; the rest stay due."""
    now = utcnow()
    with sessions() as session:
        due = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.forward_attempts, Instance.sop_class_uid, Instance.transfer_syntax_uid,
                   Instance.forward_refusals, Instance.received_at, Instance.series_instance_uid)
            .where(Instance.forwarded_at.is_(None), Instance.forward_next_at <= now)
            .order_by(Instance.received_at)
            .limit(limit)
        ).all()
    if not due:
        return 0, 0
    contexts = set(sorted({(row.sop_class_uid, row.transfer_syntax_uid) for row in due})[:KINDS_PER_PASS])
    due = [row for row in due if (row.sop_class_uid, row.transfer_syntax_uid) in contexts]  # the rest: next pass

    def failed_one(sop_uid: str, attempts: int, exc: Exception, refusals: int | None = None) -> None:
        """``refusals``: this instance's refusals so far, when the destination refused it (not when it was unreachable)."""
        wait = backoff_seconds(attempts + 1)
        refused = None if refusals is None else refusals + 1
        given_up = refused is not None and 0 < max_refusals <= refused
        error = str(exc)[:400] + (f" (refused {refused} times: given up; POST /routing/retry asks again)" if given_up else "")
        values: dict[str, Any] = {"forward_next_at": None if given_up else utcnow() + timedelta(seconds=wait)}
        if refused is not None:
            values["forward_refusals"] = refused
        this_one = Instance.sop_instance_uid == sop_uid
        with sessions.begin() as session:
            session.execute(update(Instance).where(this_one).values(forward_attempts=attempts + 1, forward_error=error))
            # An administrator's retry during this pass (forward_next_at moved past the pass's start)
            # stands: the failure is recorded, the retry is not overwritten by this attempt's backoff.
            rescheduled = not session.execute(
                update(Instance).where(this_one, Instance.forward_next_at <= now).values(**values)).rowcount
        if rescheduled:
            log.warning("forward failed sop=%s attempt=%d reason=%s; a retry was asked meanwhile: tried again at the next pass",
                        sop_uid, attempts + 1, exc)
        elif given_up:
            log.error("forward given up sop=%s refusals=%d reason=%s", sop_uid, refused, exc)
            audit.record(sessions, audit.ROUTING_GIVEN_UP, "failure", "forwarder", destination=destination.name, sop_instance_uid=sop_uid,
                         refusals=refused, reason=str(exc)[:400])
        else:
            log.warning("forward failed sop=%s attempt=%d retry_in=%.0fs reason=%s", sop_uid, attempts + 1, wait, exc)

    forwarded = failed = 0
    series_routed: set[str] = set()
    try:
        with destination.session(contexts) as send:
            for sop_uid, path, attempts, sop_class, transfer_syntax, refusals, received_at, series_uid in due:
                if stop is not None and stop.is_set():
                    break
                try:
                    send(Path(path), sop_class, transfer_syntax)
                except InstanceNotTaken as exc:
                    failed += 1
                    failed_one(sop_uid, attempts, exc, refusals)
                    continue
                except RoutingDown as exc:
                    failed += 1
                    failed_one(sop_uid, attempts, exc)
                    break  # the destination is likely down: wait for the backoff instead of hammering it
                with sessions.begin() as session:
                    # Re-sent while this pass sent the copy before it (received_at moved on): not marked
                    # routed, so the next pass sends the copy the spool holds now.
                    routed = session.execute(
                        update(Instance).where(Instance.sop_instance_uid == sop_uid, Instance.received_at == received_at).values(
                            forwarded_at=utcnow(), forward_attempts=attempts + 1, forward_error=None
                        )
                    ).rowcount
                if not routed:
                    log.info("routed sop=%s, but it was received again meanwhile: the new copy goes at the next pass", sop_uid)
                    continue
                forwarded += 1
                series_routed.add(series_uid)
    except RoutingDown as exc:  # no association at all: the first due instance carries the error and backs off
        failed += 1
        failed_one(due[0].sop_instance_uid, due[0].forward_attempts, exc)
    if series_routed and destination.holds_notes:  # a series judged before Orthanc held it gets its note now
        with sessions.begin() as session:
            mark_due_unwritten(session, series_routed)
    if forwarded:
        audit.record(sessions, audit.INSTANCES_TRANSFERRED, "success", "forwarder", destination=destination.name, instances=forwarded,
                     originals=True)
    return forwarded, failed


def reschedule_failed(sessions: sessionmaker[Session]) -> int:
    """POST /routing/retry: every failing original, the given-up ones included, is due at the next
    pass instead of at the end of its backoff, its refusals counted afresh. Returns how many."""
    with sessions.begin() as session:
        return session.execute(
            update(Instance).where(Instance.forwarded_at.is_(None), Instance.forward_error.is_not(None)).values(
                forward_next_at=utcnow(), forward_refusals=0)
        ).rowcount


def forward_loop(sessions: sessionmaker[Session], destination: Destination, poll_seconds: float, stop: threading.Event,
                 max_refusals: int = 0) -> None:
    errors = PassErrors(log, "the forwarder", "forwarder pass failed")
    while not stop.wait(poll_seconds):
        errors.attempt(lambda: forward_pending(sessions, destination, max_refusals=max_refusals, stop=stop))
