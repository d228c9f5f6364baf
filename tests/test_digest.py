"""An instance's content digest (dicom_node.digest): what tells a series sent again unchanged from
one that changed, whichever way its files travelled."""

from __future__ import annotations

import copy
import io
import random
import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless, UID)

from dicom_node.digest import instance_digest
from training.phantom_dicom import write_mr_series


@pytest.fixture(scope="module")
def slice_with_private_block(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    series = write_mr_series(tmp_path_factory.mktemp("digest"), seed=5, slices=1, size=32, pixel_spacing=6.0, slice_spacing=6.0)
    ds = pydicom.dcmread(series.files[0])
    block = ds.private_block(0x0029, "ACME MR 1.0", create=True)  # a vendor's block: read as UN in implicit VR
    block.add_new(0x10, "LO", "PROTOCOL A")
    block.add_new(0x11, "US", [3, 4])
    item = Dataset()
    item.CodeValue = "X1"
    block.add_new(0x12, "SQ", [item])  # a private sequence: implicit VR gives its items as UN bytes
    request = Dataset()
    request.ScheduledProcedureStepID = "SPS1"
    ds.RequestAttributesSequence = [request]
    return ds


def _travelled(ds: Dataset, syntax: UID, archive_meta: bool = False) -> Dataset:
    """``ds`` written in ``syntax`` and read back, as a node or an archive would hold it."""
    copied = copy.deepcopy(ds)
    if syntax.is_compressed:
        copied.compress(syntax, generate_instance_uid=False)
    else:
        copied.file_meta.TransferSyntaxUID = syntax
    if archive_meta:  # the File Meta header an archive writes when it stores (dcmtk's, as Orthanc's is)
        copied.file_meta.ImplementationClassUID = "1.2.276.0.7230010.3.0.3.6.7"
        copied.file_meta.ImplementationVersionName = "OFFIS_DCMTK_367"
        copied.file_meta.SourceApplicationEntityTitle = "MRSCANNER"
    encoded = io.BytesIO()
    copied.save_as(encoded, enforce_file_format=True, implicit_vr=True if syntax == ImplicitVRLittleEndian else None)
    return pydicom.dcmread(io.BytesIO(encoded.getvalue()))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless],
                         ids=lambda s: s.name)
def test_the_same_instance_in_another_transfer_syntax_has_the_same_digest(slice_with_private_block: Dataset, syntax: UID) -> None:
    explicit = _travelled(slice_with_private_block, ExplicitVRLittleEndian)
    other = _travelled(slice_with_private_block, syntax)
    assert other.file_meta.TransferSyntaxUID == syntax
    assert instance_digest(other) == instance_digest(explicit)


def test_a_vendor_block_whose_vrs_pydicom_guesses_otherwise_has_one_digest(slice_with_private_block: Dataset) -> None:
    """A private block pydicom's dictionary knows (Siemens' MR header) with values in other VRs
    than the dictionary's, as software versions write them: in implicit VR pydicom would convert
    them by its guess (DS read as IS, and refused); they are taken as the bytes they are."""
    ds = copy.deepcopy(slice_with_private_block)
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    for element in range(0x08, 0x30):
        block.add_new(element, "DS", f"{element * 1.5:.1f}")
    block.add_new(0x30, "OB", bytes(range(256)) * 8)  # a CSA-like binary header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's on the values its dictionary reads otherwise
        assert instance_digest(_travelled(ds, ImplicitVRLittleEndian)) == instance_digest(_travelled(ds, ExplicitVRLittleEndian))


def test_another_file_meta_header_does_not_change_the_digest(slice_with_private_block: Dataset) -> None:
    plain = _travelled(slice_with_private_block, ExplicitVRLittleEndian)
    archived = _travelled(slice_with_private_block, ExplicitVRLittleEndian, archive_meta=True)
    assert archived.file_meta.ImplementationClassUID != plain.file_meta.ImplementationClassUID
    assert instance_digest(archived) == instance_digest(plain)


@pytest.mark.parametrize("change", ["pixel", "patient name", "position", "private value", "private sequence item", "element added"])
def test_what_an_instance_says_changes_its_digest(slice_with_private_block: Dataset, change: str) -> None:
    before = instance_digest(_travelled(slice_with_private_block, ImplicitVRLittleEndian))
    ds = copy.deepcopy(slice_with_private_block)
    if change == "pixel":
        pixels = ds.pixel_array.copy()
        pixels[0, 0] += 1
        ds.PixelData = pixels.tobytes()
    elif change == "patient name":
        ds.PatientName = "OTHER^NAME"
    elif change == "position":
        ds.ImagePositionPatient = [float(v) + 0.5 for v in ds.ImagePositionPatient]
    elif change == "private value":
        ds[0x0029, 0x1010].value = "PROTOCOL B"
    elif change == "private sequence item":
        ds[0x0029, 0x1012].value[0].CodeValue = "X2"
    else:
        ds.ImageComments = "re-sent"
    after = instance_digest(_travelled(ds, ImplicitVRLittleEndian))
    assert after != before
    assert instance_digest(_travelled(ds, ExplicitVRLittleEndian)) == after


def test_the_pixels_read_after_the_digest_are_the_pixels(slice_with_private_block: Dataset) -> None:
    """The worker digests the data sets it then synthesizes: the digest leaves them readable as before."""
    ds = _travelled(slice_with_private_block, RLELossless)
    reference = _travelled(slice_with_private_block, ExplicitVRLittleEndian).pixel_array.copy()
    instance_digest(ds)
    assert (ds.pixel_array == reference).all()
    assert ds.PatientName == slice_with_private_block.PatientName


def test_files_other_tools_wrote_of_one_slice_have_one_digest() -> None:
    """pydicom's MR_small, as its maintainers converted it with other tools into other transfer
    syntaxes (big endian, RLE, JPEG-LS, JPEG 2000, pixel data with excess padding, Data Set Trailing
    Padding in some and not in others): one digest."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    digests = {name: instance_digest(pydicom.dcmread(folder / name)) for name in (
        "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_expb.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_padded.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")}
    assert len(set(digests.values())) == 1, digests


def test_a_damaged_header_pydicom_reads_gets_a_digest_not_an_exception(slice_with_private_block: Dataset) -> None:
    """The worker digests a series before it reads it into a volume: a header pydicom reads but
    cannot convert (an unknown VR, a File Meta value that is no UID) must reach the reading, whose
    error names what is wrong, not fail the job in the digest (~1 in 80 of these raised at first)."""
    encoded = io.BytesIO()
    slice_with_private_block.save_as(encoded, enforce_file_format=True)
    good = encoded.getvalue()
    rng = random.Random(7)
    read = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's on what it reads of them
        for _ in range(1500):
            damaged = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                damaged[rng.randint(132, 1200)] = rng.randint(0, 255)
            try:
                ds = pydicom.dcmread(io.BytesIO(bytes(damaged)))
            except Exception:  # the node refuses what pydicom cannot read at all (C-STORE validation)
                continue
            read += 1
            assert len(instance_digest(ds)) == 64
    assert read > 1000
