"""Nothing from the wire steers a write outside the spool; what is spooled is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.spool import Spool, is_valid_uid
from synthesis.errors import InvalidInstance

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "0.1", "2.25." + "1" * 38])
def test_well_formed_uids_are_accepted(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1", "../../etc/passwd", "1.2/3", "1..2", "1.02", "1.2.", "1.2 ", "1." + "2" * 63, None, 12])
def test_malformed_or_path_like_uids_are_refused(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_a_path_like_uid_never_becomes_a_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidInstance, match="SOPInstanceUID"):
        spool.write(STUDY, SERIES, "../../../../tmp/evil", b"x")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_write_is_complete_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = bytes(range(256)) * 1000
    path = spool.write(STUDY, SERIES, SOP, data)
    assert path == (tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm").resolve()
    assert path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    spool.write(STUDY, SERIES, SOP, b"second")  # a re-send replaces atomically
    assert path.read_bytes() == b"second"


@pytest.mark.parametrize("sop_class, sop_uid, transfer_syntax", [
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2.1"),  # odd-length UIDs get a NUL pad
    ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.4", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.4.4", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),
])
def test_the_file_meta_header_is_what_pynetdicom_writes(sop_class: str, sop_uid: str, transfer_syntax: str) -> None:
    """The spool files carry the header pynetdicom's encoded_dataset() would give, byte for byte,
    naming mr2ct (not pynetdicom) as the implementation that wrote them."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.spool import file_meta_header
    from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=transfer_syntax,
                            implementation_uid=IMPLEMENTATION_CLASS_UID, implementation_version=IMPLEMENTATION_VERSION_NAME)
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert file_meta_header(sop_class, sop_uid, transfer_syntax) == expected


def test_recovery_keeps_the_later_of_two_unrecorded_copies_of_an_instance_under_two_series(tmp_path: Path) -> None:
    """A crash that left two arrivals of one instance unrecorded, under two series (moved upstream
    between them): start-up recovery records the later one, whichever order the folders are
    listed in, and deletes the earlier, which would otherwise be recorded back over it at the
    next start."""
    import os

    import pydicom
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import Instance
    from dicom_node.recovery import recover_spool
    from training.phantom_dicom import write_mr_series

    spool = Spool(tmp_path / "spool")
    sessions = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    source = write_mr_series(tmp_path / "mr", seed=5, slices=1, size=16, pixel_spacing=10.0, slice_spacing=10.0)
    ds = pydicom.dcmread(source.files[0])
    written = {}
    for age, series_uid in ((600, "1.2.826.0.1.3680043.8.498.9"), (60, "1.2.826.0.1.3680043.8.498.1")):  # the later under ".1"
        ds.SeriesInstanceUID = series_uid
        path = spool.path_for(ds.StudyInstanceUID, series_uid, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True)
        ds.save_as(path, enforce_file_format=True)
        os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
        written[age] = path
    recover_spool(spool, sessions)
    with sessions() as session:
        (row,) = session.scalars(select(Instance)).all()
    assert row.path == str(written[60]) and row.series_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert written[60].exists() and not written[600].exists()
