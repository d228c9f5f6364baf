"""Synthesis without a network: model files, volumes, inference shapes, CT and SR writers."""

from __future__ import annotations

import json
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
import pytest
import torch

from synthesis.ct_writer import SyntheticCTSeries
from synthesis.errors import ModelMismatch, SeriesNotUsable
from synthesis.infer import choose_device, synthesize
from synthesis.model_file import load_model, save_model
from synthesis.networks import ResnetGenerator
from synthesis.normalize import unit_to_hu
from synthesis.sr_writer import build_provenance_sr, read_provenance
from synthesis.volume import SCANNER_TRANSVERSE, assemble, axial_reslice, resample
from tests.helpers import dciodvfy
from training.phantom_dicom import write_mr_series

ROOT = "1.2.826.0.1.3680043.8.498."


def _card(**extra: object) -> dict:
    card = {
        "name": "test-run", "architecture": "resnet",
        "parameters": {"in_channels": 1, "out_channels": 1, "ngf": 4, "n_blocks": 1},
        "pixel_spacing_mm": 4.0, "normalization": {"method": "percentile", "low": 0.5, "high": 99.5},
        "hu_range": [-1024, 2048], "training": {"command": "test"},
    }
    card.update(extra)
    return card


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_model(path, ResnetGenerator(ngf=4, n_blocks=1), _card())
    return path


@pytest.fixture
def mr_series(tmp_path: Path):
    return write_mr_series(tmp_path / "mr", seed=2, slices=6, size=48, pixel_spacing=5.0, slice_spacing=10.0, shuffle_instance_numbers=True)


def test_a_card_that_does_not_match_its_weights_is_refused(tiny_model: Path) -> None:
    card_path = tiny_model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelMismatch, match="card belongs to other weights"):
        load_model(tiny_model)


def test_a_card_naming_another_architecture_size_is_refused(tiny_model: Path) -> None:
    card_path = tiny_model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["parameters"]["ngf"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelMismatch, match="do not fit the architecture"):
        load_model(tiny_model)


def test_a_missing_card_is_refused(tiny_model: Path) -> None:
    tiny_model.with_suffix(".json").unlink()
    with pytest.raises(ModelMismatch, match="card"):
        load_model(tiny_model)


def test_slices_are_sorted_along_the_normal_not_by_instance_number(mr_series) -> None:
    datasets = [pydicom.dcmread(f) for f in reversed(mr_series.files)]
    source = assemble(datasets)
    z = source.volume.positions[:, 2]
    assert list(z) == sorted(z)
    assert source.volume.slice_spacing == pytest.approx(10.0)
    assert [ds.SOPInstanceUID for ds in source.headers] == [pydicom.dcmread(f).SOPInstanceUID for f in mr_series.files]


def test_duplicate_positions_and_mixed_sizes_are_refused(mr_series) -> None:
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient
    with pytest.raises(SeriesNotUsable, match="share one position"):
        assemble(datasets)
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    datasets[2].Rows = 40
    with pytest.raises(SeriesNotUsable, match="mixed image sizes"):
        assemble(datasets)
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    del datasets[0].FrameOfReferenceUID  # it used to say "must share one FrameOfReferenceUID", as if two were named
    with pytest.raises(SeriesNotUsable, match=r"1 of the series' \d+ instances have no FrameOfReferenceUID"):
        assemble(datasets)
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    datasets[0].FrameOfReferenceUID = pydicom.uid.generate_uid()
    with pytest.raises(SeriesNotUsable, match="the instances name 2 frames of reference"):
        assemble(datasets)


def test_a_series_of_several_echoes_is_refused_saying_so(mr_series) -> None:
    """A dual-echo series repeats each position once per echo: the reason says so and what to do,
    where it said only that slices share a position."""
    first = [pydicom.dcmread(f) for f in mr_series.files]
    second = [pydicom.dcmread(f) for f in mr_series.files]
    for number, echo in ((1, first), (2, second)):
        for ds in echo:
            ds.EchoNumbers = number
    with pytest.raises(SeriesNotUsable, match=r"share one position: the series holds 2 echoes \(EchoNumbers\), one volume each; send one"):
        assemble(first + second)


def test_an_enhanced_diffusion_series_is_refused_naming_its_b_values(mr_series) -> None:
    """The same in one enhanced multi-frame instance (as Philips and newer Siemens scanners send
    diffusion): the b-values are in each frame's MR Diffusion functional group, not at the top
    level, and the reason used to be only that slices share a position."""
    singles = [pydicom.dcmread(f) for f in mr_series.files] + [pydicom.dcmread(f) for f in mr_series.files]
    for ds in singles[len(singles) // 2:]:
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        singles, series_instance_uid=str(singles[0].SeriesInstanceUID), series_number=5, sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1, transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    image = pydicom.dcmread(BytesIO(_saved(image)))
    for index, item in enumerate(image.PerFrameFunctionalGroupsSequence):
        diffusion = Dataset()
        diffusion.DiffusionBValue = 0 if index < len(singles) // 2 else 1000
        item.MRDiffusionSequence = [diffusion]
    with pytest.raises(SeriesNotUsable, match=r"share one position: the series holds 2 b-values \(DiffusionBValue\), one volume each"):
        assemble([image])


def _saved(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_blank_mr_is_refused_not_made_into_a_uniform_ct(tiny_model: Path) -> None:
    """An MR whose voxels all hold one value (a failed acquisition, a placeholder series) made a
    uniform sCT (~470 HU with the shipped model) until 2026-12-05; the job now fails saying why."""
    with pytest.raises(SeriesNotUsable, match="the MR has no contrast"):
        synthesize(np.full((2, 32, 32), 120.0, np.float32), (6.0, 6.0), load_model(tiny_model), torch.device("cpu"))
    nearly_blank = np.zeros((2, 32, 32), np.float32)
    nearly_blank[0, 10:20, 10:20] = 500.0  # a tenth of the slice: real signal, synthesized
    assert synthesize(nearly_blank, (6.0, 6.0), load_model(tiny_model), torch.device("cpu")).shape == (2, 32, 32)


def test_a_colour_series_is_refused_saying_so(mr_series) -> None:
    """An RGB image filed as MR (a colour map, a screenshot) failed its job with a numpy broadcast
    error; the reason now says what is wrong."""
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    colour = datasets[1]
    grey = colour.pixel_array
    colour.PixelData = np.repeat(grey[..., None], 3, axis=2).astype(grey.dtype).tobytes()
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    with pytest.raises(SeriesNotUsable, match="is not greyscale .SamplesPerPixel 3, PhotometricInterpretation RGB."):
        assemble(datasets)


def test_inference_keeps_the_mr_matrix_for_non_square_anisotropic_input(tiny_model: Path) -> None:
    model = load_model(tiny_model)
    voxels = np.random.default_rng(0).random((3, 50, 70)).astype(np.float32)
    hu = synthesize(voxels, (3.0, 5.5), model, choose_device("cpu").device, batch_size=2)
    assert hu.shape == voxels.shape
    assert hu.min() >= -1024 and hu.max() <= 3071


def test_percentiles_from_the_histogram_are_numpys() -> None:
    """The counting shortcut for integer-valued MR must give np.percentile's numbers exactly, and
    non-integer or huge-range volumes must take numpy's own path."""
    from synthesis.normalize import percentiles

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 4000))
        volume = rng.integers(-100, int(rng.integers(1, 5000)), n).astype(np.float32)
        qs = (*(float(q) for q in rng.uniform(0, 100, 3)), 0.0, 0.5, 99.5, 100.0)
        assert percentiles(volume, qs) == tuple(float(v) for v in np.percentile(volume, qs))
    for volume in (rng.random(1000).astype(np.float32) * 7, np.array([0.0, 2.0**30], np.float32), np.full(5, 3.0, np.float32)):
        assert percentiles(volume, (0.5, 99.5)) == tuple(float(v) for v in np.percentile(volume, (0.5, 99.5)))


def test_output_is_clipped_to_what_ct_storage_holds() -> None:
    assert unit_to_hu(np.array([-5.0, 5.0]), (-2000.0, 5000.0)).tolist() == [-1024.0, 3071.0]


def test_ct_uids_are_deterministic_and_change_with_the_model(tiny_model: Path, mr_series, tmp_path: Path) -> None:
    model = load_model(tiny_model)
    source = assemble([pydicom.dcmread(f) for f in mr_series.files])
    hu = np.zeros(source.volume.voxels.shape, dtype=np.float32)
    first = SyntheticCTSeries(source=source, hu=hu, model=model, uid_root=ROOT, device_label="cpu")
    again = SyntheticCTSeries(source=source, hu=hu, model=model, uid_root=ROOT, device_label="cpu")
    assert first.series_instance_uid == again.series_instance_uid
    assert first.sop_instance_uids == again.sop_instance_uids
    assert len(set(first.sop_instance_uids)) == len(mr_series.files)
    torch.manual_seed(1)
    other_path = tmp_path / "other.safetensors"
    save_model(other_path, ResnetGenerator(ngf=4, n_blocks=1), _card())
    other = SyntheticCTSeries(source=source, hu=hu, model=load_model(other_path), uid_root=ROOT, device_label="cpu")
    assert other.series_instance_uid != first.series_instance_uid
    assert not set(other.sop_instance_uids) & set(first.sop_instance_uids)


def test_each_ct_slice_uid_follows_its_mr_slice_so_a_late_slice_moves_none(tiny_model: Path, mr_series) -> None:
    """An MR slice that arrives late (a series made again with it) adds one sCT UID and leaves the
    others naming the same slices at the same positions; the n-th UID used to name whatever slice
    was n-th, so every UID after the late slice moved to another position."""
    model = load_model(tiny_model)
    datasets = [pydicom.dcmread(f) for f in mr_series.files]
    whole = assemble(datasets)
    late = whole.headers[2]
    early = assemble([ds for ds in datasets if ds.SOPInstanceUID != late.SOPInstanceUID])

    def uids(source) -> tuple[str, dict[float, str]]:
        ct = SyntheticCTSeries(source=source, hu=np.zeros(source.volume.voxels.shape, np.float32), model=model, uid_root=ROOT, device_label="cpu")
        return ct.series_instance_uid, {float(position[2]): uid for position, uid in zip(source.volume.positions, ct.sop_instance_uids)}

    (series_before, before), (series_after, after) = uids(early), uids(whole)
    assert series_before == series_after
    late_z = float(late.ImagePositionPatient[2])
    assert {z: uid for z, uid in after.items() if z != late_z} == before
    assert after[late_z] not in before.values()


def test_encoded_ct_instances_are_what_pydicom_writes_for_the_data_sets(tiny_model: Path, tmp_path: Path) -> None:
    """The fast encoder (shared elements encoded once per series) must give pydicom's bytes for every
    slice, Latin-1 patient name included, and read back to the HU that went in."""
    series = write_mr_series(tmp_path / "mr", seed=4, slices=5, size=40, pixel_spacing=5.0, slice_spacing=8.0, patient_name="Müller^Jörg")
    source = assemble([pydicom.dcmread(f) for f in series.files])
    hu = np.random.default_rng(0).integers(-1024, 3072, source.volume.voxels.shape).astype(np.float32)
    ct = SyntheticCTSeries(source=source, hu=hu, model=load_model(tiny_model), uid_root=ROOT, device_label="cpu")
    for index, ds in enumerate(ct.datasets):
        encoded = ct.encoded(index)
        reference = BytesIO()
        ds.save_as(reference, enforce_file_format=True)
        assert encoded == reference.getvalue()
        back = pydicom.dcmread(BytesIO(encoded))
        assert back.SOPInstanceUID == ct.sop_instance_uids[index]
        assert str(back.PatientName) == "Müller^Jörg"
        assert np.array_equal(back.pixel_array.astype(np.float32) * float(back.RescaleSlope) + float(back.RescaleIntercept), hu[index])


def test_ct_writer_refuses_a_volume_of_the_wrong_shape(tiny_model: Path, mr_series) -> None:
    source = assemble([pydicom.dcmread(f) for f in mr_series.files])
    with pytest.raises(ValueError, match="hu must be an array of shape"):
        SyntheticCTSeries(source=source, hu=np.zeros((1, 2, 3)), model=load_model(tiny_model), uid_root=ROOT, device_label="cpu")


def test_the_sr_round_trips_into_the_same_facts(tiny_model: Path, mr_series, tmp_path: Path) -> None:
    model = load_model(tiny_model)
    source = assemble([pydicom.dcmread(f) for f in mr_series.files])
    ct = SyntheticCTSeries(source=source, hu=np.zeros(source.volume.voxels.shape, np.float32), model=model, uid_root=ROOT, device_label="cpu (2 threads)")
    sr = build_provenance_sr(ct=ct, mr_headers=source.headers, uid_root=ROOT, processing_seconds=12.5, device_label="cpu (2 threads)")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    parsed = hd.sr.srread(path)
    assert isinstance(parsed, hd.sr.Comprehensive3DSR)
    facts = read_provenance(parsed)
    assert facts.source_series_uid == source.series_instance_uid
    assert facts.source_instance_uids == [ds.SOPInstanceUID for ds in source.headers]
    assert facts.derived_series_uid == ct.series_instance_uid
    assert facts.derived_instance_uids == ct.sop_instance_uids
    assert facts.processing_seconds == 12.5
    assert facts.compute_device == "cpu (2 threads)"
    assert facts.algorithm_version
    assert facts.parameters["model_sha256"] == model.sha256
    assert facts.parameters["architecture"] == "resnet"
    assert facts.parameters["n4_bias_correction"] == "off"
    assert facts.parameters["test_time_augmentation"] == "none"
    assert facts.parameters["slice_plane"] == "the acquired slices"
    # the contrast of the MR it was made from, beside the contrasts the model learned (this test card says none)
    assert facts.parameters["source_mr_contrast"] == "T1 (ScanningSequence GR, TR 500 ms, TE 10 ms: short TR and TE)"
    assert "mr_contrasts" not in model.card and facts.parameters["model_mr_contrasts"] == "not stated by its card"
    # and whether a contrast agent was given, beside whether the model learned enhanced images
    assert facts.parameters["source_mr_contrast_agent"] == ("WITHOUT (no contrast agent in the header (Contrast/Bolus Agent (0018,0010) "
                                                            "empty or absent))")
    assert facts.parameters["model_mr_contrast_agents"] == "not stated by its card"
    assert facts.parameters["source_mr_fat_suppression"].startswith("WITHOUT (no fat suppression in the header")
    assert facts.parameters["model_mr_fat_suppression"] == "not stated by its card"
    assert parsed.StudyInstanceUID == mr_series.study_uid


def _written_ct_and_sr(tmp_path: Path, tiny_model: Path, edit) -> tuple[Dataset, Path, Path]:
    """A 2-slice MR series with ``edit`` applied to each header, its first CT slice and its SR as
    files (what the node stores); returns the first MR header as read back after, and the paths."""
    series = write_mr_series(tmp_path / "mr", seed=3, slices=2, size=32, pixel_spacing=6.0, slice_spacing=10.0)
    datasets = []
    for path in series.files:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)
        datasets.append(pydicom.dcmread(path))
    source = assemble(datasets)
    ct = SyntheticCTSeries(source=source, hu=np.zeros(source.volume.voxels.shape, np.float32), model=load_model(tiny_model), uid_root=ROOT, device_label="cpu")
    sr = build_provenance_sr(ct=ct, mr_headers=source.headers, uid_root=ROOT, processing_seconds=1.0, device_label="cpu")
    (tmp_path / "ct.dcm").write_bytes(ct.encoded(0))
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    for written in ("ct.dcm", "sr.dcm"):
        errors, _, _ = dciodvfy(tmp_path / written)
        assert errors == [], (written, errors)
    # and the SR opens in dcmtk's SR reader, as DCMTK-based viewers read it (but for Korean ISO 2022
    # IR 149, a character set dcmtk 3.6.7 does not know: it reads the SR as if it named none, and stops)
    if "ISO 2022 IR 149" not in str(source.headers[0].get("SpecificCharacterSet", "")):
        read = subprocess.run(["dsr2xml", str(tmp_path / "sr.dcm")], capture_output=True, timeout=60)
        assert read.returncode == 0 and b"<report" in read.stdout, read.stderr.decode(errors="replace")
    return source.headers[0], tmp_path / "ct.dcm", tmp_path / "sr.dcm"


@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # as Japanese scanners send it
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # Korean
    ("ISO_IR 144", "Ivanov^Ivan=Иванов^Иван"),
], ids=["latin1", "utf8", "japanese-iso2022", "korean-iso2022", "cyrillic"])
def test_the_ct_and_sr_keep_the_mrs_character_set_and_names(tiny_model: Path, tmp_path: Path, charset, name) -> None:
    """A patient's name in the MR's character set comes back the same in the sCT and the SR, and both
    pass dciodvfy: until 2026-12-05 highdicom refused the SR of an MR in ISO 2022 with an empty
    first value (Japanese and Korean sites) and every such job failed."""
    def edit(ds: Dataset) -> None:
        ds.SpecificCharacterSet, ds.PatientName = charset, name
    _, *written = _written_ct_and_sr(tmp_path, tiny_model, edit)
    for path in written:
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == charset, path.name
        assert str(back.PatientName) == name, path.name


PATIENT_AND_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")


def test_an_mr_without_its_type2_patient_and_study_attributes_gets_its_ct_and_sr(tiny_model: Path, tmp_path: Path) -> None:
    """Exported and research MR often lack type 2 attributes outright; the SR failed with an
    AttributeError (highdicom reads PatientID and the rest) until 2026-12-05. Both outputs have them
    present and empty, as type 2 asks, and the MR's header is left as it came."""
    def edit(ds: Dataset) -> None:
        for keyword in PATIENT_AND_STUDY_TYPE2:
            delattr(ds, keyword)
    mr, *written = _written_ct_and_sr(tmp_path, tiny_model, edit)
    assert not any(keyword in mr for keyword in PATIENT_AND_STUDY_TYPE2)
    for path in written:
        back = pydicom.dcmread(path)
        assert all(keyword in back and not back[keyword].value for keyword in PATIENT_AND_STUDY_TYPE2), path.name


def test_patient_values_that_break_their_vrs_rules_are_carried_and_the_job_goes_on(tiny_model: Path, tmp_path: Path) -> None:
    """A weight written with a decimal comma ("70,5"), a slice thickness "4,25", a birth date
    1970-02-03, a sex "Female", a name without a caret: the CT and the SR say what the MR says (the
    thickness: the slice spacing, a number a planning system reads), whichever is written first,
    and the MR's header is left as read. Until 2026-12-07 the comma failed the job after its
    inference and highdicom failed the SR on the date and the sex."""
    series = write_mr_series(tmp_path / "mr", seed=3, slices=2, size=32, pixel_spacing=6.0, slice_spacing=10.0,
                             patient_name="ROE RICHARD")
    scanner_wrote = {"PatientWeight": ("DS", "70,5"), "SliceThickness": ("DS", "4,25"), "PatientBirthDate": ("DA", "1970-02-03"),
                     "PatientSex": ("CS", "Female")}
    for path in series.files:  # the bytes as such a scanner writes them: pydicom refuses to assign a comma to a DS
        ds = pydicom.dcmread(path)
        for keyword, (vr, text) in scanner_wrote.items():
            tag, value = Tag(keyword), text.encode() + b" " * (len(text) % 2)
            ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
        ds.save_as(path)
    source = assemble([pydicom.dcmread(path) for path in series.files])
    ct = SyntheticCTSeries(source=source, hu=np.zeros(source.volume.voxels.shape, np.float32), model=load_model(tiny_model), uid_root=ROOT,
                           device_label="cpu")
    first_ct = pydicom.dcmread(BytesIO(ct.encoded(0)))  # the CT first: the MR's elements are read before the SR is built
    sr = build_provenance_sr(ct=ct, mr_headers=source.headers, uid_root=ROOT, processing_seconds=1.0, device_label="cpu")
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    said = {"PatientWeight": "70,5", "PatientBirthDate": "1970-02-03", "PatientSex": "Female", "PatientName": "ROE RICHARD"}
    for ds in (source.headers[0], first_ct, pydicom.dcmread(tmp_path / "sr.dcm")):
        assert {k: str(ds.get(k, "")) for k in said} == said, ds.get("Modality")
    assert first_ct.SliceThickness == 10.0


def _lower_slice_says(part: str):
    """An edit: the MR's second slice (of two) says ``part``, the first HEAD, as the phantom writes."""
    return lambda ds: setattr(ds, "BodyPartExamined", part) if int(ds.InstanceNumber) == 2 else None


@pytest.mark.parametrize("edit, position, laterality, body_part", [
    (lambda ds: None, "HFS", None, "HEAD"),  # a head, as the phantom says: no laterality
    (lambda ds: delattr(ds, "PatientPosition"), "", None, "HEAD"),  # unknown stays unknown: never a guessed HFS
    (lambda ds: delattr(ds, "BodyPartExamined"), "HFS", "", None),  # what the MR shows is not said: laterality unknown
    (lambda ds: (setattr(ds, "BodyPartExamined", "KNEE"), setattr(ds, "Laterality", "R")), "HFS", "R", "KNEE"),  # the MR's side
    (_lower_slice_says("NECK"), "HFS", None, "HEADNECK"),  # DICOM's term for both, a series-level attribute
    (_lower_slice_says("BRAIN"), "HFS", None, "HEAD"),  # the brain is in the head
    (_lower_slice_says("KNEE"), "HFS", "", None),  # no one term: not said (the SR names both)
], ids=["as-sent", "no-patient-position", "no-body-part", "laterality", "head-and-neck", "brain-in-head", "two-parts"])
def test_the_ct_says_what_the_mr_says_of_position_and_laterality(tiny_model: Path, tmp_path: Path, edit, position, laterality,
                                                                  body_part) -> None:
    """PatientPosition (a planning system reads it) is the MR's or empty, never invented, and
    Laterality follows the MR so that the CT passes dciodvfy when the MR has no BodyPartExamined.
    BodyPartExamined is every MR slice's: an MR whose lower slices say NECK after HEAD ones makes
    a HEADNECK sCT (until 2026-12-06 it said the first slice's HEAD)."""
    _, ct_path, _ = _written_ct_and_sr(tmp_path, tiny_model, edit)
    ct = pydicom.dcmread(ct_path)
    assert ct.PatientPosition == position
    assert ct.get("Laterality") == laterality
    assert ct.get("BodyPartExamined") == body_part


@pytest.mark.parametrize("host_zone, mr_offset, expected_offset", [
    ("Asia/Tokyo", None, "+0900"),  # the MR says no zone: this host's local time, as DICOM reads it
    ("UTC", "-0500", "-0500"),  # the MR names its zone: the sCT's dates and times are written in it
    ("UTC", None, ""),  # UTC: date-times without an offset (dcmtk 3.6.7 refuses +0000), local like the rest
    ("Asia/Tokyo", "+0000", ""),  # the MR's zone is UTC: without one too, read in its TimezoneOffsetFromUTC
], ids=["host-local", "mr-offset", "host-utc", "mr-utc"])
def test_the_ct_and_sr_dates_and_times_are_local_like_the_mrs(tiny_model: Path, tmp_path: Path, monkeypatch,
                                                             host_zone, mr_offset, expected_offset) -> None:
    """DICOM dates and times without an offset are local time; a viewer shows the sCT's series time
    beside the MR's. Until 2026-12-05 they were written in UTC, hours off away from Greenwich. The
    SR opens in dcmtk's SR reader (``dsr2xml``), which until 2026-12-06 refused a report written in
    UTC: its check of DT takes an offset of +0000 for an invalid value."""
    import time as clock
    from datetime import datetime, timedelta, timezone

    monkeypatch.setenv("TZ", host_zone)
    clock.tzset()
    try:
        def edit(ds: Dataset) -> None:
            if mr_offset:
                ds.TimezoneOffsetFromUTC = mr_offset
        _, ct_path, sr_path = _written_ct_and_sr(tmp_path, tiny_model, edit)
    finally:
        monkeypatch.undo()
        clock.tzset()
    offset = expected_offset or "+0000"
    sign = 1 if offset[0] == "+" else -1
    expected_now = datetime.now(timezone.utc).replace(tzinfo=None) + sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:]))
    ct, sr = pydicom.dcmread(ct_path), pydicom.dcmread(sr_path)
    for ds, keywords in ((ct, ("SeriesDate", "SeriesTime")), (ct, ("ContentDate", "ContentTime")), (sr, ("ContentDate", "ContentTime")),
                         (sr, ("InstanceCreationDate", "InstanceCreationTime"))):
        written = datetime.strptime(ds.data_element(keywords[0]).value + ds.data_element(keywords[1]).value[:6], "%Y%m%d%H%M%S")
        assert abs(written - expected_now) < timedelta(minutes=2), (ds.Modality, keywords, written, expected_now)
    for when in (ct.ContributingEquipmentSequence[0].ContributionDateTime, sr.ContributingEquipmentSequence[0].ContributionDateTime,
                 *(item.DateTime for item in sr.ContentSequence if item.ValueType == "DATETIME")):
        assert len(when) == 14 + len(expected_offset) and when.endswith(expected_offset), when
    # (the SR opens in dcmtk's SR reader: _written_ct_and_sr reads it with dsr2xml)
    assert ct.get("TimezoneOffsetFromUTC") == mr_offset and sr.get("TimezoneOffsetFromUTC") == mr_offset
    assert str(read_provenance(hd.sr.srread(sr_path)).processed_at) == sr.ContentDate + sr.ContentTime


def test_the_sr_warm_up_builds_a_report() -> None:
    from synthesis.sr_writer import warm_up

    warm_up()  # raises if highdicom refuses the throw-away report


@pytest.mark.parametrize("architecture", ["unet", "fcn"])
def test_unet_and_fcn_model_files_load_and_keep_odd_matrices(tmp_path: Path, architecture: str) -> None:
    from synthesis.networks import GENERATORS

    path = tmp_path / f"{architecture}.safetensors"
    params = {"in_channels": 1, "out_channels": 1, "ngf": 4, "depth": 3}
    save_model(path, GENERATORS[architecture](**params), _card(architecture=architecture, parameters=params))
    model = load_model(path)
    assert model.generator.size_multiple == 8
    voxels = np.random.default_rng(1).random((2, 37, 45)).astype(np.float32)
    assert synthesize(voxels, (4.0, 4.0), model, choose_device("cpu").device).shape == voxels.shape


def test_n4_removes_most_of_a_bias_field_from_white_matter() -> None:
    from synthesis.normalize import n4_correct
    from training import phantoms

    grid = phantoms.axial_grid(16, 128, 2.0, 6.0)
    labels = phantoms.head_labels(8, grid)
    z, y, x = grid.coordinates()
    biased = phantoms.render_mr(labels, grid, 8) * (1.0 + 0.004 * x + 0.003 * y)  # a strong linear field on top
    corrected = n4_correct(biased, (2.0, 2.0))
    white = labels == phantoms.WHITE

    def cv(v: np.ndarray) -> float:
        return float(v[white].std() / v[white].mean())

    assert cv(corrected) < 0.7 * cv(biased)


def test_a_card_asking_for_n4_gets_it_before_normalisation(tiny_model: Path) -> None:
    from training import phantoms

    grid = phantoms.axial_grid(4, 48, 5.0, 10.0)
    z, y, x = grid.coordinates()
    voxels = (phantoms.render_mr(phantoms.head_labels(4, grid), grid, 4) * (1.0 + 0.005 * x) * 1000).astype(np.float32)
    device = choose_device("cpu").device
    without = synthesize(voxels, (5.0, 5.0), load_model(tiny_model), device)
    card_path = tiny_model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["n4_bias_correction"] = True
    card_path.write_text(json.dumps(card))
    with_n4 = synthesize(voxels, (5.0, 5.0), load_model(tiny_model), device)
    assert with_n4.shape == voxels.shape
    assert np.abs(with_n4 - without).mean() > 1.0  # the corrected MR is what the generator saw


def test_batch_size_zero_is_sized_automatically(tiny_model: Path) -> None:
    from synthesis.infer import CPU_BATCH, auto_batch_size

    model = load_model(tiny_model)
    device = choose_device("cpu").device
    assert auto_batch_size(model.generator, (64, 64), device, None) == CPU_BATCH
    voxels = np.random.default_rng(3).random((11, 40, 40)).astype(np.float32)
    assert synthesize(voxels, (4.0, 4.0), model, device, batch_size=0).shape == voxels.shape
    with pytest.raises(ValueError, match="batch_size"):
        synthesize(voxels, (4.0, 4.0), model, device, batch_size=-1)


def test_compiled_inference_gives_the_sct_of_eager_inference(tiny_model: Path) -> None:
    """torch_compile is a speed setting: the sCT must not change with it."""
    model = load_model(tiny_model)
    voxels = np.random.default_rng(5).uniform(0, 800, (3, 40, 48)).astype(np.float32)
    device = choose_device("cpu").device
    eager = synthesize(voxels, (4.0, 4.0), model, device, batch_size=3, precision="fp32")
    fused = synthesize(voxels, (4.0, 4.0), model, device, batch_size=3, precision="fp32", compile=True)
    assert fused.shape == eager.shape
    assert float(np.abs(fused - eager).max()) < 1.0  # HU


def test_guided_upsampling_keeps_an_mr_edge_sharp_and_flat_tissue_quiet() -> None:
    """A coarse-grid sCT brought back to the MR matrix: edges follow the MR, MR noise stays out."""
    import torch.nn.functional as F

    from synthesis.infer import guided_upsample

    rng = np.random.default_rng(0)
    guide = np.full((1, 1, 64, 64), -0.8, dtype=np.float32)
    guide[..., 29:] = 0.6  # a tissue boundary between two coarse pixels
    guide += rng.normal(0, 0.01, guide.shape).astype(np.float32)  # MR noise
    truth = torch.from_numpy(0.5 - guide)  # the sCT the full-resolution MR implies (contrast inverted)
    guide_t = torch.from_numpy(guide)
    guide_low = F.interpolate(guide_t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    output_low = 0.5 - guide_low  # what a perfect coarse-grid model would give
    bilinear = F.interpolate(output_low, size=(64, 64), mode="bilinear", align_corners=False)
    guided = guided_upsample(guide_t, guide_low, output_low)
    edge = slice(26, 33)
    assert float((guided - truth)[..., edge].abs().mean()) < 0.75 * float((bilinear - truth)[..., edge].abs().mean())
    flat = guided[..., :, :20]
    assert float(flat.std()) < 0.01  # the MR noise is not copied into flat tissue


def test_prepared_generators_do_not_keep_a_replaced_model_alive() -> None:
    """The node swaps models without a restart: the cached inference variants of an old model
    (bf16 copy, compiled fp32, compiled bf16) must not keep its weights in memory."""
    import gc
    import weakref

    from synthesis.infer import prepared

    generator = ResnetGenerator(ngf=4, n_blocks=1).eval()
    variants = [prepared(generator, dtype, compile) for dtype, compile in ((None, False), (torch.bfloat16, False), (None, True), (torch.float16, True))]
    assert variants[0] is generator and all(v is not generator for v in variants[1:])
    ref = weakref.ref(generator)
    del generator, variants
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_inference_stays_within_two_hu_of_fp32_inside_the_head(tmp_path: Path, precision: str) -> None:
    """bf16 is the default on bf16-capable machines, fp16 on GPUs without native bf16: neither may
    move the sCT by more than noise. Run with 8 views (0.86 HU for bf16 in bench/inference; 2.2 with
    one view): a CPU without native bf16 or fp16 emulates them ~5x slower than fp32, so the card's
    32 views on 6 slices took minutes there."""
    from synthesis.model_file import default_model_path

    series = write_mr_series(tmp_path / "mr", seed=21, slices=3, size=256, pixel_spacing=1.0, slice_spacing=4.0)
    voxels = np.stack([pydicom.dcmread(f).pixel_array for f in series.files]).astype(np.float32)
    model = load_model(default_model_path()).with_views("dihedral")
    device = choose_device("cpu").device
    fp32 = synthesize(voxels, (1.0, 1.0), model, device, batch_size=6, precision="fp32")
    low = synthesize(voxels, (1.0, 1.0), model, device, batch_size=6, precision=precision)
    head = series.labels > 0
    difference = float(np.abs(low - fp32)[head].mean())
    print(f"{precision} vs fp32 inside the head: {difference:.2f} HU")
    assert difference < 2.0


def _model_with_views(tmp_path: Path, mode: str) -> Path:
    torch.manual_seed(0)  # the same weights for every mode
    path = tmp_path / f"views-{mode}.safetensors"
    save_model(path, ResnetGenerator(ngf=4, n_blocks=1), _card(test_time_augmentation=mode))
    return path


def test_a_stop_asked_for_in_the_middle_of_a_batch_comes_before_the_batchs_other_views(tmp_path: Path) -> None:
    """A cancelled job (or a stopping service) must not wait for the rest of a batch: with the
    shifted dihedral views one batch is 32 forwards, tens of seconds on a small CPU. The stop is
    asked for before the batch and between its views, and nothing more is computed after a yes."""
    from synthesis.errors import Stopped

    model = load_model(_model_with_views(tmp_path, "dihedral-shift"))
    voxels = (np.random.default_rng(4).random((6, 32, 40)) * 1000).astype(np.float32)
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 3  # yes on the third question: after the batch's second view

    with pytest.raises(Stopped, match=r"after 0 of 6 slices; in the next batch: stopped after 2 of 32 test-time views"):
        synthesize(voxels, (4.0, 4.0), model, choose_device("cpu").device, batch_size=6, precision="fp32", should_stop=should_stop)
    assert len(asked) == 3
    never = synthesize(voxels, (4.0, 4.0), model, choose_device("cpu").device, batch_size=6, precision="fp32", should_stop=lambda: False)
    assert never.shape == voxels.shape  # a no all the way gives the whole volume


def test_progress_counts_every_view_of_every_batch_up_to_the_whole_volume(tmp_path: Path) -> None:
    """What the node shows of a running job (GET /jobs/{id} "progress", the dashboard, the demo's
    bar): the fraction of the slices synthesized, rising with each test-time view, not only per batch."""
    model = load_model(_model_with_views(tmp_path, "dihedral"))
    voxels = (np.random.default_rng(5).random((5, 32, 40)) * 1000).astype(np.float32)
    told: list[float] = []
    synthesize(voxels, (4.0, 4.0), model, choose_device("cpu").device, batch_size=2, precision="fp32", progress=told.append)
    assert len(told) == 3 * 8  # batches of 2, 2 and 1 slices, 8 views each
    assert told == sorted(told) and len(set(told)) == len(told)  # it only goes up
    assert told[7] == pytest.approx(2 / 5) and told[15] == pytest.approx(4 / 5) and told[-1] == pytest.approx(1.0)
    assert told[0] == pytest.approx(2 / 5 / 8)  # the first view of the first batch is an eighth of its two slices


@pytest.mark.parametrize(("mode", "mirror_alike", "transpose_alike"),
                         [("none", False, False), ("mirror", True, False), ("dihedral", True, True), ("dihedral-shift", True, True)])
def test_test_time_augmentation_makes_the_sct_independent_of_how_the_slice_is_turned(
    tmp_path: Path, mode: str, mirror_alike: bool, transpose_alike: bool
) -> None:
    """With mirror views the sCT of a left-right mirrored MR is the mirrored sCT (and so for the
    transpose with the dihedral views): what the network makes of a structure cannot depend on the
    side it lies on. One forward alone gives no such promise."""
    model = load_model(_model_with_views(tmp_path, mode))
    assert model.test_time_augmentation == mode
    voxels = (np.random.default_rng(1).random((3, 32, 40)) * 1000).astype(np.float32)  # on the 4 mm grid, no padding
    device = choose_device("cpu").device

    def sct(v: np.ndarray) -> np.ndarray:
        return synthesize(np.ascontiguousarray(v), (4.0, 4.0), model, device, batch_size=3, precision="fp32")

    plain = sct(voxels)
    mirrored = float(np.abs(sct(voxels[:, :, ::-1])[:, :, ::-1] - plain).max())
    upside_down = float(np.abs(sct(voxels[:, ::-1, :])[:, ::-1, :] - plain).max())
    transposed = float(np.abs(sct(voxels.transpose(0, 2, 1)).transpose(0, 2, 1) - plain).max())
    print(f"{mode}: largest change in HU, mirrored {mirrored:.3g}, upside down {upside_down:.3g}, transposed {transposed:.3g}")
    assert (mirrored < 0.01 and upside_down < 0.01) if mirror_alike else (mirrored > 1.0 and upside_down > 1.0)
    assert transposed < 0.01 if transpose_alike else transposed > 1.0


def test_shifted_views_make_the_sct_follow_a_head_moved_by_half_the_generators_stride(tmp_path: Path) -> None:
    """The generator downsamples by 4, so what it makes of a structure depends on where the
    structure sits on that stride grid: a head moved 2 pixels gets an sCT that is not merely the
    old one moved. The dihedral-shift views average over those positions, so the sCT follows the
    head far more closely (not exactly: the padded views see other borders)."""
    rng = np.random.default_rng(2)
    voxels = np.zeros((2, 64, 64), np.float32)
    voxels[:, 16:48, 16:48] = rng.random((2, 32, 32)) * 1000  # a "head" well inside the field of view
    moved = np.roll(voxels, (2, 2), axis=(1, 2))
    device = choose_device("cpu").device
    change = {}
    for mode in ("dihedral", "dihedral-shift"):
        model = load_model(_model_with_views(tmp_path, mode))
        plain, shifted = (synthesize(v, (4.0, 4.0), model, device, batch_size=2, precision="fp32") for v in (voxels, moved))
        change[mode] = float(np.abs(np.roll(plain, (2, 2), axis=(1, 2)) - shifted)[:, 18:46, 18:46].mean())
    print(f"mean change inside the head when it moves 2 pixels: {change}")
    assert change["dihedral"] > 10.0  # the stride grid shows
    assert change["dihedral-shift"] < change["dihedral"] / 10


def test_augmented_inference_is_recorded_in_the_uids_and_the_sr(tmp_path: Path, mr_series) -> None:
    """The same weights run with other views make other pixels: other UIDs, and the SR says which views."""
    plain, views = load_model(_model_with_views(tmp_path, "none")), load_model(_model_with_views(tmp_path, "dihedral"))
    assert plain.sha256 == views.sha256
    source = assemble([pydicom.dcmread(f) for f in mr_series.files])
    hu = np.zeros(source.volume.voxels.shape, np.float32)
    first = SyntheticCTSeries(source=source, hu=hu, model=plain, uid_root=ROOT, device_label="cpu")
    second = SyntheticCTSeries(source=source, hu=hu, model=views, uid_root=ROOT, device_label="cpu")
    assert first.series_instance_uid != second.series_instance_uid
    assert not set(first.sop_instance_uids) & set(second.sop_instance_uids)
    assert "test-time augmentation dihedral" in second.datasets[0].DerivationDescription
    sr = build_provenance_sr(ct=second, mr_headers=source.headers, uid_root=ROOT, processing_seconds=1.0, device_label="cpu")
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert read_provenance(hd.sr.srread(path)).parameters["test_time_augmentation"] == "dihedral"


def test_a_card_asking_for_unknown_views_is_refused(tmp_path: Path) -> None:
    path = _model_with_views(tmp_path, "none")
    card = json.loads(path.with_suffix(".json").read_text())
    card["test_time_augmentation"] = "rot45"
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelMismatch, match="test_time_augmentation 'rot45'; expected one of none, mirror, dihedral, dihedral-shift"):
        load_model(path)


def test_models_set_changes_the_views_in_the_card_and_keeps_the_weights(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _model_with_views(tmp_path, "none")
    before = load_model(path).sha256
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "models", "set", str(path), "--test-time-augmentation", "mirror"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = load_model(path)
    assert (model.sha256, model.test_time_augmentation) == (before, "mirror")
    assert model.card["card_changes"][-1]["test_time_augmentation"] == ["none", "mirror"]
    refused = subprocess.run([sys.executable, "-m", "dicom_node.cli", "models", "set", str(path), "--test-time-augmentation", "all"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "test_time_augmentation must be one of none, mirror, dihedral, dihedral-shift, got 'all'" in refused.stderr
    assert load_model(path).test_time_augmentation == "mirror"


@pytest.mark.parametrize("position, acquired", [("HFP", "sagittal"), ("FFS", "sagittal"), ("HFDL", "sagittal"), ("FFP", "oblique")])
def test_axial_ct_slices_of_a_prone_or_feet_first_patient_are_oriented_as_a_ct_scanner_writes_them(tiny_model: Path, tmp_path: Path,
                                                                                                    position, acquired) -> None:
    """``ct_plane = axial`` of a 3D sagittal MR (its axial slices) or a tilted axial one (resampled
    onto transverse slices): the transverse sCT of a patient positioned ``position``
    is written in the orientation a CT scanner writes for it (before 2026-12-07 always head first
    supine's 1\\0\\0\\0\\1\\0, which a planning system that expects a prone patient's own orientation
    does not take), holding the same HU at the same points as the head-first-supine writing of the
    same sCT, each instance dciodvfy clean."""
    series = write_mr_series(tmp_path / "mr", seed=41, orientation=acquired, size=24, columns=20, pixel_spacing=5.0,
                             slices=20 if acquired == "sagittal" else 8, slice_spacing=5.0)
    written = {}
    for said in ("HFS", position):
        datasets = [pydicom.dcmread(f) for f in series.files]
        for ds in datasets:
            ds.PatientPosition = said
        source = assemble(datasets)
        reslice, _ = axial_reslice(source.volume)
        assert (reslice is not None) == (acquired == "sagittal")
        hu = np.random.default_rng(7).integers(-1000, 2000, source.volume.voxels.shape).astype(np.float32)
        ct = SyntheticCTSeries(source=source, hu=hu, model=load_model(tiny_model), uid_root=ROOT, device_label="cpu", reslice=reslice,
                               ct_plane="axial")
        written[said] = [pydicom.dcmread(BytesIO(ct.encoded(i))) for i in range(len(ct))]
    for ds in written[position]:
        assert tuple(float(v) for v in ds.ImageOrientationPatient) == SCANNER_TRANSVERSE[position]
        assert ds.PatientPosition == position
    supine, turned = assemble(written["HFS"]).volume, assemble(written[position]).volume
    assert sorted(turned.voxels.shape) == sorted(supine.voxels.shape)
    sampled = resample(supine, turned)
    assert not np.isnan(sampled).any() and (sampled == turned.voxels).all()  # whole HU at the same points
    path = tmp_path / "ct.dcm"
    written[position][len(written[position]) // 2].save_as(path, enforce_file_format=True)
    errors, _, _ = dciodvfy(path)
    assert errors == [], errors
