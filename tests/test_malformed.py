"""Malformed instances over C-STORE: each gets a failure status and an audit row, the node keeps
answering, and nothing lands outside the spool (nor inside it)."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.models import AuditEvent, Instance
from tests.conftest import NODE_AE, SCANNER_AE
from training.phantom_dicom import write_mr_series


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    series = write_mr_series(tmp_path_factory.mktemp("good"), seed=300, slices=1, size=64, pixel_spacing=4.0)
    return series.files[0]


def _variant(good: Path, folder: Path, name: str) -> Path:
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.300.{abs(hash(name)) % 10**8}"
    out = folder / f"{name}.dcm"
    if name == "no-pixel-data":
        del ds.PixelData
    elif name == "rows-columns-lie":
        ds.Rows, ds.Columns = 512, 512
    elif name == "giant-rows-columns":
        ds.Rows, ds.Columns = 65535, 65535
    elif name == "wrong-sop-class":
        ds.SOPClassUID = CTImageStorage  # sent in the MR context: data set does not match
    elif name == "no-geometry":
        del ds.ImagePositionPatient
    elif name == "path-like-uid":
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../../tmp/evil"
    elif name == "path-like-series-uid":
        ds.SeriesInstanceUID = "../../../etc"
    ds.save_as(out, enforce_file_format=True)
    if name == "wrong-sop-class":  # the file meta (and so the C-STORE request) still says MR
        ds = pydicom.dcmread(out)
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.save_as(out, enforce_file_format=False)
    raw = out.read_bytes()
    if name == "truncated":
        out.write_bytes(raw[: len(raw) - 3000])
    elif name == "length-past-end":
        # Rewrite the Pixel Data length (explicit VR OW: tag, VR, 2 reserved, 4-byte length) to 1 GiB.
        at = raw.rfind(b"\xe0\x7f\x10\x00OW")
        out.write_bytes(raw[: at + 8] + struct.pack("<I", 2**30) + raw[at + 12 :])
    elif name == "undefined-length-outside-sequence":
        at = raw.find(b"\x08\x00\x3e\x10")  # SeriesDescription (LO, 2-byte length) -> turn into UN with 0xFFFFFFFF
        out.write_bytes(raw[:at] + b"\x08\x00\x3e\x10UN\x00\x00\xff\xff\xff\xff" + raw[at + 8 :])
    return out


CASES = {
    "truncated": {0xA900, 0xC000},
    "length-past-end": {0xA900, 0xC000},
    "undefined-length-outside-sequence": {0xA900, 0xC000},
    "no-pixel-data": {0xA900},
    "rows-columns-lie": {0xA900},
    "giant-rows-columns": {0xA900},
    "wrong-sop-class": {0xA900},
    "no-geometry": {0xA900},
    "path-like-uid": {0xC000},
    "path-like-series-uid": {0xC000},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_instance_is_refused_and_the_node_keeps_answering(case, good_file, node, tmp_path, monkeypatch):
    path = _variant(good_file, tmp_path, case)
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
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
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
