"""Scanners send compressed and big-endian MR: the node accepts every common transfer syntax,
keeps each instance exactly as received, and decodes it when the series is synthesized."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, MRImageStorage
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from dicom_node.models import Instance
from tests.conftest import NODE_AE, SCANNER_AE
from training.phantom_dicom import write_mr_series

# name: (dcmtk converter, storescu proposal option); None: sent with pynetdicom
# (storescu has no proposal option for JPEG lossless process 14 without SV1).
DCMTK = {
    "implicit-le": (["dcmconv", "+ti"], "-xi"),
    "explicit-be": (["dcmconv", "+tb"], "-xb"),
    "deflated": (["dcmconv", "+td"], "-xd"),
    "rle": (["dcmcrle"], "-xr"),
    "jpeg-baseline": (["dcmcjpeg", "+eb"], "-xy"),
    "jpeg-extended": (["dcmcjpeg", "+ee"], "-xx"),
    "jpeg-lossless-p14": (["dcmcjpeg", "+el"], None),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], "-xs"),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], "-xt"),
    "jpeg-ls-near-lossless": (["dcmcjpls", "+en"], "-xu"),
}
# name: (transfer syntax pydicom encodes, storescu proposal option)
PYDICOM = {"jpeg2000-lossless": (JPEG2000Lossless, "-xv"), "jpeg2000": (JPEG2000, "-xw")}


def _convert(name: str, source: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for path in source:
        target = folder / path.name
        if name in DCMTK:
            subprocess.run([*DCMTK[name][0], str(path), str(target)], check=True, capture_output=True)
        else:
            ds = pydicom.dcmread(path)
            syntax = PYDICOM[name][0]
            kwargs = {"j2k_cr": [20]} if syntax == JPEG2000 else {}
            ds.compress(syntax, encoding_plugin="pylibjpeg", **kwargs)
            ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@pytest.mark.parametrize("syntax", [*DCMTK, *PYDICOM])
def test_a_series_in_this_transfer_syntax_is_spooled_as_received_and_synthesized(syntax: str, node, tmp_path: Path) -> None:
    seed = 100 + sorted([*DCMTK, *PYDICOM]).index(syntax)
    series = write_mr_series(tmp_path / "plain", seed=seed, slices=4, size=64, pixel_spacing=4.0, slice_spacing=8.0)
    files = _convert(syntax, series.files, tmp_path / syntax)
    sent_syntax = pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID
    propose = DCMTK[syntax][1] if syntax in DCMTK else PYDICOM[syntax][1]
    if propose is None:
        ae = AE(ae_title=SCANNER_AE)
        ae.add_requested_context(MRImageStorage, [sent_syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        try:
            assert all(assoc.send_c_store(pydicom.dcmread(f)).Status == 0 for f in files)
        finally:
            assoc.release()
    else:
        result = storescu(tmp_path / syntax, node.port, NODE_AE, SCANNER_AE, propose=propose)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done", job.error
    sessions = init_db(node.database_url)
    with sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
    assert len(rows) == 4
    originals = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for row in rows:
        assert row.transfer_syntax_uid == sent_syntax
        spooled = pydicom.dcmread(row.path)
        assert spooled.file_meta.TransferSyntaxUID == sent_syntax
        assert spooled.PixelData == originals[row.sop_instance_uid].PixelData
