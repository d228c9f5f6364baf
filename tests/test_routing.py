"""Routing passes while something else happens: an administrator's retry while a pass fails
against a destination that hangs; a re-send of an instance while a pass sends it. And routing to
a destination that keeps only compressed data."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.forwarder import CStoreDestination, forward_pending, reschedule_failed
from dicom_node.ingest import ReceivedInstance
from dicom_node.models import Instance, utcnow
from dicom_node.recorder import Recorder, SpooledInstance
from training.phantom_dicom import write_mr_series

MR = "1.2.840.10008.5.1.4.1.1.4"
SOP = "1.2.3.4.1"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _failing_instance(tmp_path: Path, attempts: int):
    """One original in the database that has failed ``attempts`` times and is due now."""
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    recorder = Recorder(sessions, window_seconds=0.05)
    try:
        info = ReceivedInstance(MR, SOP, "1.2.3", "1.2.3.4", "MR", "T1", "axial", "patient")
        recorder.submit(SpooledInstance(info, tmp_path / f"{SOP}.dcm", 100, "1.2.840.10008.1.2.1", "SCANNER", None, utcnow()))
        assert recorder.flush(timeout=30)
    finally:
        recorder.stop()
    with sessions.begin() as session:
        row = session.get(Instance, SOP)
        row.forward_attempts, row.forward_error, row.forward_next_at = attempts, "an earlier failure", utcnow() - timedelta(seconds=1)
    return sessions


def _pass_against_a_hung_peer(sessions, during=None) -> tuple[int, int]:
    """One forward pass to a peer that takes the TCP connection and never answers the association
    request (a hung PACS); ``during`` runs while the pass waits for that answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(20)
        destination = CStoreDestination(f"HUNG@127.0.0.1:{listener.getsockname()[1]}", "MR2CT", timeout=2)
        result: list[tuple[int, int]] = []
        forwarding = threading.Thread(target=lambda: result.append(forward_pending(sessions, destination)))
        forwarding.start()
        conn, _ = listener.accept()  # the pass has read its due rows and waits for the peer
        try:
            if during is not None:
                during()
            forwarding.join(timeout=30)
        finally:
            conn.close()
    assert not forwarding.is_alive() and result
    return result[0]


def test_a_retry_asked_while_a_pass_fails_is_not_overwritten_by_that_failure(tmp_path: Path) -> None:
    """The administrator brings the destination back and POSTs /routing/retry while a pass that
    started before is still failing: the failure is recorded, but the instance is due at the next
    pass, not at the end of the backoff that failure would set (32 s after a sixth attempt)."""
    sessions = _failing_instance(tmp_path, attempts=5)
    asked: list[int] = []
    assert _pass_against_a_hung_peer(sessions, during=lambda: asked.append(reschedule_failed(sessions))) == (0, 1)
    assert asked == [1]
    with sessions() as session:
        row = session.get(Instance, SOP)
    assert row.forward_attempts == 6 and "did not accept an association" in row.forward_error and row.forwarded_at is None
    assert _utc(row.forward_next_at) <= utcnow()  # due now: the retry stands

    # The same failure with no retry meanwhile backs off as before: 2^6 s after the seventh attempt.
    assert _pass_against_a_hung_peer(sessions) == (0, 1)
    with sessions() as session:
        row = session.get(Instance, SOP)
    assert row.forward_attempts == 7 and _utc(row.forward_next_at) > utcnow() + timedelta(seconds=50)


def _record(sessions, *paths: Path) -> None:
    """What the SCP does after it spooled ``paths``: the instances' rows, through the recorder."""
    recorder = Recorder(sessions, window_seconds=0.05)
    try:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            info = ReceivedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                    "MR", "T1", "axial", "patient")
            recorder.submit(SpooledInstance(info, path, path.stat().st_size, str(ds.file_meta.TransferSyntaxUID), "SCANNER", None,
                                            utcnow()))
        assert recorder.flush(timeout=30)
    finally:
        recorder.stop()


def _destination(ds, on_store, syntaxes: list[str] | None = None, proposed: list[set[str]] | None = None,
                 verification: bool = True, ends: list[str] | None = None, sop_class: str | None = None):
    """A pynetdicom storage SCP on loopback taking ``sop_class`` (default: ``ds``'s) in ``syntaxes``
    (default: ``ds``'s own) and, as any PACS does, Verification; its C-STOREs answered by ``on_store``;
    returns the server (shut it down) and the node's destination for it. ``proposed`` gets, per
    association asked of it, the transfer syntaxes of the storage contexts proposed; ``ends``, per
    association, "released" or "aborted"."""
    ae = AE("DEST")
    ae.add_supported_context(sop_class or str(ds.SOPClassUID), syntaxes or [str(ds.file_meta.TransferSyntaxUID)])
    if verification:
        ae.add_supported_context(Verification)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handlers = [(evt.EVT_C_STORE, on_store)]
    if proposed is not None:
        handlers.append((evt.EVT_REQUESTED, lambda event: proposed.append(
            {str(ts) for cx in event.assoc.requestor.requested_contexts if cx.abstract_syntax != Verification for ts in cx.transfer_syntax})))
    if ends is not None:
        handlers += [(evt.EVT_RELEASED, lambda event: ends.append("released")), (evt.EVT_ABORTED, lambda event: ends.append("aborted"))]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    return server, CStoreDestination(f"DEST@127.0.0.1:{port}", "MR2CT", timeout=10)


LOSSLESS = {str(JPEGLSLossless), str(JPEG2000Lossless), str(RLELossless)}


def test_a_destination_that_takes_the_instances_as_they_are_is_proposed_no_re_encoding(tmp_path: Path) -> None:
    """A PACS that takes MR as the scanner sent it sees one context per syntax the pass needs (the
    instance's own, uncompressed little endian beside it), not one per lossless syntax the node
    could re-encode into: its log holds no rejected contexts, and a pass uses one association."""
    series = write_mr_series(tmp_path / "mr", seed=7, slices=2, size=32, pixel_spacing=8.0)
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _record(sessions, *(Path(path) for path in series.files))
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    proposed: list[set[str]] = []
    server, destination = _destination(ds, lambda event: 0x0000, proposed=proposed)
    try:
        assert forward_pending(sessions, destination) == (2, 0)
    finally:
        server.shutdown()
    assert len(proposed) == 1 and str(ds.file_meta.TransferSyntaxUID) in proposed[0] and not proposed[0] & LOSSLESS


def test_an_instance_received_again_while_a_pass_sends_it_is_sent_again(tmp_path: Path) -> None:
    """The scanner re-sends an instance (a corrected copy, say) while the node is routing the copy
    it had: that pass must not mark the instance routed, or the destination keeps the old copy."""
    series = write_mr_series(tmp_path / "mr", seed=5, slices=1, size=32, pixel_spacing=8.0)
    path = Path(series.files[0])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _record(sessions, path)

    arrived, answer = threading.Event(), threading.Event()
    stored: list[str] = []

    def on_store(event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        arrived.set()
        answer.wait(20)  # the first copy is on its way until the test lets it land
        return 0x0000

    server, destination = _destination(ds, on_store)
    try:
        result: list[tuple[int, int]] = []
        forwarding = threading.Thread(target=lambda: result.append(forward_pending(sessions, destination)))
        forwarding.start()
        assert arrived.wait(20)
        _record(sessions, path)  # received again while the pass waits for the destination's answer
        answer.set()
        forwarding.join(timeout=30)
        assert result == [(0, 0)]  # sent, but not counted as routed
        with sessions() as session:
            assert session.get(Instance, str(ds.SOPInstanceUID)).forwarded_at is None
        assert forward_pending(sessions, destination) == (1, 0)  # the copy received last
        with sessions() as session:
            assert session.get(Instance, str(ds.SOPInstanceUID)).forwarded_at is not None
        assert stored == [str(ds.SOPInstanceUID)] * 2
    finally:
        answer.set()
        server.shutdown()


def test_a_pass_ends_after_the_instance_in_flight_when_the_node_stops(tmp_path: Path) -> None:
    """A node stopped (SIGTERM) in the middle of a routing backlog does not first send the rest of
    the pass (up to 200 instances, over a slow link minutes): the pass ends after the instance in
    flight, and what was not sent stays due for the next start."""
    series = write_mr_series(tmp_path / "mr", seed=6, slices=5, size=32, pixel_spacing=8.0)
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _record(sessions, *(Path(path) for path in series.files))
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    stopping = threading.Event()
    stored: list[str] = []

    def on_store(event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        stopping.set()  # the node is told to stop while the first instance is on its way
        return 0x0000

    server, destination = _destination(ds, on_store)
    try:
        assert forward_pending(sessions, destination, stop=stopping) == (1, 0)
        with sessions() as session:
            waiting = session.scalars(select(Instance.sop_instance_uid).where(Instance.forwarded_at.is_(None))).all()
        assert len(waiting) == 4 and stored[0] not in waiting
        assert forward_pending(sessions, destination) == (4, 0)  # the next start sends the rest
        assert sorted(stored) == sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series.files)
    finally:
        server.shutdown()


def test_a_destination_that_keeps_only_compressed_data_gets_instances_re_encoded_without_loss(tmp_path: Path) -> None:
    """An archive that takes MR images only as RLE Lossless: an uncompressed original and a JPEG
    2000 lossless one both reach it re-encoded in RLE Lossless, pixel for pixel the same and under
    the same UIDs; the spool keeps both as received. One that takes them only in a syntax this
    node cannot encode refuses them with a reason that says so, and nothing is marked routed."""
    series = write_mr_series(tmp_path / "mr", seed=8, slices=3, size=32, pixel_spacing=8.0)
    plain, j2k = Path(series.files[0]), tmp_path / "j2k.dcm"
    compressed = pydicom.dcmread(series.files[1])
    compressed.compress(JPEG2000Lossless, generate_instance_uid=False)
    compressed.save_as(j2k)
    originals = {str(ds.SOPInstanceUID): ds.pixel_array for ds in (pydicom.dcmread(p) for p in series.files[:2])}
    plain_ds = pydicom.dcmread(plain, stop_before_pixels=True)
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _record(sessions, plain, j2k)
    arrived: dict[str, pydicom.Dataset] = {}

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        arrived[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    proposed: list[set[str]] = []
    server, destination = _destination(plain_ds, on_store, [str(RLELossless)], proposed)
    try:
        assert forward_pending(sessions, destination) == (2, 0)
        # Learnt in the first pass: asked without re-encode contexts, none of its instances could go,
        # asked again with them. The next pass proposes them at once.
        assert len(proposed) == 2 and str(RLELossless) not in proposed[0] and proposed[1] >= LOSSLESS  # (JPEG 2000: as received)
        third = pydicom.dcmread(series.files[2])
        _record(sessions, Path(series.files[2]))
        assert forward_pending(sessions, destination) == (1, 0)
        assert len(proposed) == 3 and proposed[2] >= LOSSLESS
    finally:
        server.shutdown()
    assert arrived.pop(str(third.SOPInstanceUID)).pixel_array.tolist() == third.pixel_array.tolist()
    assert set(arrived) == set(originals)
    for uid, ds in arrived.items():
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert (ds.pixel_array == originals[uid]).all()
    with sessions() as session:
        rows = session.scalars(select(Instance)).all()
    assert all(row.forwarded_at is not None and row.forward_error is None for row in rows)
    spooled = {str(pydicom.dcmread(row.path).file_meta.TransferSyntaxUID) for row in rows}
    assert spooled == {str(plain_ds.file_meta.TransferSyntaxUID), str(JPEG2000Lossless)}  # kept as received
    assert len(rows) == 3

    # A destination that keeps them only as JPEG Lossless (process 14), which pydicom cannot encode:
    # an original in that syntax (dcmtk's dcmcjpeg) goes as it is, the uncompressed one is refused.
    sv1 = tmp_path / "sv1.dcm"
    subprocess.run(["dcmcjpeg", str(series.files[1]), str(sv1)], check=True, capture_output=True)
    assert pydicom.dcmread(sv1).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    sessions = init_db(f"sqlite:///{tmp_path / 'db2.sqlite'}")
    _record(sessions, plain, sv1)
    server, destination = _destination(plain_ds, on_store, [str(JPEGLosslessSV1)])
    arrived.clear()
    try:
        assert forward_pending(sessions, destination) == (1, 1)
    finally:
        server.shutdown()
    assert [ds.file_meta.TransferSyntaxUID for ds in arrived.values()] == [JPEGLosslessSV1]
    with sessions() as session:
        refused = session.get(Instance, str(plain_ds.SOPInstanceUID))
    assert refused.forwarded_at is None and "lossless syntax this node encodes (JPEG-LS Lossless" in refused.forward_error


def test_an_instance_one_accepted_encoder_cannot_take_goes_in_the_next_lossless_syntax_accepted(tmp_path: Path) -> None:
    """An archive that keeps MR only as JPEG 2000 or RLE Lossless gets a 16x16 image (too small for
    JPEG 2000's six wavelet levels, so the encoder refuses it): it goes as RLE Lossless, pixel for
    pixel. Where JPEG 2000 is all the archive takes, the instance is refused with the encoder's
    reason, and is not marked routed."""
    series = write_mr_series(tmp_path / "mr", seed=9, slices=1, size=16, pixel_spacing=16.0)
    path = Path(series.files[0])
    original = pydicom.dcmread(path)
    assert (original.Rows, original.Columns) == (16, 16)
    arrived: list[pydicom.Dataset] = []

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        arrived.append(ds)
        return 0x0000

    for name, syntaxes, routed in (("both", [str(JPEG2000Lossless), str(RLELossless)], True), ("j2k", [str(JPEG2000Lossless)], False)):
        sessions = init_db(f"sqlite:///{tmp_path / f'{name}.sqlite'}")
        _record(sessions, path)
        server, destination = _destination(original, on_store, syntaxes)
        try:
            assert forward_pending(sessions, destination) == ((1, 0) if routed else (0, 1))
        finally:
            server.shutdown()
        with sessions() as session:
            row = session.get(Instance, str(original.SOPInstanceUID))
        if routed:
            assert row.forwarded_at is not None and row.forward_error is None
            assert [ds.file_meta.TransferSyntaxUID for ds in arrived] == [RLELossless]
            assert (arrived[0].pixel_array == original.pixel_array).all()
        else:
            assert row.forwarded_at is None and len(arrived) == 1
            assert "could not be encoded here in any lossless syntax it accepted (JPEG 2000" in row.forward_error


def test_a_destination_that_takes_none_of_a_sop_class_refuses_its_instances_without_an_aborted_association(tmp_path: Path, caplog) -> None:
    """A PACS that takes no MR at all (CT only): the MR instance is refused with the reason, not the
    destination taken for down. Every routing association proposes Verification as well, so the
    PACS's answer is an association the node releases in good order, with no error in the node's
    log; one that does not even take Verification still gets the instance refused (pynetdicom
    aborts that association)."""
    series = write_mr_series(tmp_path / "mr", seed=10, slices=1, size=16, pixel_spacing=16.0)
    path = Path(series.files[0])
    original = pydicom.dcmread(path)
    for verification in (True, False):
        sessions = init_db(f"sqlite:///{tmp_path / f'v{int(verification)}.sqlite'}")
        _record(sessions, path)
        ends: list[str] = []
        server, destination = _destination(original, lambda event: 0x0000, ["1.2.840.10008.1.2.1"], verification=verification,
                                           ends=ends, sop_class="1.2.840.10008.5.1.4.1.1.2")
        caplog.clear()
        try:
            assert forward_pending(sessions, destination) == (0, 1)
            deadline = time.monotonic() + 10  # the PACS sees the release or abort a moment later
            while len(ends) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            server.shutdown()
        with sessions() as session:
            row = session.get(Instance, str(original.SOPInstanceUID))
        assert row.forwarded_at is None and row.forward_refusals == 1
        assert f"accepted no presentation context for {MR}" in row.forward_error
        # asked once without re-encode contexts, and again with them (learnt): neither took MR
        assert destination.reencode_for == {MR} and len(ends) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        if verification:
            assert ends == ["released", "released"] and not errors, errors
        else:
            assert ends == ["aborted", "aborted"]
