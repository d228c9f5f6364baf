"""Phase, real and imaginary images told by where scanners say so besides ImageType: DICOM's
Complex Image Component (0008,9208) and GE's private image type (0043,xx2F of GEMS_PARM_01),
read from files as received (raw elements, implicit VR too) and from a PACS's DICOMweb JSON."""

from __future__ import annotations

import base64

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.ingest import SelectionRules, validate
from dicom_node.models import Series
from dicom_node.settings import Settings
from synthesis.image_type import component, component_json, component_kind
from tests.helpers import as_ge
from training.phantom_dicom import write_mr_series


def _ge(path, code: int, *, other_creator_first: bool = False) -> Dataset:
    ds = pydicom.dcmread(path)
    if other_creator_first:  # GE's block is then 0x11, not 0x10: found by its creator, not by a fixed tag
        ds.add_new(0x00430010, "LO", "GEMS_IMAG_01")
    return as_ge(ds, code)


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    return write_mr_series(tmp_path_factory.mktemp("mr"), seed=401, slices=2, size=16, pixel_spacing=8.0)


def test_ge_phase_real_and_imaginary_are_told_by_the_private_element_as_received(mr, tmp_path):
    """Read as the node reads a C-STORE (raw elements, in explicit and in implicit VR, where the
    element comes without a VR), and in any block GE's creator holds."""
    for code, told in ((0, "MAGNITUDE"), (1, "PHASE"), (2, "REAL"), (3, "IMAGINARY")):
        for other_first in (False, True):
            ds = _ge(mr.files[0], code, other_creator_first=other_first)
            for implicit in (False, True):
                path = tmp_path / f"{code}-{other_first}-{implicit}.dcm"
                if implicit:
                    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
                ds.save_as(path, enforce_file_format=True)
                found = component(pydicom.dcmread(path))
                assert found is not None and found[0] == told, (code, other_first, implicit, found)
                assert "(0043,xx2F)" in found[1]
    assert component(pydicom.dcmread(mr.files[0])) is None  # a Siemens-like file says nothing there
    # another vendor's element at xx2F under another creator is not GE's
    ds = pydicom.dcmread(mr.files[0])
    ds.private_block(0x0043, "NOT_GE", create=True).add_new(0x2F, "SS", 1)
    assert component(ds) is None


def test_the_enhanced_mr_complex_image_component_is_read_at_the_top_or_in_the_shared_frame_type(mr):
    ds = pydicom.dcmread(mr.files[0])
    ds.ComplexImageComponent = "PHASE"
    assert component(ds) == ("PHASE", "Complex Image Component (0008,9208)")
    ds.ComplexImageComponent = "MIXED"  # frames differ: the shared group, when it says, is what all frames are
    frame_type = Dataset()
    frame_type.ComplexImageComponent = "REAL"
    shared = Dataset()
    shared.MRImageFrameTypeSequence = [frame_type]
    ds.SharedFunctionalGroupsSequence = [shared]
    assert component(ds)[0] == "REAL" and "shared MR Image Frame Type" in component(ds)[1]
    del ds.SharedFunctionalGroupsSequence
    assert component(ds)[0] == "MIXED" and component_kind(component(ds)) is None
    ds.ComplexImageComponent = "MAGNITUDE"
    assert component_kind(component(ds)) is None


def test_dicomweb_metadata_says_the_same_with_values_or_inline_binary():
    """A PACS's JSON may carry the private element with its VR (SS, a number) or as UN (InlineBinary)."""
    ge = {"00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "OTHER"]},
          "00430010": {"vr": "LO", "Value": ["GEMS_IMAG_01"]}, "00430011": {"vr": "LO", "Value": ["GEMS_PARM_01"]},
          "0043112F": {"vr": "SS", "Value": [1]}}
    assert component_json(ge) == ("PHASE", "GE's private image type (0043,xx2F) 1")
    ge["0043112F"] = {"vr": "UN", "InlineBinary": base64.b64encode((3).to_bytes(2, "little", signed=True)).decode()}
    assert component_kind(component_json(ge)) == ("complex", "GE's private image type (0043,xx2F) 3: IMAGINARY")
    ge["0043102F"] = {"vr": "SS", "Value": [1]}  # under the other creator's block: not GE's parameter
    del ge["0043112F"]
    assert component_json(ge) is None
    enhanced = {"00089208": {"vr": "CS", "Value": ["MIXED"]}, "52009229": {"vr": "SQ", "Value": [
        {"00189226": {"vr": "SQ", "Value": [{"00089208": {"vr": "CS", "Value": ["PHASE"]}}]}}]}}
    assert component_json(enhanced)[0] == "PHASE"
    assert component_json({"00089208": {"vr": "CS", "Value": ["MAGNITUDE"]}}) == ("MAGNITUDE", "Complex Image Component (0008,9208)")


def test_the_node_records_the_component_and_its_rule_is_the_sites_to_narrow(mr):
    """validate() carries it to the series row; select_complex_component_exclude decides, with a
    reason that says what told it; empty turns the rule off; a wrong value stops start-up naming the key."""
    ds = _ge(mr.files[0], 1)
    info = validate(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert (info.component, info.image_type) == ("PHASE", "ORIGINAL\\PRIMARY\\OTHER")
    series = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type=info.image_type,
                    component=info.component, component_source=info.component_source)
    default = SelectionRules(components_excluded=tuple(Settings().select_complex_component_exclude))
    reason = default.reason_to_skip(series)
    assert reason == ("GE's private image type (0043,xx2F) 1 says PHASE, excluded by select_complex_component_exclude (phase images)")
    magnitude = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type=info.image_type,
                       component="MAGNITUDE", component_source="GE's private image type (0043,xx2F) 0")
    assert default.reason_to_skip(magnitude) is None
    off = SelectionRules(components_excluded=tuple(Settings(select_complex_component_exclude="").select_complex_component_exclude))
    assert off.reason_to_skip(series) is None
    with pytest.raises(ValueError, match="select_complex_component_exclude"):
        Settings(select_complex_component_exclude="PHASE,ANGLE")


def test_siemens_and_philips_real_and_imaginary_images_are_told_by_their_image_type():
    """R and I where Siemens writes P third and Philips fourth (a phase-sensitive inversion
    recovery's real images among them): signed parts of the signal, not the magnitude the model knows."""
    default = SelectionRules()
    for image_type in ("ORIGINAL\\PRIMARY\\R\\ND", "ORIGINAL\\PRIMARY\\I\\ND", "ORIGINAL\\PRIMARY\\R_IR\\R\\IR"):
        series = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type=image_type)
        assert "(real or imaginary images)" in default.reason_to_skip(series), image_type
    for image_type in ("ORIGINAL\\PRIMARY\\M\\ND", "ORIGINAL\\PRIMARY\\M_IR\\M\\IR"):
        series = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type=image_type)
        assert default.reason_to_skip(series) is None, image_type
