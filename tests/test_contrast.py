"""A T1 head model is sent T2, FLAIR and proton-density series, and other body parts, too when a
scanner routes everything to the node: each is told by its header (synthesis.contrast,
BodyPartExamined) and left unsynthesized with the reason, the T1 head beside it synthesized;
asked for by name, a series whose header does not tell its contrast, or names another body part,
is vouched for, a FLAIR one still refused. So is a post-contrast T1, whose header says an agent was
given, while the node takes unenhanced series (select_contrast_agent), and a fat-saturated T1
(select_fat_suppression)."""

from __future__ import annotations

import base64
import copy

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.ingest import SelectionRules
from dicom_node.local_stack import storescu
from dicom_node.models import AuditEvent, Job, Series
from dicom_node.settings import Settings
from synthesis.contrast import (body_part, body_part_json, contrast, contrast_agent, contrast_agent_json, contrast_json, series_headers,
                                fat_suppression, fat_suppression_json, learned_parts, parts_named, PHILIPS_SSFP, series_body_part, with_other_part)
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import api_token, series_once_complete, wait_for
from training.phantom_dicom import write_mr_series

# (ScanningSequence, TR, TE, TI or None) of protocols as scanners write them, and what they are
PROTOCOLS = [
    ("SE", "550", "12", None, "T1"),  # spin-echo T1
    ("GR", "8.2", "3.2", None, "T1"),  # 3D spoiled gradient echo (Philips T1 TFE, a Dixon's in-phase)
    ("GR\\IR", "2300", "2.98", "900", "T1"),  # MPRAGE
    ("GR\\IR", "8.5", "3.2", "450", "T1"),  # GE BRAVO
    ("SE", "4000", "100", None, "T2"),  # turbo spin-echo T2
    ("SE", "3200", "563", None, "T2"),  # 3D T2 SPACE (a long effective TE)
    ("EP", "5000", "89", None, "T2"),  # diffusion not labelled so: T2-weighted
    ("SE\\IR", "9000", "90", "2500", "FLUID_ATTENUATED"),  # FLAIR
    ("SE\\IR", "6000", "70", "150", "STIR"),
    ("SE", "3000", "15", None, "PROTON_DENSITY"),
    ("GR", "28", "20", None, "T2_STAR"),  # SWI's magnitude
    ("SE", "1500", "45", None, "UNKNOWN"),  # between them
    ("SE\\IR", "2000", "10", "2000", "UNKNOWN"),  # an inversion recovery of no textbook contrast
    ("SE\\IR", "6000", "70", "0", "UNKNOWN"),  # an inversion time of 0: none given, not a STIR
    ("SE", "550", "12", "0", "T1"),  # GE writes InversionTime 0 for sequences without one
]


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    return write_mr_series(tmp_path_factory.mktemp("mr"), seed=411, slices=2, size=16, pixel_spacing=8.0)


def _as_received(ds: Dataset, tmp_path) -> Dataset:
    """``ds`` written and read back: raw elements, as the node reads a C-STORE."""
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _timed(ds: Dataset, scanning: str, tr: str | None, te: str | None, ti: str | None) -> Dataset:
    ds.ScanningSequence = scanning
    for keyword, value in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti)):
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def test_the_contrast_is_read_from_the_timing_as_received_and_from_a_pacs_json(mr, tmp_path):
    for scanning, tr, te, ti, expected in PROTOCOLS:
        ds = _timed(pydicom.dcmread(mr.files[0]), scanning, tr, te, ti)
        told, why = contrast(_as_received(ds, tmp_path))
        assert told == expected, (scanning, tr, te, ti, why)
        assert f"TE {float(te):g} ms" in why
        as_json = ds.to_json_dict()
        assert contrast_json(as_json)[0] == expected
    bare = _timed(pydicom.dcmread(mr.files[0]), "SE", None, None, None)
    assert contrast(bare)[0] == "UNKNOWN" and "does not give the timing" in contrast(bare)[1]


def test_a_time_of_flight_angiogram_is_told_by_its_angio_flag_not_read_as_t1(mr, tmp_path):
    """A TOF angiogram's source images time like a T1 (a short-TR gradient echo); the MR Image
    module's Angio Flag says what they are, and the default selection (T1) leaves them."""
    for flag, expected in (("Y", "TOF"), ("N", "T1"), (None, "T1")):
        ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "22", "3.6", None)  # as a 3D TOF of the circle of Willis
        if flag is not None:
            ds.AngioFlag = flag
        told, why = contrast(_as_received(ds, tmp_path))
        assert told == expected, (flag, why)
        assert contrast_json(ds.to_json_dict())[0] == expected
    ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "22", "3.6", None)
    ds.AngioFlag = "Y"
    told, why = contrast(ds)
    assert why.startswith("Angio Flag (0018,0025) Y")
    series = Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", modality="MR", calling_ae=SCANNER_AE,
                    contrast=told, contrast_source=why)
    skip = SelectionRules().skip(series, ["axial"], (40, 40))
    assert skip is not None and skip.code == "contrast" and "TOF" in skip.reason


def test_a_steady_state_free_precession_and_an_enhanced_angiogram_are_told_by_their_pulse_sequence(mr, tmp_path):
    """A balanced SSFP (TrueFISP, FIESTA, balanced FFE) has TR and TE of a few milliseconds, which the
    timing reads as T1, but its CSF is bright: an enhanced image's Acquisition Contrast says MIXED
    and its pulse sequence says which; so do its Time of Flight and Phase Contrast, and a
    single-frame header's SequenceVariant TRSS. A spoiled gradient echo (LONGITUDINAL) stays T1."""
    cases = [
        ({"SteadyStatePulseSequence": "FREE_PRECESSION"}, "MIXED", "Steady State Pulse Sequence (0018,9017) FREE_PRECESSION"),
        ({"SteadyStatePulseSequence": "TRANSVERSE"}, "MIXED", "TRANSVERSE"),
        ({"SteadyStatePulseSequence": "TIME_REVERSED"}, "MIXED", "TIME_REVERSED"),
        ({"SteadyStatePulseSequence": "LONGITUDINAL"}, "T1", "short TR and TE"),
        ({"SteadyStatePulseSequence": "NONE"}, "T1", "short TR and TE"),
        ({"TimeOfFlightContrast": "YES", "SteadyStatePulseSequence": "LONGITUDINAL"}, "TOF", "Time of Flight Contrast (0018,9015) YES"),
        ({"TimeOfFlightContrast": "NO"}, "T1", "short TR and TE"),
        ({"PhaseContrast": "YES"}, "FLOW_ENCODED", "Phase Contrast (0018,9014) YES"),
        ({"SequenceVariant": ["SK", "TRSS"]}, "MIXED", "SequenceVariant (0018,0021) TRSS"),
        ({"SequenceVariant": ["SK", "SS", "SP"]}, "T1", "short TR and TE"),
        ({"SequenceVariant": "SS"}, "T1", "short TR and TE"),  # steady state, spoiled or not: not said
    ]
    for said, expected, why_part in cases:
        ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)  # as a 3D balanced SSFP of the internal auditory canals
        ds.AcquisitionContrast = "MIXED"
        for keyword, value in said.items():
            setattr(ds, keyword, value)
        told, why = contrast(_as_received(ds, tmp_path))
        assert (told, why_part in why) == (expected, True), (said, why)
        assert contrast_json(ds.to_json_dict())[0] == expected, said
    ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)
    ds.SteadyStatePulseSequence = "FREE_PRECESSION"
    ds.AcquisitionContrast = "T2"  # a scanner that names the contrast is taken at its word
    assert contrast(ds)[0] == "T2"
    del ds.AcquisitionContrast
    told, why = contrast(ds)
    series = Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", modality="MR", calling_ae=SCANNER_AE,
                    contrast=told, contrast_source=why)
    skip = SelectionRules().skip(series, ["axial"], (40, 40))
    assert skip is not None and skip.code == "contrast" and "MIXED" in skip.reason and "FREE_PRECESSION" in skip.reason


def test_a_series_sent_again_with_corrected_headers_is_judged_by_what_they_say_now(node_factory, tmp_path):
    """A technologist who corrects what a series' later slices said (NECK where they show the head,
    an agent entered by mistake) and sends those instances again gets the series judged by what its
    headers say now: synthesized. Until 2026-12-06 a series once told a head and neck, or
    post-contrast, stayed so whatever was sent again."""
    node = node_factory()
    neck, agent = (write_mr_series(tmp_path / name, seed=seed, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                                   series_description=name) for name, seed in (("t1_neck_by_mistake", 441), ("t1_gd_by_mistake", 442)))
    ordered = {each.series_uid: sorted(each.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
               for each in (neck, agent)}

    def later_slices_say(series, **values: str) -> list:
        for path in ordered[series.series_uid][2:]:
            ds = pydicom.dcmread(path)
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
        return ordered[series.series_uid][2:]

    later_slices_say(neck, BodyPartExamined="NECK")
    later_slices_say(agent, ContrastBolusAgent="GADOBUTROL")
    for each in (neck, agent):
        assert storescu(ordered[each.series_uid], node.port, NODE_AE, SCANNER_AE).returncode == 0
    told = {each.series_uid: series_once_complete(node.database_url, each.series_uid) for each in (neck, agent)}
    assert [(row.state, row.reason_code) for row in told.values()] == [("ignored", "body_part"), ("ignored", "contrast_agent")]
    corrected = [*later_slices_say(neck, BodyPartExamined="HEAD"), *later_slices_say(agent, ContrastBolusAgent="")]
    sent = storescu(corrected, node.port, NODE_AE, SCANNER_AE)  # the same SOP Instance UIDs, their headers corrected
    assert sent.returncode == 0, sent.stderr
    for each in (neck, agent):
        assert wait_for_job(node.database_url, each.series_uid, timeout=120).state == "done"
    with init_db(node.database_url)() as session:
        rows = [session.get(Series, each.series_uid) for each in (neck, agent)]
        assert [(row.body_part, row.contrast_agent, row.headers_stale, row.instance_count) for row in rows] == [
            ("HEAD", "WITHOUT", False, 4), ("HEAD", "WITHOUT", False, 4)]

def _private_told_three_ways(ds: Dataset, tmp_path, group: int, creator: str, element: int, value: str) -> tuple[list[str], str]:
    """The contrast of ``ds``, whose private block of ``creator`` holds ``value`` at ``element``: as
    received (explicit VR), read from an implicit VR file (its private values raw bytes), and from a
    PACS's JSON where the element comes as UN (InlineBinary); and why, as received."""
    told, why = contrast(_as_received(ds, tmp_path))
    implicit = copy.deepcopy(ds)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm")
    as_json = ds.to_json_dict()
    block = next(key for key in as_json if key.startswith(f"{group:04X}00") and as_json[key]["Value"] == [creator])
    encoded = value.encode() + b" " * (len(value) % 2)
    as_json[f"{group:04X}{block[-2:]}{element:02X}"] = {"vr": "UN", "InlineBinary": base64.b64encode(encoded).decode()}
    return [told, contrast(pydicom.dcmread(tmp_path / "implicit.dcm"))[0], contrast_json(as_json)[0]], why


def test_a_siemens_or_philips_single_frame_ssfp_is_told_by_its_sequence_name_not_read_as_t1(mr, tmp_path):
    """A single-frame TrueFISP or CISS (the internal auditory canals, a cine) says what it is only
    by its vendor's name: Siemens' SequenceName stem, Philips' Scanning Technique Description in its
    private block (read as received, in implicit VR where it comes as raw bytes, and from a PACS's
    JSON where an unknown private element comes as UN). Siemens' turboFLASH (MPRAGE) and FLASH, and
    Philips' T1-TFE, are spoiled and stay T1."""
    for name, expected in (("*tfi2d1_12", "MIXED"), ("*ci3d1", "MIXED"), ("*fi3d1", "MIXED"), ("*psif3d1", "MIXED"),
                           ("*de3d1", "MIXED"), ("*tfl3d1_16ns", "T1"), ("*fl2d1", "T1"), ("*fl3d1_ns", "T1"), ("tfi", "T1")):
        ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)
        ds.SequenceName = name
        told, why = contrast(_as_received(ds, tmp_path))
        assert told == expected and contrast_json(ds.to_json_dict())[0] == expected, (name, why)
        if expected == "MIXED":
            assert why.startswith(f"SequenceName (0018,0024) {name.upper()!r}: Siemens "), why
    for technique, expected in (("B-TFE", "MIXED"), ("B-FFE", "MIXED"), ("T2-FFE", "MIXED"), ("T1TFE", "T1"), ("FFE", "T1")):
        ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)
        ds.Manufacturer = "Philips Medical Systems"
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x20, "LO", technique)
        told, why = _private_told_three_ways(ds, tmp_path, 0x2001, "Philips Imaging DD 001", 0x20, technique)
        assert told == [expected] * 3, (technique, why)
        if expected == "MIXED":
            assert why == f"Philips' Scanning Technique (2001,xx20) {technique}: {PHILIPS_SSFP[technique]}, T2/T1 contrast", why
    ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)
    ds.Manufacturer = "Philips Healthcare"
    ds.private_block(0x2001, "Another Vendor", create=True).add_new(0x20, "LO", "B-TFE")  # another creator's block says nothing
    assert contrast(ds)[0] == "T1"


def test_a_ge_fiesta_is_told_by_its_private_pulse_sequence_name_not_read_as_t1(mr, tmp_path):
    """GE names its sequences in the private block of creator GEMS_ACQU_01: the product name in
    (0019,xx9C), lower case, and an internal name in (0019,xx9E). A FIESTA (balanced SSFP) or an
    SSFP (GE's time-reversed one) there is MIXED, read as received, in implicit VR and from a PACS's
    JSON; GE's spoiled gradient echoes (efgre3d, fspgr) stay T1, and so does the name in another
    creator's block or in an image another manufacturer made."""
    def ge(name: str, element: int = 0x9C, creator: str = "GEMS_ACQU_01", manufacturer: str = "GE MEDICAL SYSTEMS") -> Dataset:
        ds = _timed(pydicom.dcmread(mr.files[0]), "GR", "4.2", "2.1", None)
        ds.Manufacturer = manufacturer
        ds.private_block(0x0019, creator, create=True).add_new(element, "LO", name)
        return ds

    for name, element, expected in (("fiesta", 0x9C, "MIXED"), ("3dfiesta", 0x9C, "MIXED"), ("FIESTA-C", 0x9E, "MIXED"),
                                    ("3D FIESTA", 0x9E, "MIXED"), ("ssfp", 0x9C, "MIXED"), ("efgre3d", 0x9C, "T1"),
                                    ("fspgr", 0x9C, "T1"), ("FSE-XL", 0x9E, "T1")):
        told, why = _private_told_three_ways(ge(name, element), tmp_path, 0x0019, "GEMS_ACQU_01", element, name)
        assert told == [expected] * 3, (name, why)
        if expected == "MIXED":
            label = "Pulse Sequence Name (0019,xx9C)" if element == 0x9C else "Internal Pulse Sequence Name (0019,xx9E)"
            assert why.startswith(f"GE's {label} {name.upper()!r}: ") and why.endswith(", T2/T1 contrast"), why
    assert contrast(ge("fiesta", creator="GEMS_OTHER_01"))[0] == "T1"
    assert contrast(ge("fiesta", manufacturer="SIEMENS"))[0] == "T1"
    assert contrast(ge("fiesta", manufacturer="GE HEALTHCARE"))[0] == "MIXED"

def test_an_enhanced_image_says_its_contrast_or_its_functional_groups_give_the_timing(mr):
    ds = _timed(pydicom.dcmread(mr.files[0]), "SE", None, None, None)
    del ds.ScanningSequence
    ds.AcquisitionContrast = "FLUID_ATTENUATED"
    assert contrast(ds) == ("FLUID_ATTENUATED", "Acquisition Contrast (0008,9209)")
    ds.AcquisitionContrast = "MIXED"  # frames differ: the shared frame type, then the timing
    frame_type, timing, echo, modifier = Dataset(), Dataset(), Dataset(), Dataset()
    frame_type.AcquisitionContrast = "UNKNOWN"
    timing.RepetitionTime, echo.EffectiveEchoTime = 4500.0, 110.0
    modifier.InversionRecovery = "NO"
    shared = Dataset()
    shared.MRImageFrameTypeSequence, shared.MRTimingAndRelatedParametersSequence = [frame_type], [timing]
    shared.MREchoSequence, shared.MRModifierSequence = [echo], [modifier]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.EchoPulseSequence = "SPIN"
    assert contrast(ds)[0] == "T2" and contrast_json(ds.to_json_dict())[0] == "T2"
    modifier.InversionRecovery, modifier.InversionTimes = "YES", [2400.0]
    assert contrast(ds)[0] == "FLUID_ATTENUATED"
    frame_type.AcquisitionContrast = "T1"
    assert contrast(ds) == ("T1", "Acquisition Contrast (0008,9209) of the shared MR Image Frame Type")
    assert contrast_json(ds.to_json_dict())[0] == "T1"


def test_a_legacy_converted_image_gives_the_timing_among_its_unassigned_converted_attributes(mr, tmp_path):
    """A legacy converter (highdicom's here) keeps ScanningSequence, TR and TE, which no functional
    group holds, in the Unassigned Shared Converted Attributes: read there (until this was, every
    legacy converted series read UNKNOWN and was left)."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for timing, expected in ((("GR", "500", "10", None), "T1"), (("SE", "4000", "100", None), "T2")):
        singles = [_timed(pydicom.dcmread(f), *timing) for f in mr.files]
        image = hd.legacy.LegacyConvertedEnhancedMRImage(singles, series_instance_uid=str(generate_uid()), series_number=5,
                                                         sop_instance_uid=str(generate_uid()), instance_number=1,
                                                         transfer_syntax_uid=ExplicitVRLittleEndian)
        assert "RepetitionTime" not in image
        path = tmp_path / f"{expected}.dcm"
        image.save_as(path, enforce_file_format=True)
        assert contrast(pydicom.dcmread(path))[0] == expected
        assert contrast_json(image.to_json_dict())[0] == expected


def test_each_example_protocol_reads_as_its_contrast_and_sample_mr_writes_it(tmp_path):
    """What `mr2ct sample-mr --contrast` (a series for an administrator to check the node's rule
    with) and the QA's interlock write is read back as the contrast asked for."""
    import subprocess
    import sys

    from synthesis.contrast import EXAMPLE_TIMINGS

    for told, timing in EXAMPLE_TIMINGS.items():
        series = write_mr_series(tmp_path / told, seed=418, slices=1, size=16, pixel_spacing=8.0, mr_timing=timing)
        assert contrast(pydicom.dcmread(series.files[0]))[0] == told
    made = subprocess.run([sys.executable, "-m", "dicom_node.cli", "sample-mr", "--out", str(tmp_path / "flair"), "--slices", "2",
                           "--size", "32", "--pixel-spacing", "6", "--contrast", "fluid_attenuated"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and "header FLUID_ATTENUATED" in made.stdout, made.stderr[-2000:]
    files = sorted((tmp_path / "flair").glob("*.dcm"))
    assert len(files) == 2 and contrast(pydicom.dcmread(files[0]))[0] == "FLUID_ATTENUATED"
    bad = subprocess.run([sys.executable, "-m", "dicom_node.cli", "sample-mr", "--out", str(tmp_path / "bad"), "--contrast", "T3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--contrast 'T3' is none of T1, T2" in bad.stderr, bad.stderr[-2000:]


def test_the_rule_is_the_sites_to_widen_and_a_wrong_value_names_the_key():
    t2 = Series(modality="MR", series_description="", instance_count=20, orientation="axial", contrast="T2",
                contrast_source="ScanningSequence SE, TR 4000 ms, TE 100 ms: long TE")
    default = SelectionRules(contrasts=tuple(Settings().select_acquisition_contrasts))
    assert default.reason_to_skip(t2) == ("its MR contrast is T2 (ScanningSequence SE, TR 4000 ms, TE 100 ms: long TE), not one of "
                                          "select_acquisition_contrasts ['T1']")
    assert SelectionRules(contrasts=tuple(Settings(select_acquisition_contrasts="t1, t2").select_acquisition_contrasts)).reason_to_skip(t2) is None
    assert SelectionRules(contrasts=tuple(Settings(select_acquisition_contrasts="").select_acquisition_contrasts)).reason_to_skip(t2) is None
    before = Series(modality="MR", series_description="", instance_count=20, orientation="axial")  # recorded before migration 0024
    assert default.reason_to_skip(before) is None
    with pytest.raises(ValueError, match="select_acquisition_contrasts"):
        Settings(select_acquisition_contrasts="T1,T3")


def test_a_contrast_agent_is_read_from_the_header_as_received_from_an_enhanced_image_and_from_a_pacs_json(mr, tmp_path):
    """A post-gadolinium T1 is T1 by its timing; whether an agent was given is a second answer:
    Contrast/Bolus Agent naming one (a value that says none, or none at all, is WITHOUT), an agent
    sequence item or ingredient, or an enhanced image's usage groups, any frame's YES counting."""
    from pydicom.sequence import Sequence

    for agent, expected in (("Gadobutrol", "WITH"), ("DOTAREM 0.5 mmol/ml", "WITH"), ("NONE", "WITHOUT"), ("no contrast", "WITHOUT"),
                            ("N/A", "WITHOUT"), ("-", "WITHOUT"), ("", "WITHOUT"), (None, "WITHOUT")):
        ds = pydicom.dcmread(mr.files[0])
        if agent is not None:
            ds.ContrastBolusAgent = agent
        told, why = contrast_agent(_as_received(ds, tmp_path))
        assert told == expected, (agent, why)
        assert contrast_agent_json(ds.to_json_dict())[0] == expected, agent
        assert contrast(ds)[0] == "T1"  # the timing's answer is untouched
    assert contrast_agent(_as_received(ds, tmp_path))[1] == "no contrast agent in the header (Contrast/Bolus Agent (0018,0010) empty or absent)"
    named = pydicom.dcmread(mr.files[0])
    named.ContrastBolusAgent = "Gadobutrol"
    assert contrast_agent(named) == ("WITH", "Contrast/Bolus Agent (0018,0010) 'GADOBUTROL'")
    coded = pydicom.dcmread(mr.files[0])  # the agent as a code only, and as an ingredient only
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "C-17800", "SRT", "Gadolinium"
    coded.ContrastBolusAgentSequence = Sequence([item])
    assert contrast_agent(coded)[0] == "WITH" and contrast_agent_json(coded.to_json_dict())[0] == "WITH"
    del coded.ContrastBolusAgentSequence
    coded.ContrastBolusIngredient = "GADOLINIUM"
    assert contrast_agent(coded) == ("WITH", "Contrast/Bolus Ingredient (0018,1048) 'GADOLINIUM'")

    def usage(*administered: str) -> list[Dataset]:
        frames = []
        for said in administered:
            used, frame = Dataset(), Dataset()
            used.ContrastBolusAgentNumber, used.ContrastBolusAgentAdministered = 1, said
            frame.ContrastBolusUsageSequence = [used]
            frames.append(frame)
        return frames

    enhanced = Dataset()
    enhanced.SharedFunctionalGroupsSequence = [Dataset()]
    enhanced.PerFrameFunctionalGroupsSequence = usage("NO", "NO", "YES")  # a dynamic series: enhanced from its third frame
    assert contrast_agent(enhanced)[0] == "WITH" and contrast_agent_json(enhanced.to_json_dict())[0] == "WITH"
    enhanced.PerFrameFunctionalGroupsSequence = usage("NO", "NO")
    enhanced.ContrastBolusAgent = "GADOBUTROL"  # named, and not administered to these frames: the usage groups say
    assert contrast_agent(enhanced) == ("WITHOUT", "Contrast/Bolus Agent Administered (0018,9342) NO in every Contrast/Bolus Usage "
                                        "functional group")
    assert contrast_agent_json(enhanced.to_json_dict())[0] == "WITHOUT"


def test_fat_suppression_is_read_from_scan_options_and_an_enhanced_images_pulse_sequence(mr, tmp_path):
    """FS in ScanOptions (DICOM's term, among a vendor's own options) or an enhanced image's
    Spectrally Selected Suppression FAT says fat was suppressed; a spatial saturation band (SAT1)
    or another option does not."""
    for options, expected in ((["PFP", "FS"], "WITH"), ("FS", "WITH"), (["SAT_GEMS", "EPI_GEMS", "PFF", "FS"], "WITH"),
                              (["SAT1", "PFP"], "WITHOUT"), ("", "WITHOUT"), (None, "WITHOUT")):
        ds = pydicom.dcmread(mr.files[0])
        if options is None:
            del ds.ScanOptions
        else:
            ds.ScanOptions = options
        told, why = fat_suppression(_as_received(ds, tmp_path))
        assert told == expected, (options, why)
        assert fat_suppression_json(ds.to_json_dict())[0] == expected, options
    ds = pydicom.dcmread(mr.files[0])
    ds.ScanOptions = ["PFP", "FS"]
    assert fat_suppression(ds) == ("WITH", "ScanOptions (0018,0022) PFP\\FS holds FS (fat saturation)")
    enhanced = Dataset()
    for said, expected in (("FAT", "WITH"), ("FAT_AND_WATER", "WITH"), ("NONE", "WITHOUT"), ("WATER", "WITHOUT")):
        enhanced.SpectrallySelectedSuppression = said
        enhanced.ScanOptions = "FS"  # the enhanced image's own term wins
        assert fat_suppression(enhanced) == (expected, f"Spectrally Selected Suppression (0018,9025) {said}")
        assert fat_suppression_json(enhanced.to_json_dict())[0] == expected


def test_the_fat_suppression_rule_is_the_sites_to_change():
    def series(fat: str) -> Series:
        return Series(modality="MR", series_description="", instance_count=20, orientation="axial", contrast="T1", contrast_source="",
                      contrast_agent="WITHOUT", contrast_agent_source="", fat_suppression=fat, fat_suppression_source=f"told {fat.lower()}")

    default = SelectionRules(fat_suppression=Settings().select_fat_suppression)
    assert default.reason_to_skip(series("WITH")) == "its header says fat was suppressed (told with), and select_fat_suppression is 'without'"
    assert default.reason_to_skip(series("WITHOUT")) is None and default.reason_to_skip(series("")) is None
    assert SelectionRules(fat_suppression=Settings(select_fat_suppression="any").select_fat_suppression).reason_to_skip(series("WITH")) is None
    with pytest.raises(ValueError, match="select_fat_suppression"):
        Settings(select_fat_suppression="FS")


def test_the_contrast_agent_rule_is_the_sites_to_change_and_a_wrong_value_names_the_key():
    def series(agent: str) -> Series:
        return Series(modality="MR", series_description="", instance_count=20, orientation="axial", contrast="T1", contrast_source="",
                      contrast_agent=agent, contrast_agent_source=f"told {agent.lower()}")

    default = SelectionRules(contrast_agent=Settings().select_contrast_agent)
    assert default.reason_to_skip(series("WITH")) == "its header says a contrast agent was given (told with), and select_contrast_agent is 'without'"
    assert default.reason_to_skip(series("WITHOUT")) is None
    assert default.reason_to_skip(series("")) is None  # recorded before migration 0025
    enhanced_only = SelectionRules(contrast_agent=Settings(select_contrast_agent="with").select_contrast_agent)
    assert enhanced_only.reason_to_skip(series("WITHOUT")) == ("its header says no contrast agent was given (told without), and "
                                                               "select_contrast_agent is 'with'")
    both = SelectionRules(contrast_agent=Settings(select_contrast_agent="any").select_contrast_agent)
    assert both.reason_to_skip(series("WITH")) is None and both.reason_to_skip(series("WITHOUT")) is None
    with pytest.raises(ValueError, match="select_contrast_agent"):
        Settings(select_contrast_agent="sometimes")


def test_a_body_part_other_than_a_head_is_left_and_one_not_given_passes():
    """The shipped model knows heads: BodyPartExamined HEAD, BRAIN or SKULL, or none given (as many
    head exams say), by default; an MR-only prostate series is left with the reason."""
    def series(part: str) -> Series:
        return Series(modality="MR", series_description="", instance_count=20, orientation="axial", contrast="T1",
                      contrast_source="", body_part=part)

    default = SelectionRules(body_parts=tuple(Settings().select_body_parts))
    assert default.reason_to_skip(series("PELVIS")) == ("BodyPartExamined 'PELVIS', not one of select_body_parts "
                                                        "['HEAD', 'BRAIN', 'SKULL', 'UNKNOWN']")
    assert [default.reason_to_skip(series(part)) for part in ("HEAD", "BRAIN", "SKULL", "")] == [None] * 4
    strict = SelectionRules(body_parts=tuple(Settings(select_body_parts="head,brain").select_body_parts))
    assert strict.reason_to_skip(series("")) == "BodyPartExamined is not given, not one of select_body_parts ['HEAD', 'BRAIN']"
    assert SelectionRules(body_parts=tuple(Settings(select_body_parts="").select_body_parts)).reason_to_skip(series("PELVIS")) is None
    with pytest.raises(ValueError, match="select_body_parts"):
        Settings(select_body_parts="HEAD,../etc")
    # a series whose instances name several parts (recorder.heed) passes when the site takes each of them
    assert default.reason_to_skip(series("HEAD\\NECK")) == ("its instances name BodyPartExamined 'HEAD' and 'NECK'; 'NECK' not one "
                                                             "of select_body_parts ['HEAD', 'BRAIN', 'SKULL', 'UNKNOWN']")
    assert default.reason_to_skip(series("BRAIN\\HEAD")) is None
    assert SelectionRules(body_parts=("HEAD", "NECK")).reason_to_skip(series("HEAD\\NECK")) is None


def test_every_instance_names_the_series_body_parts_in_the_order_first_named():
    """What recorder.heed records and the SR and the pull read alike: a part not named before is
    added, one named before or none given (UNKNOWN, or '' as the node records it) adds nothing."""
    told = ""
    for said in ("", "HEAD", "UNKNOWN", "HEAD", "NECK", "", "HEAD", "NECK"):
        told = with_other_part(told, said)
    assert told == "HEAD\\NECK" and parts_named(told) == ("HEAD", "NECK") and parts_named("") == parts_named("UNKNOWN") == ("UNKNOWN",)
    assert with_other_part("UNKNOWN", "PELVIS") == "PELVIS"

    def header(part: str | None) -> Dataset:
        ds = Dataset()
        if part is not None:
            ds.BodyPartExamined = part
        return ds

    assert series_body_part([header(None), header("HEAD"), header("NECK"), header(None)]) == "HEAD\\NECK"
    assert series_body_part([header(None), header("")]) == "UNKNOWN"


def test_the_body_part_is_read_as_received_and_from_a_pacs_json_and_a_head_has_three_names(mr, tmp_path):
    """What the pull records of each MR series (a card's mr_body_parts) is what the node selects on:
    BodyPartExamined, upper case, UNKNOWN when not given; a model that learned a HEAD knows BRAIN and SKULL."""
    ds = pydicom.dcmread(mr.files[0])
    for said, expected in (("HEAD", "HEAD"), ("pelvis", "PELVIS"), ("", "UNKNOWN"), (None, "UNKNOWN")):
        if said is None:
            del ds.BodyPartExamined
        else:
            ds.BodyPartExamined = said
        assert body_part(_as_received(ds, tmp_path)) == expected and body_part_json(ds.to_json_dict()) == expected, said
    assert learned_parts(["BRAIN"]) == {"HEAD", "BRAIN", "SKULL"} and learned_parts(["PELVIS"]) == {"PELVIS"}


def test_a_t2_flair_and_unknown_series_are_left_with_why_and_the_t1_beside_them_synthesized(node_factory, orthanc, tmp_path):
    node = node_factory()
    study = "1.2.826.0.1.3680043.8.498.412"

    def series(name: str, seed: int, scanning: str, tr: str | None, te: str | None, ti: str | None):
        made = write_mr_series(tmp_path / name, seed=seed, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                               series_description=name, study_uid=study)
        for path in made.files:
            _timed(pydicom.dcmread(path), scanning, tr, te, ti).save_as(path)
        return made

    t1 = write_mr_series(tmp_path / "t1", seed=413, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, study_uid=study)
    t2 = series("t2_tse_tra", 414, "SE", "4000", "100", None)
    flair = series("t2_flair_tra", 415, "SE\\IR", "9000", "90", "2500")
    unknown = series("t1_anonymised", 416, "SE", None, None, None)
    pelvis = series("t1_pelvis", 417, "SE", "550", "12", None)
    for path in pelvis.files:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "PELVIS"
        ds.save_as(path)
    post = write_mr_series(tmp_path / "t1_post", seed=419, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, study_uid=study,
                           series_description="t1_post_gd", contrast_agent="Gadobutrol")
    fat_sat = write_mr_series(tmp_path / "t1_fs", seed=420, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, study_uid=study,
                              series_description="t1_fs", fat_suppressed=True)
    for each in (t2, flair, unknown, pelvis, post, fat_sat, t1):
        assert storescu(each.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, t1.series_uid, timeout=120).state == "done"
    sessions = init_db(node.database_url)

    def ignored(uid: str) -> Series | None:
        with sessions() as session:
            row = session.get(Series, uid)
        return row if row is not None and row.state == "ignored" else None

    rows = {name: wait_for(lambda s=s: ignored(s.series_uid), 60, f"{name} ignored") for name, s in
            (("t2", t2), ("flair", flair), ("unknown", unknown), ("pelvis", pelvis), ("post", post), ("fat_sat", fat_sat))}
    assert rows["t2"].reason.startswith("its MR contrast is T2 (ScanningSequence SE, TR 4000 ms, TE 100 ms: long TE)")
    assert "FLUID_ATTENUATED" in rows["flair"].reason and "select_acquisition_contrasts ['T1']" in rows["flair"].reason
    assert "UNKNOWN" in rows["unknown"].reason and "list UNKNOWN" in rows["unknown"].reason
    assert rows["pelvis"].reason == "BodyPartExamined 'PELVIS', not one of select_body_parts ['HEAD', 'BRAIN', 'SKULL', 'UNKNOWN']"
    assert rows["post"].reason == ("its header says a contrast agent was given (Contrast/Bolus Agent (0018,0010) 'GADOBUTROL'), and "
                                   "select_contrast_agent is 'without'")
    assert rows["fat_sat"].reason == ("its header says fat was suppressed (ScanOptions (0018,0022) PFP\\FS holds FS (fat saturation)), "
                                      "and select_fat_suppression is 'without'")
    with sessions() as session:
        assert not session.scalars(select(Job).where(Job.series_instance_uid.in_(
            [t2.series_uid, flair.series_uid, unknown.series_uid, pelvis.series_uid, post.series_uid, fat_sat.series_uid]))).all()
    # asked for by name: the contrast its header does not tell and the body part are vouched for; the FLAIR is still no T1,
    # and the post-contrast T1 still enhanced
    for each in (flair, unknown, pelvis, post):
        for path in each.files:
            assert httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=orthanc.auth).status_code == 200
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'physicist')}"}
    url = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/synthesize"
    listed = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/series", params={"state": "ignored", "study_uid": study},
                       headers=admin, timeout=60).json()["items"]
    told = {item["series_instance_uid"]: (item["contrast"], item["body_part"], item["contrast_agent"], item["fat_suppression"])
            for item in listed}
    assert told == {t2.series_uid: ("T2", "HEAD", "WITHOUT", "WITHOUT"), flair.series_uid: ("FLUID_ATTENUATED", "HEAD", "WITHOUT", "WITHOUT"),
                    unknown.series_uid: ("UNKNOWN", "HEAD", "WITHOUT", "WITHOUT"), pelvis.series_uid: ("T1", "PELVIS", "WITHOUT", "WITHOUT"),
                    post.series_uid: ("T1", "HEAD", "WITH", "WITHOUT"),
                    fat_sat.series_uid: ("T1", "HEAD", "WITHOUT", "WITH")}  # what an administrator filtering the ignored series sees
    metrics = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/metrics", headers=admin, timeout=60).text
    assert {line for line in metrics.splitlines() if line.startswith("mr2ct_series_ignored{")} == {
        'mr2ct_series_ignored{contrast="T2",contrast_agent="without",fat_suppression="without"} 1',
        'mr2ct_series_ignored{contrast="FLUID_ATTENUATED",contrast_agent="without",fat_suppression="without"} 1',
        'mr2ct_series_ignored{contrast="UNKNOWN",contrast_agent="without",fat_suppression="without"} 1',
        'mr2ct_series_ignored{contrast="T1",contrast_agent="without",fat_suppression="without"} 1',  # the pelvis
        'mr2ct_series_ignored{contrast="T1",contrast_agent="with",fat_suppression="without"} 1',
        'mr2ct_series_ignored{contrast="T1",contrast_agent="without",fat_suppression="with"} 1'}
    assert 'mr2ct_series{state="ignored"} 6' in metrics.splitlines()
    by_reason = {line for line in metrics.splitlines() if line.startswith("mr2ct_series_ignored_by_reason{") and not line.endswith(" 0")}
    assert by_reason == {'mr2ct_series_ignored_by_reason{reason="contrast"} 3', 'mr2ct_series_ignored_by_reason{reason="body_part"} 1',
                         'mr2ct_series_ignored_by_reason{reason="contrast_agent"} 1',
                         'mr2ct_series_ignored_by_reason{reason="fat_suppression"} 1'}
    # which series a rule kept out, by its code: what an administrator asks after a protocol change, without parsing reasons
    series_url = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/series"
    for code, expected in (("contrast", (t2, flair, unknown)), ("contrast_agent", (post,)), ("fat_suppression", (fat_sat,)), ("modality", ())):
        found = httpx.get(series_url, params={"reason_code": code, "study_uid": study}, headers=admin, timeout=60).json()["items"]
        assert {item["series_instance_uid"] for item in found} == {s.series_uid for s in expected}, code
        assert all(item["reason_code"] == code for item in found)
    bad = httpx.get(series_url, params={"reason_code": "contrast agent"}, headers=admin, timeout=60)
    assert bad.status_code == 422 and "is not one of modality, planes" in bad.json()["detail"]
    refused = httpx.post(url, json={"series_uid": flair.series_uid}, headers=admin, timeout=60)
    assert refused.status_code == 422 and "its MR contrast is FLUID_ATTENUATED" in refused.json()["detail"], refused.text
    enhanced = httpx.post(url, json={"series_uid": post.series_uid}, headers=admin, timeout=60)
    assert enhanced.status_code == 422 and "select_contrast_agent is 'without'" in enhanced.json()["detail"], enhanced.text
    with sessions() as session:  # the copy from Orthanc it made is audited, refused or not (sent to an audit repository as such)
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "synthesis-requested",
                                                        AuditEvent.series_instance_uid == flair.series_uid)).all()
    assert [(r.outcome, r.actor, r.detail["source"]) for r in rows] == [("failure", "api:physicist", orthanc.url)]
    assert "its MR contrast is FLUID_ATTENUATED" in rows[0].detail["reason"]
    for each in (unknown, pelvis):
        asked = httpx.post(url, json={"series_uid": each.series_uid}, headers=admin, timeout=60)
        assert asked.status_code == 202, asked.text
        assert wait_for_job(node.database_url, each.series_uid, timeout=120).state == "done"


def test_the_series_headers_together_say_what_the_sr_records(mr):
    """The SR's source_mr_* parameters read every instance's header as the node judged the series:
    an agent on the second slice makes it WITH, a second slice read T2 makes it MIXED."""
    first, second = (pydicom.dcmread(path) for path in mr.files)
    assert series_headers([first, second])["contrast"][0] == "T1"
    said = series_headers([first, _timed(second, "SE", "4000", "100", None)])
    assert said["contrast"][0] == "MIXED" and said["contrast"][1].startswith("instances read T1 (") and "and T2 (" in said["contrast"][1]
    second.ContrastBolusAgent = "GADOTERATE"
    said = series_headers([first, second])
    assert said["contrast_agent"] == ("WITH", "another instance than the first: Contrast/Bolus Agent (0018,0010) 'GADOTERATE'")
    assert said["fat_suppression"][0] == "WITHOUT"


def test_a_series_whose_later_instances_alone_name_an_agent_or_read_another_contrast_is_left_with_why(node_factory, tmp_path):
    """The first instance's header is not the whole series': an agent named only from the third
    slice on (the injection given part way, or a technologist who filled it in late) makes the series
    post-contrast, slices whose timing reads T2 after T1 ones make it MIXED, and lower slices that
    say NECK after HEAD ones make it a head and neck; all three are left, each with why, and a T1
    series sent the same way is synthesized."""
    node = node_factory()

    def made(name: str, seed: int):
        return write_mr_series(tmp_path / name, seed=seed, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, series_description=name)

    late_agent, mixed, plain = made("t1_late_gd", 431), made("t1_then_t2", 432), made("t1_plain", 433)
    neck = made("t1_head_neck", 434)
    for path in late_agent.files[2:]:
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent, ds.ContrastBolusRoute = "GADOBUTROL", "IV"
        ds.save_as(path)
    for path in mixed.files[2:]:
        _timed(pydicom.dcmread(path), "SE", "4000", "100", None).save_as(path)
    in_order = sorted(neck.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    for path, part in zip(in_order, ("HEAD", "", "NECK", "NECK")):  # the second says none: no part
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = part
        ds.save_as(path)
    for each in (late_agent, mixed, neck, plain):  # in instance order: the unchanged first slices first
        sent = storescu(sorted(each.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber), node.port,
                        NODE_AE, SCANNER_AE)
        assert sent.returncode == 0, sent.stderr
    assert wait_for_job(node.database_url, plain.series_uid, timeout=120).state == "done"
    agent_row = series_once_complete(node.database_url, late_agent.series_uid)
    assert agent_row.state == "ignored" and agent_row.reason_code == "contrast_agent" and agent_row.contrast_agent == "WITH"
    assert agent_row.reason == ("its header says a contrast agent was given (another instance than the first: Contrast/Bolus Agent "
                                "(0018,0010) 'GADOBUTROL'), and select_contrast_agent is 'without'"), agent_row.reason
    mixed_row = series_once_complete(node.database_url, mixed.series_uid)
    assert mixed_row.state == "ignored" and mixed_row.reason_code == "contrast" and mixed_row.contrast == "MIXED"
    assert mixed_row.reason.startswith("its MR contrast is MIXED (instances read T1 (") and "and T2 (ScanningSequence SE, TR 4000 ms" \
        in mixed_row.reason, mixed_row.reason
    neck_row = series_once_complete(node.database_url, neck.series_uid)
    assert (neck_row.state, neck_row.reason_code, neck_row.body_part) == ("ignored", "body_part", "HEAD\\NECK")
    assert neck_row.reason == ("its instances name BodyPartExamined 'HEAD' and 'NECK'; 'NECK' not one of select_body_parts "
                               "['HEAD', 'BRAIN', 'SKULL', 'UNKNOWN']"), neck_row.reason
    with init_db(node.database_url)() as session:
        assert not session.scalars(select(Job).where(Job.series_instance_uid.in_([late_agent.series_uid, mixed.series_uid,
                                                                                   neck.series_uid]))).all()
