"""A corpus of malformed MR instances (used by tests/test_malformed.py and bench/reliability.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, MRImageStorage


def make_variant(good: Path, folder: Path, name: str) -> Path:
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
    elif name == "position-out-of-range":  # 1e30 mm: on PostgreSQL its text did not fit the column, and held back every row after it
        ds.ImagePositionPatient = [1e30, -1e30, 1e30]
    elif name == "position-not-a-number":
        ds.ImagePositionPatient = ["NaN", "0", "0"]
    elif name == "frame-position-not-a-number":  # the geometry in functional groups, as enhanced multi-frame carries it
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        frame = Dataset()
        for sequence, keyword, value in (("PlanePositionSequence", "ImagePositionPatient", ["NaN", "0", "0"]),
                                         ("PlaneOrientationSequence", "ImageOrientationPatient", list(ds.ImageOrientationPatient)),
                                         ("PixelMeasuresSequence", "PixelSpacing", list(ds.PixelSpacing))):
            item = Dataset()
            setattr(item, keyword, value)
            setattr(frame, sequence, Sequence([item]))
        ds.NumberOfFrames = 1
        ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    elif name == "path-like-uid":
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../../tmp/evil"
    elif name == "path-like-series-uid":
        ds.SeriesInstanceUID = "../../../etc"
    elif name == "deep-sequence-nesting":
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        inner = Dataset()
        inner.CodeValue = "x"
        for _ in range(200):  # 200 levels of nested sequences in a private-free standard attribute
            outer = Dataset()
            outer.ContentSequence = Sequence([inner])
            inner = outer
        ds.ContentSequence = inner.ContentSequence
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
    elif name == "wrong-vr":
        # Rows (US, 2 bytes) re-encoded as a 4-byte UL in explicit VR: the value no longer fits its VR.
        at = raw.find(b"\x28\x00\x10\x00US")
        out.write_bytes(raw[:at] + b"\x28\x00\x10\x00UL\x04\x00" + struct.pack("<I", 2**31 + 64) + raw[at + 10 :])
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
    "position-out-of-range": {0xA900},
    "position-not-a-number": {0xA900},
    "frame-position-not-a-number": {0xA900},
    "path-like-uid": {0xC000},
    "path-like-series-uid": {0xC000},
    "deep-sequence-nesting": {0xA900, 0xC000},
    "wrong-vr": {0xA900, 0xC000},
}


