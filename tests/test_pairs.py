"""`mr2ct evaluate --pairs`: a model scored on a hospital's own MR/CT pairs (DICOM files), the CT
resampled onto the MR's voxels in patient space. Phantom pairs written as DICOM stand in for
patients: the same heads the phantom evaluation scores, so the two paths must agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from synthesis.errors import SeriesNotUsable
from synthesis.volume import Volume, resample
from tests.helpers import as_ge, shipped_weights_with_views
from training import phantoms
from training.evaluate import HELD_OUT_SEED_BASE
from training.phantom_dicom import write_mr_series


def _volume(grid: phantoms.Grid, voxels: np.ndarray, frame: str = "1.2.826.0.1.3680043.8.498.1") -> Volume:
    return grid.volume(voxels, frame)


def _linear(grid: phantoms.Grid) -> np.ndarray:
    z, y, x = grid.coordinates()
    return 2.0 * x + 3.0 * y - z


def test_resampling_follows_patient_space_and_leaves_what_the_ct_does_not_reach_empty() -> None:
    """Trilinear sampling reproduces a field linear in patient coordinates exactly, across
    orientations, spacings and extents; points beyond the moving volume are NaN."""
    mr = phantoms.oriented_grid("oblique", 6, 160, 160, 1.5, 6.0)
    ct = phantoms.oriented_grid("axial", 40, 130, 130, 2.0, 3.0)  # 258 mm square, 117 mm long
    sampled = resample(_volume(ct, _linear(ct)), _volume(mr, _linear(mr)))
    z, y, x = mr.coordinates()
    well_inside = (np.abs(x) < 128) & (np.abs(y) < 128) & (np.abs(z) < 58)
    outside = (np.abs(x) > 129.01) | (np.abs(y) > 129.01) | (np.abs(z) > 58.51)
    assert well_inside.sum() > 0.9 * well_inside.size and outside.sum() > 1000
    assert not np.isnan(sampled[well_inside]).any()
    assert np.abs(sampled[well_inside] - _linear(mr)[well_inside]).max() < 0.01
    assert np.isnan(sampled[outside]).all()
    # A volume onto itself is itself, edges included.
    same = _volume(mr, _linear(mr))
    assert np.array_equal(resample(same, same), same.voxels)
    with pytest.raises(SeriesNotUsable, match="frame of reference"):
        resample(_volume(ct, _linear(ct), frame="1.2.3"), same)


def _pair(folder: Path, subject: int, patient: str, **ct_grid: float) -> tuple[str, str]:
    """Held-out phantom subject ``subject`` (as `mr2ct evaluate` scores it: 4 slices 30 mm apart,
    1 mm) as an MR series and a CT series in one frame of reference, the CT on its own grid."""
    mr = write_mr_series(folder / "mr", seed=HELD_OUT_SEED_BASE + subject, slices=4, size=256, pixel_spacing=1.0,
                         slice_spacing=30.0, patient_id=patient)
    grid = {"slices": 4, "size": 256, "pixel_spacing": 1.0, "slice_spacing": 30.0, **ct_grid}
    ct = write_mr_series(folder / "ct", seed=HELD_OUT_SEED_BASE + subject, modality="CT", study_uid=mr.study_uid,
                         patient_id=patient, **grid)  # type: ignore[arg-type]
    for path in ct.files:  # registered to the MR, as a planning CT and its MR are
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = mr.frame_of_reference_uid
        ds.save_as(path)
    return mr.series_uid, ct.series_uid


def _evaluate(*args: str, views: str | None = "none") -> subprocess.CompletedProcess[str]:
    """`mr2ct evaluate`; ``views``: its --test-time-augmentation, one forward unless a test is about
    views (None: the card's own, 32 for the shipped model: ~0.3 slices/s at 256x256 on 2 fp32 cores)."""
    chosen = ["--test-time-augmentation", views] if views else []
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", *args, *chosen], capture_output=True, text=True, timeout=600)


def _copy_as_series(patient: Path, name: str, change, first: int | None = None) -> str:
    """The patient's MR series (its ``first`` files) copied as a new series in ``patient/name``,
    each data set passed through ``change``; the new Series Instance UID."""
    uid = pydicom.uid.generate_uid()
    (patient / name).mkdir()
    for i, path in enumerate(sorted((patient / "mr").glob("*.dcm"))[:first]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        change(ds)
        ds.save_as(patient / name / f"{i}.dcm")
    return uid


def test_evaluate_pairs_scores_dicom_pairs_as_the_phantom_evaluation_scores_the_same_heads(tmp_path: Path) -> None:
    matched = tmp_path / "matched"
    uids = [_pair(matched / f"patient-{s}", s, f"PAT{s}") for s in range(2)]
    write_mr_series(matched / "mr-without-ct", seed=5, slices=4, size=64, pixel_spacing=4.0, slice_spacing=30.0, patient_id="PAT9")
    # An sCT exported with the study (mr2ct's own: same frame as the MR, more instances than the CT) is no ground truth.
    synthetic = sorted((matched / "patient-0" / "ct").glob("*.dcm"))
    synthetic_uid = pydicom.uid.generate_uid()
    for i, path in enumerate([*synthetic, *synthetic]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SyntheticData = synthetic_uid, pydicom.uid.generate_uid(), "YES"
        ds.PixelData = np.zeros((256, 256), np.uint16).tobytes()
        (matched / "patient-0" / "sct").mkdir(exist_ok=True)
        ds.save_as(matched / "patient-0" / "sct" / f"{i}.dcm")
    # The exam's localizer (ImageType LOCALIZER, the MR's frame) is no volume to score: it used to be paired with the CT.
    localizer_uid = _copy_as_series(matched / "patient-1", "localizer",
                                    lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]), first=3)
    # Nor is a Siemens mosaic (fMRI, diffusion: a volume's slices tiled in each image) in the CT's frame.
    mosaic_uid = _copy_as_series(matched / "patient-1", "mosaic", lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]),
                                 first=2)
    # Nor are phase images (a field map's phase series, ImageType ... P ...: angles, not tissue): they were paired too.
    phase_uid = _copy_as_series(matched / "patient-0", "phase", lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "P", "ND"]))
    # Nor GE's phase images: ImageType ORIGINAL\\PRIMARY\\OTHER, the component in (0043,xx2F) of GEMS_PARM_01 (1: phase).
    ge_phase_uid = _copy_as_series(matched / "patient-0", "ge-phase", lambda ds: as_ge(ds, 1))
    (matched / "README.txt").write_text("not DICOM")
    phantom = _evaluate("--json", "--subjects", "2", "--slices", "4")
    assert phantom.returncode == 0, phantom.stderr
    panel = tmp_path / "panel.png"
    result = _evaluate("--pairs", str(matched), "--panel", str(panel))
    assert result.returncode == 0, result.stderr
    report, expected = json.loads(result.stdout.strip().splitlines()[-1]), json.loads(phantom.stdout.strip().splitlines()[-1])
    # Same heads, same model: the same MAE up to the body outline (here the sinus air inside the head
    # counts) and the CT stored as whole HU.
    assert report["mae_hu"] == pytest.approx(expected["mae_hu"], abs=1.5)
    assert report["mae_linear_hu"] == pytest.approx(expected["mae_linear_hu"], rel=0.05)
    assert report["mae_hu"] < report["mae_linear_hu"] and report["mae_paired_hu"] is None
    assert {(p["mr_series_uid"], p["ct_series_uid"]) for p in report["pairs"]} == set(uids)
    assert all(p["ct_coverage"] == 1.0 and p["slices"] == 4 for p in report["pairs"])
    assert set(report["mae_by_tissue"]) == {"air", "soft tissue", "bone"}
    assert report["mae_by_tissue"]["bone"] > report["mae_by_tissue"]["soft tissue"]
    assert any("not DICOM" in reason for reason in report["left_out"])
    assert any("no CT series of the same patient" in reason for reason in report["left_out"])
    assert any(synthetic_uid in reason and "not a ground truth" in reason for reason in report["left_out"])
    assert any(localizer_uid in reason and "a localizer" in reason for reason in report["left_out"])
    assert any(mosaic_uid in reason and "a mosaic (ImageType MOSAIC)" in reason for reason in report["left_out"])
    assert any(phase_uid in reason and "phase images (ImageType P)" in reason for reason in report["left_out"])
    assert any(ge_phase_uid in reason and "phase images (GE's private image type (0043,xx2F) 1: PHASE)" in reason
               for reason in report["left_out"])
    assert panel.stat().st_size > 10_000
    assert "PAT0" not in result.stdout + result.stderr and "PHANTOM^HEAD" not in result.stdout + result.stderr

    # The CT on its own finer grid, not aligned with the MR's voxels (0.9 mm, 2 mm slices): resampled
    # in patient space it scores near the aligned one (a sharper truth interpolated, not another head).
    # A CT that reaches half of the MR's slices is scored there only.
    own_grid = tmp_path / "own-grid"
    _pair(own_grid / "patient-0", 0, "PAT0", slices=61, size=300, pixel_spacing=0.9, slice_spacing=2.0)
    _pair(own_grid / "patient-1", 1, "PAT1", slices=31, size=256, pixel_spacing=1.0, slice_spacing=1.0)
    resampled = _evaluate("--pairs", str(own_grid), "--json")
    assert resampled.returncode == 0, resampled.stderr
    scores = json.loads(resampled.stdout.strip().splitlines()[-1])
    coverage = sorted(p["ct_coverage"] for p in scores["pairs"])
    assert coverage == [0.5, 1.0]
    aligned = {p["mr_series_uid"]: p["mae_hu"] for p in report["pairs"]}
    for p in scores["pairs"]:
        if p["ct_coverage"] == 1.0:
            assert p["mae_hu"] == pytest.approx(aligned[p["mr_series_uid"]], rel=0.15)


def test_evaluate_pairs_says_why_nothing_could_be_scored(tmp_path: Path) -> None:
    write_mr_series(tmp_path / "only-mr", seed=3, slices=4, size=64, pixel_spacing=4.0, slice_spacing=30.0)
    result = _evaluate("--pairs", str(tmp_path))
    assert result.returncode == 2
    assert "no MR series" in result.stderr and "no CT series of the same patient in its frame of reference" in result.stderr
    missing = _evaluate("--pairs", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    recorded = _evaluate("--pairs", str(tmp_path), "--record")
    assert recorded.returncode == 2 and "--record" in recorded.stderr


def _registration(path: Path, mr_frame: str, ct_frame: str, ct_to_mr: np.ndarray, patient: str, study_uid: str | None = None) -> str:
    """A Spatial Registration whose registered frame is the MR's: the CT's item carries the matrix
    that takes CT coordinates into the MR's (PS3.3 C.20.2)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    def item(frame: str, matrix: np.ndarray) -> Dataset:
        m = Dataset()
        m.FrameOfReferenceTransformationMatrix = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in matrix.ravel()]
        m.FrameOfReferenceTransformationMatrixType = "RIGID"
        registration = Dataset()
        registration.MatrixSequence = [m]
        registration.RegistrationTypeCodeSequence = []
        entry = Dataset()
        entry.FrameOfReferenceUID = frame
        entry.MatrixRegistrationSequence = [registration]
        return entry

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "REG", patient, generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.FrameOfReferenceUID = mr_frame
    ds.RegistrationSequence = [item(mr_frame, np.eye(4)), item(ct_frame, ct_to_mr)]
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


def _pair_in_two_frames(folder: Path, subject: int, patient: str) -> tuple[str, str, np.ndarray]:
    """``_pair``, with the CT moved into a frame of its own: the MR's turned 90 degrees about the
    patient's axis and shifted by whole pixels. Returns (MR frame, CT frame, the 4x4 matrix taking
    CT coordinates into the MR's), what a registration between them carries."""
    from pydicom.uid import generate_uid

    _pair(folder, subject, patient)
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    shift = np.array([12.0, -7.0, 0.0])
    ct_frame = generate_uid()
    mr_frame = ""
    for path in sorted((folder / "ct").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        mr_frame = str(ds.FrameOfReferenceUID)
        position = turn @ np.array([float(v) for v in ds.ImagePositionPatient]) + shift
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in [*(turn @ orientation[:3]), *(turn @ orientation[3:])]]
        ds.FrameOfReferenceUID = ct_frame
        ds.save_as(path)
    ct_to_mr = np.eye(4)
    ct_to_mr[:3, :3], ct_to_mr[:3, 3] = turn.T, -turn.T @ shift
    return mr_frame, ct_frame, ct_to_mr


def test_evaluate_pairs_follows_a_spatial_registration_between_the_mr_and_ct_frames(tmp_path: Path) -> None:
    """A planning CT in its own frame, related to the MR's by a REG: the CT is scored where the
    registration puts it. Here its frame is the MR's turned 90 degrees about the patient's axis
    and shifted by whole pixels, so the registered CT lands on the MR's voxels exactly and scores
    as the CT in the MR's own frame does; without the REG the pair is not made."""
    same = tmp_path / "same-frame"
    mr_uid, _ = _pair(same / "patient", 0, "PAT0")
    reference = _evaluate("--pairs", str(same), "--json")
    assert reference.returncode == 0, reference.stderr

    registered = tmp_path / "registered"
    mr_frame, ct_frame, ct_to_mr = _pair_in_two_frames(registered / "patient", 0, "PAT0")
    unrelated = _evaluate("--pairs", str(registered))
    assert unrelated.returncode == 2 and "or registered to it" in unrelated.stderr

    reg_uid = _registration(registered / "reg.dcm", mr_frame, ct_frame, ct_to_mr, "PAT0")
    result = _evaluate("--pairs", str(registered))
    assert result.returncode == 0, result.stderr
    assert f"(registered by {reg_uid})" in result.stdout
    report, expected = json.loads(result.stdout.strip().splitlines()[-1]), json.loads(reference.stdout.strip().splitlines()[-1])
    assert report["pairs"][0]["mr_series_uid"] == mr_uid and report["pairs"][0]["registration"] == reg_uid
    assert report["pairs"][0]["ct_coverage"] == 1.0
    assert report["mae_hu"] == pytest.approx(expected["mae_hu"], abs=0.01)

    # A registration the other way round (the matrix inverted) puts the CT elsewhere: scored, and far worse.
    (registered / "reg.dcm").unlink()
    _registration(registered / "reg.dcm", mr_frame, ct_frame, np.linalg.inv(ct_to_mr), "PAT0")
    wrong = _evaluate("--pairs", str(registered), "--json")
    assert wrong.returncode == 0, wrong.stderr
    assert json.loads(wrong.stdout.strip().splitlines()[-1])["mae_hu"] > 2 * expected["mae_hu"]


def test_evaluate_pairs_against_another_model_pair_by_pair(tmp_path: Path) -> None:
    """`--against`: two models on the same pairs, pair by pair, each run as its own card says. The
    shipped weights stand in for both: with one view for an older model, which scores as
    `--test-time-augmentation none` does on its own, and with 4 (mirror; the shipped card's 32 would
    take 8x the forwards) for the newer one, which beats it on all 6 pairs: the signed-rank test
    calls that p = 2/64."""
    older = shipped_weights_with_views(tmp_path / "older", "none")
    newer = shipped_weights_with_views(tmp_path / "newer", "mirror")
    folder = tmp_path / "pairs"
    for s in range(6):
        _pair(folder / f"patient-{s}", s, f"PAT{s}")
    result = _evaluate(str(newer), "--pairs", str(folder), "--against", str(older), views=None)
    assert result.returncode == 0, result.stderr
    assert "better on 6 of 6 pairs" in result.stdout and "Wilcoxon signed-rank p = 0.0312" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    against = report["against"]
    assert report["test_time_augmentation"] == "mirror" and against["test_time_augmentation"] == "none"
    assert against["better_on_pairs"] == 6 and against["wilcoxon_p"] == 0.0312
    assert against["median_difference_hu"] < 0 and against["mae_hu"] > report["mae_hu"]
    one_view = _evaluate("--pairs", str(folder), "--json")  # the shipped model with --test-time-augmentation none
    assert json.loads(one_view.stdout.strip().splitlines()[-1])["mae_hu"] == against["mae_hu"]
    alone = _evaluate("--against", str(older), views=None)
    assert alone.returncode == 2 and "--against goes with --pairs" in alone.stderr
