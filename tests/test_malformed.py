"""Malformed instances over C-STORE: each gets a failure status and an audit row, the node keeps
answering, and nothing lands outside the spool (nor inside it)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.models import AuditEvent, Instance
from tests.corpus import CASES, make_variant
from tests.conftest import NODE_AE, SCANNER_AE
from training.phantom_dicom import write_mr_series


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    series = write_mr_series(tmp_path_factory.mktemp("good"), seed=300, slices=1, size=64, pixel_spacing=4.0)
    return series.files[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_instance_is_refused_and_the_node_keeps_answering(case, good_file, node, tmp_path, monkeypatch):
    path = make_variant(good_file, tmp_path, case)
    sop_uid = pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        assert status and status.Status in CASES[case], f"{case}: status 0x{getattr(status, 'Status', 0):04X}"
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in echo:
        # pynetdicom's own race (pydicom/pynetdicom#875): a response that arrives before the SCU waits
        # for it is taken for a request ("Received unexpected C-ECHO service message") and dropped;
        # the node answered, so a new association's echo shows it still does
        again = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert again.is_established
        try:
            echo = again.send_c_echo()
        finally:
            again.release()
    assert echo.Status == 0
    sessions = init_db(node.database_url)
    with sessions() as session:
        assert session.scalars(select(Instance)).all() == [] or all("evil" not in i.path for i in session.scalars(select(Instance)))
        refused = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused")).all()
    assert any(e.detail["status"] == f"0x{status.Status:04X}" for e in refused)
    spooled = [p for p in (node.workdir / "spool").rglob("*") if p.is_file()]
    assert not [p for p in spooled if sop_uid in p.name or ".." in str(p) or p.name.endswith(".tmp")]
    outside = {p.name for p in node.workdir.iterdir() if p.is_file()}
    assert outside <= {"mr2ct.log", "mr2ct.db", "mr2ct.db-wal", "mr2ct.db-shm"}
    assert not Path("/tmp/evil").exists()


def test_an_unexpected_error_becomes_a_reason_without_the_values_it_quoted() -> None:
    """pydicom's messages can quote element values; the refusal reason (logged and audited) keeps
    the type, the place and the element, never the message."""
    from pydicom.dataset import Dataset

    from pydicom.tag import tag_in_exception

    from dicom_node.scp import unexpected_reason

    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    try:
        with tag_in_exception(ds["PatientName"].tag):
            raise ValueError(f"cannot convert {ds.PatientName!s}")
    except ValueError as exc:
        reason = unexpected_reason(exc)
    assert "Doe" not in reason and "Jane" not in reason
    assert "ValueError" in reason and "(0010,0010)" in reason and "test_malformed.py:" in reason
    try:
        Path("/nonexistent/Doe^Jane/x").read_bytes()
    except OSError as exc:
        reason = unexpected_reason(exc)
    assert "Doe" not in reason and "ENOENT" in reason
