"""An ML engineer points mr2ct at the PACS: phantom studies go into Orthanc, `mr2ct pull` turns
them into a local cache (no patient identifiers, split by patient, resumable), and training runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dicom_node.local_stack import OrthancServer, free_port
from synthesis.errors import PacsUnavailable
from training.pacs_pull import DatasetCache, PullFilter, pull

MR2CT = [sys.executable, "-m", "dicom_node.cli"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A PACS of this module's own, holding only the cohort (other modules store into theirs)."""
    with OrthancServer(tmp_path_factory.mktemp("pacs"), http_port=free_port(), dicom_port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def cohort_in_orthanc(orthanc, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    env = dict(os.environ, MR2CT_ORTHANC_USERNAME=orthanc.username, MR2CT_ORTHANC_PASSWORD=orthanc.password)
    result = subprocess.run(
        [*MR2CT, "phantoms", "--out", str(out), "--mr-subjects", "4", "--ct-subjects", "3", "--paired-subjects", "1",
         "--slices", "6", "--size", "64", "--pixel-spacing", "4", "--seed", "7", "--upload", orthanc.url],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_pull_builds_a_cache_without_patient_identifiers_split_by_patient(cohort_in_orthanc, orthanc, tmp_path):
    cache_dir = tmp_path / "cache"
    counts = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="T1"), PullFilter("CT")],
                  username=orthanc.username, password=orthanc.password, validation_fraction=0.3)
    assert counts["fetched"] == counts["found"] == 4 + 3 + 2  # the paired subject has one MR and one CT series
    entries = DatasetCache(cache_dir).entries()
    assert sorted(e["modality"] for e in entries) == ["CT"] * 4 + ["MR"] * 5
    by_patient: dict[str, set[str]] = {}
    for e in entries:
        by_patient.setdefault(e["patient_key"], set()).add(e["split"])
        assert e["pixel_spacing"] == [4.0, 4.0] and e["slices"] == 6
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient in both splits
    assert len(by_patient) == 4 + 3 + 1
    everything = b"".join(p.read_bytes() for p in cache_dir.rglob("*") if p.is_file())
    for needle in (b"PHANTOM^HEAD", b"PHMR007", b"PHCT007", b"PHPR007"):
        assert needle not in everything

    again = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="T1"), PullFilter("CT")],
                 username=orthanc.username, password=orthanc.password)
    assert again["fetched"] == 0 and again["skipped"] == 9


def test_filters_and_limits_narrow_the_pull(cohort_in_orthanc, orthanc, tmp_path):
    counts = pull(f"{orthanc.url}/dicom-web", tmp_path / "c", [PullFilter("CT", limit=2), PullFilter("MR", description="^nothing$")],
                  username=orthanc.username, password=orthanc.password)
    assert counts["found"] == 2


def test_wrong_password_and_unreachable_pacs_say_so(orthanc, tmp_path):
    with pytest.raises(PacsUnavailable, match="401"):
        pull(f"{orthanc.url}/dicom-web", tmp_path / "c", [PullFilter("MR")], username=orthanc.username, password="wrong")
    with pytest.raises(PacsUnavailable, match="not reachable"):
        pull(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "c", [PullFilter("MR")], timeout=5)
    result = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(tmp_path / "c"),
                             "--username", orthanc.username, "--password", "wrong"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "401" in result.stderr


def test_training_runs_on_a_pulled_cache(cohort_in_orthanc, orthanc, tmp_path):
    cache_dir = tmp_path / "cache"
    pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR"), PullFilter("CT")], username=orthanc.username,
         password=orthanc.password, validation_fraction=0.0)
    out = tmp_path / "run"
    result = subprocess.run(
        [*MR2CT, "train", "--out", str(out), "--data", str(cache_dir), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--no-record"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["data"]["cache"] == str(cache_dir)
    assert card["training"]["data"]["mr_slices"] == 5 * 6 and card["training"]["data"]["ct_slices"] == 4 * 6


def test_evaluate_pairs_leaves_out_the_patients_a_pulled_cache_trained_on(cohort_in_orthanc, orthanc, tmp_path):
    """The cohort's held-out pair went into the PACS and `mr2ct pull` took its patient into the
    training cache: `evaluate --pairs --training-cache` refuses to score that patient (the model may
    have learnt from them) and scores a patient the cache has never seen."""
    import shutil

    from training.phantom_dicom import write_mr_series

    cache_dir = tmp_path / "cache"
    pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="T1"), PullFilter("CT")],
         username=orthanc.username, password=orthanc.password)
    pairs = tmp_path / "pairs"
    shutil.copytree(cohort_in_orthanc, pairs)
    result = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(result.stdout.strip().splitlines()[-1])["pairs"]) == 1  # the held-out pair, scored when nothing says otherwise

    seen = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--training-cache", str(cache_dir)],
                          capture_output=True, text=True, timeout=300)
    assert seen.returncode == 2
    assert "among the patients not in the training cache" in seen.stderr and "split of the training cache" in seen.stderr
    assert "PHPR007" not in seen.stdout + seen.stderr  # the patient is named by series, never by ID

    unseen = write_mr_series(pairs / "new-patient" / "mr", seed=4242, slices=6, size=64, pixel_spacing=4.0, slice_spacing=6.0,
                             patient_id="NEW0001")
    write_mr_series(pairs / "new-patient" / "ct", seed=4242, slices=6, size=64, pixel_spacing=4.0, slice_spacing=6.0,
                    patient_id="NEW0001", modality="CT", study_uid=unseen.study_uid)
    scored = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--training-cache", str(cache_dir), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    assert [p["mr_series_uid"] for p in report["pairs"]] == [unseen.series_uid]
    assert sum("split of the training cache" in reason for reason in report["left_out"]) == 1

    not_a_cache = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--training-cache", str(tmp_path / "pairs")],
                                 capture_output=True, text=True, timeout=300)
    assert not_a_cache.returncode == 2 and "is not a dataset cache" in not_a_cache.stderr
    assert not (tmp_path / "pairs" / "salt").exists()  # looking did not make one
