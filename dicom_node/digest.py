"""What an instance says, as one SHA-256 that does not depend on how it travelled.

The same MR slice reaches the node in different files: in another transfer syntax (a sender that
prefers implicit VR, an Orthanc that stores losslessly compressed), behind another File Meta
header (Orthanc writes its own when it stores, so a worker reading originals from Orthanc sees
other bytes than the spool holds), with sequences of defined or undefined length. A digest of the
file's bytes tells all of these apart and so made an unchanged series again. This digest walks the
data set instead: every element but the File Meta group and trailing padding, its value encoded
one way (implicit VR little endian, sequences item by item), and the pixels as decoded. Lossless
compression keeps it; a changed pixel, name or position changes it; lossy compression changes it
too (other pixels).
"""

from __future__ import annotations

import hashlib
import io
import struct

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.sequence import Sequence

PIXEL_DATA = 0x7FE00010
EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
TRAILING_PADDING = 0xFFFCFFFC  # Data Set Trailing Padding (PS3.10 7.2)
ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
SCHEME = b"mr2ct-instance-digest-1"  # a change of what is digested changes this, and so every digest


def instance_digest(ds: Dataset) -> str:
    """The SHA-256 (hex) of ``ds``'s content (see the module's docstring). Reads pixels through
    ``ds.pixel_array`` (pydicom keeps the array for whoever reads it next); a little-endian raw
    element is taken as its bytes, a sequence (and, in big endian, any element) converted as reading
    it would. Never raises for a data set pydicom could read: what cannot be
    converted is digested as its bytes (reading the series says what is wrong with it)."""
    whole = hashlib.sha256(SCHEME)
    little_endian = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) != EXPLICIT_BIG_ENDIAN
    try:
        correct_ambiguous_vr(ds, little_endian)  # US or SS, OB or OW: as an explicit writer would
    except Exception:  # an element that does not convert: its own turn below digests its bytes
        pass
    _feed(ds, whole, _encodings(ds), top=True, little_endian=little_endian)
    return whole.hexdigest()


def _encodings(ds: Dataset) -> str | list[str]:
    try:
        return ds._character_set
    except Exception:  # a Specific Character Set that does not convert: pydicom's default
        return default_encoding


def _sequence_in(value: object, encodings: str | list[str]) -> Sequence | None:
    """A UN value that holds items (a private sequence read in implicit VR, whose dictionary
    pydicom lacks), as its items; None when it is not one."""
    if not isinstance(value, bytes) or not value.startswith(ITEM):
        return None
    try:
        return read_sequence(io.BytesIO(value), True, True, len(value), encodings)
    except Exception:
        return None


def _put(whole: "hashlib._Hash", value: bytes) -> None:
    """One value into the digest, behind its length (so that no two sequences of values read alike)."""
    whole.update(struct.pack("<Q", len(value)))
    whole.update(value)


def _bytes_of(value: object) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else repr(value).encode()


def _implicit_buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    return buffer


def _vr_of(raw: RawDataElement) -> str | None:
    """A raw element's VR: as written (explicit VR), else the public dictionary's (None for a
    private or unknown element: its VR is known only once converted)."""
    if raw.VR is not None:
        return raw.VR
    if raw.tag.is_private:
        return None
    try:
        return dictionary_VR(raw.tag)
    except KeyError:
        return None


def _put_items(items: Sequence, whole: "hashlib._Hash", encodings: str | list[str], little_endian: bool) -> None:
    whole.update(b"SQ" + struct.pack("<I", len(items)))
    for item in items:
        whole.update(b"item")
        _feed(item, whole, encodings, top=False, little_endian=little_endian)
    whole.update(b"end")


def _feed(ds: Dataset, whole: "hashlib._Hash", encodings: str | list[str], top: bool, little_endian: bool) -> None:
    for tag in sorted(ds.keys()):
        if tag >> 16 == 0x0002 or tag == TRAILING_PADDING:  # what the file says, not the instance (padding is to be ignored)
            continue
        whole.update(struct.pack("<I", tag))
        try:
            raw = ds.get_item(tag)
        except Exception:  # an element pydicom cannot even hold (an unknown VR): reading the series says so
            _put(whole, b"unreadable")
            continue
        if little_endian and isinstance(raw, RawDataElement) and tag != PIXEL_DATA and isinstance(raw.value, bytes):
            vr = _vr_of(raw)
            # a private element in implicit VR (or UN): its VR is unknown; pydicom's private dictionary
            # would guess one, not always what the scanner wrote, so it is taken as bytes unless its bytes are items
            items = _sequence_in(raw.value, encodings) if vr in (None, "UN") else None
            if items is not None:
                _put_items(items, whole, encodings, little_endian)
                continue
            if vr != "SQ":
                _put(whole, raw.value)  # as it came: the same bytes in implicit and explicit VR little endian
                continue
        try:
            element = ds[tag]
        except Exception:  # a value pydicom cannot convert: its bytes as they came
            _put(whole, b"raw" + _bytes_of(getattr(raw, "value", None)))
            continue
        items = element.value if element.VR == "SQ" else _sequence_in(element.value, encodings) if element.VR == "UN" else None
        if items is not None:
            _put_items(items, whole, encodings, little_endian)
        elif tag == PIXEL_DATA and top:
            try:
                pixels = ds.pixel_array
            except Exception:  # pixels that do not decode: their bytes (reading the series says what is wrong with them)
                _put(whole, b"raw" + _bytes_of(element.value))
                continue
            pixels = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)  # big endian's pixels, as numbers
            _put(whole, f"{pixels.dtype.str}{pixels.shape}".encode())
            _put(whole, pixels.tobytes())
        else:
            buffer = _implicit_buffer()
            try:
                write_data_element(buffer, element, encodings)
                _put(whole, buffer.getvalue()[8:])  # after the implicit header: tag and length
            except Exception:
                _put(whole, b"repr" + repr(element.value).encode())
