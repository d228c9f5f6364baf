"""The DICOM Conformance Statement a PACS administrator configures against: docs/conformance.md is
what `mr2ct conformance` prints now, and a running node accepts exactly the presentation contexts
it lists and names itself as it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom
from pynetdicom import AE, build_context

from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.conftest import SCANNER_AE
from training.phantom_dicom import write_mr_series

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
NOT_LISTED = [  # (abstract syntax, transfer syntax) a node must refuse: CT Image Storage, HTJ2K Lossless, JPEG XL
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.201"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.110"),
]


def _listed_contexts() -> set[tuple[str, str]]:
    """The (abstract syntax, transfer syntax) pairs of the statement's table of accepted contexts."""
    text = DOC.read_text()
    table = text.split("Presentation contexts accepted", 1)[1].split("\n\n", 2)[1]
    pairs = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        pairs |= {(cells[1], ts) for ts in re.findall(r"`([0-9.]+)`", cells[2])}
    return pairs


def test_the_statement_in_docs_is_what_the_command_prints():
    printed = subprocess.run([sys.executable, "-m", "dicom_node.cli", "conformance"], capture_output=True, text=True, timeout=300, check=True).stdout
    assert printed == DOC.read_text(), "docs/conformance.md is stale: run `mr2ct conformance -o docs/conformance.md`"
    assert IMPLEMENTATION_CLASS_UID in printed


def test_a_running_node_accepts_exactly_the_listed_contexts_and_names_itself(node, tmp_path):
    listed = _listed_contexts()
    assert len(listed) >= 3 * 13 + 1 and ("1.2.840.10008.1.1", "1.2.840.10008.1.2") in listed
    ae = AE(ae_title=SCANNER_AE)
    ae.requested_contexts = [build_context(abstract, [ts]) for abstract, ts in sorted(listed) + NOT_LISTED]
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MR2CT_TEST")
    assert assoc.is_established
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        assert accepted == listed, {"listed, refused": listed - accepted, "accepted, not listed": accepted - listed}
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        # an instance it stores is spooled as a file that names mr2ct as its writer
        series = write_mr_series(tmp_path, seed=71, slices=1, size=16, pixel_spacing=8.0)
        status = assoc.send_c_store(pydicom.dcmread(series.files[0]))
        assert status.Status == 0x0000
    finally:
        assoc.release()
    spooled = [p for p in Path(node.env["MR2CT_SPOOL_DIR"]).rglob("*") if p.is_file() and series.series_uid in str(p)]
    assert spooled, "the stored instance is not in the spool"
    meta = pydicom.dcmread(spooled[0], stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID and meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
