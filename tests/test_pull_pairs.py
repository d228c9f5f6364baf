"""`mr2ct pull-pairs`: a physicist scores a model on the hospital's own patients straight from the
PACS. A real Orthanc holds MR/CT pairs (one in a single frame, one in two frames related by a
spatial registration), patients with only one of the two, and an MR whose only CT is an sCT;
the pull fetches the pairs' series and registration whole, and `mr2ct evaluate --pairs` scores
them as it scores the same files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import JPEGLSLossless

from dicom_node.local_stack import OrthancServer, free_port
from synthesis.errors import PacsUnavailable
from tests.helpers import dicomweb_proxy, metadata_asked
from tests.test_pairs import _pair, _pair_in_two_frames, _registration
from training.pacs_pull import PairsFilter, pull_pairs
from training.phantom_dicom import write_mr_series

MR2CT = [sys.executable, "-m", "dicom_node.cli"]


@pytest.fixture(autouse=True)
def _audit_database(tmp_path, monkeypatch):
    """The database a `mr2ct pull` command writes its audit rows into: the test's own."""
    monkeypatch.setenv("MR2CT_DATABASE_URL", f"sqlite:///{tmp_path / 'audit.db'}")
PATIENT_IDS = ("PULLPAT0", "PULLPAT1", "PULLMRONLY", "PULLCTONLY", "PULLSCT")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """The files as the hospital made them, and a PACS (Orthanc with DICOMweb) holding them."""
    source = tmp_path_factory.mktemp("hospital")
    _pair(source / "same-frame", 0, "PULLPAT0")
    for path in (source / "same-frame" / "mr").glob("*.dcm"):  # stored compressed, as many PACS keep MR
        ds = pydicom.dcmread(path)
        ds.compress(JPEGLSLossless)
        ds.save_as(path)
    mr_frame, ct_frame, ct_to_mr = _pair_in_two_frames(source / "two-frames", 1, "PULLPAT1")
    study = str(pydicom.dcmread(next((source / "two-frames" / "mr").glob("*.dcm"))).StudyInstanceUID)
    reg_uid = _registration(source / "two-frames" / "reg.dcm", mr_frame, ct_frame, ct_to_mr, "PULLPAT1", study)
    write_mr_series(source / "mr-only", seed=11, slices=4, size=64, pixel_spacing=4.0, slice_spacing=30.0, patient_id="PULLMRONLY")
    write_mr_series(source / "ct-only", seed=12, slices=4, size=64, pixel_spacing=4.0, slice_spacing=30.0, patient_id="PULLCTONLY", modality="CT")
    _pair(source / "sct", 2, "PULLSCT")  # its CT is marked synthetic: an MR with only mr2ct's own sCT beside it
    for path in (source / "sct" / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SyntheticData = "YES"
        ds.save_as(path)
    with OrthancServer(tmp_path_factory.mktemp("pacs"), http_port=free_port(), dicom_port=free_port()) as orthanc:
        for path in sorted(p for p in source.rglob("*.dcm")):
            response = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30)
            response.raise_for_status()
        yield orthanc, source, reg_uid


def _evaluate_json(folder: Path) -> dict:
    result = subprocess.run([*MR2CT, "evaluate", "--pairs", str(folder), "--json", "--test-time-augmentation", "none"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pull_pairs_fetches_whole_pairs_that_evaluate_scores_as_the_files_on_disk(hospital, tmp_path):
    orthanc, source, reg_uid = hospital
    out = tmp_path / "pairs"
    counts = pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    # Two patients with MR and CT: 2 series for the one-frame pair, 3 (with the registration) for the other.
    assert counts == {"patients": 2, "found": 5, "fetched": 5, "skipped": 0, "changed": 0, "removed": 0, "withdrawn": 0}
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert not any(pid in name for name in names for pid in PATIENT_IDS)  # folders named by salted hash and UID
    assert sum(1 for p in out.rglob("*.dcm")) == 4 + 4 + 4 + 4 + 1
    assert not (tmp_path / ".pairs.partial").exists()
    compressed_mr = str(pydicom.dcmread(next((source / "same-frame" / "mr").glob("*.dcm"))).SeriesInstanceUID)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in out.glob(f"*/{compressed_mr}/*.dcm")}
    assert syntaxes == {JPEGLSLossless}  # fetched as the PACS stores it, not transcoded on the way

    pulled, on_disk = _evaluate_json(out), _evaluate_json(source)
    assert len(pulled["pairs"]) == 2 and [p["registration"] for p in pulled["pairs"]].count(reg_uid) == 1
    assert pulled["pairs"] == on_disk["pairs"]  # nothing lost on the way through the PACS
    assert pulled["mae_hu"] == on_disk["mae_hu"]
    assert pulled["left_out"] == []  # only pairs came (no MR-only, CT-only or sCT series), and the folder's salt is not taken for an image

    again = pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    assert again == {"patients": 2, "found": 5, "fetched": 0, "skipped": 5, "changed": 0, "removed": 0, "withdrawn": 0}


def test_pull_pairs_replaces_a_half_fetched_series_left_by_an_interrupted_run(hospital, tmp_path):
    orthanc, _, _ = hospital
    out = tmp_path / "pairs"
    pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(limit=1), username=orthanc.username, password=orthanc.password)
    patient = next(p for p in out.iterdir() if p.is_dir())
    series = sorted(patient.iterdir())[0]
    # An interrupted run: the series was being fetched beside the folder and never moved in.
    staged = tmp_path / ".pairs.partial" / series.name
    staged.parent.mkdir()
    series.rename(staged)
    (staged / "00000.dcm").unlink()
    counts = pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(limit=1), username=orthanc.username, password=orthanc.password)
    assert counts["fetched"] == 1 and counts["skipped"] == counts["found"] - 1
    assert (series / "00000.dcm").is_file() and len(list(series.glob("*.dcm"))) == 4
    assert not staged.parent.exists()


def test_pull_pairs_fetches_again_a_series_of_which_the_pacs_holds_more_than_the_folder(hospital, tmp_path):
    """A pull that ran while the scanner was still sending got part of a series; the PACS now holds
    all of it. The next pull sees the PACS's count differ from the folder's and fetches the series
    again whole in its place (evaluate then scores the whole series); series whose count agrees
    are not fetched again. Old files a stopped run left beside the folder go at the next run."""
    orthanc, _, _ = hospital
    out = tmp_path / "pairs"
    pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    series = next(s for s in sorted(out.glob("*/*")) if len(list(s.glob("*.dcm"))) == 4)
    last = sorted(series.glob("*.dcm"))[-1]
    wanted = pydicom.dcmread(last).SOPInstanceUID
    last.unlink()  # as a pull made before the last slice reached the PACS would have left it
    stale = tmp_path / ".pairs.partial" / "1.2.3.replaced"
    stale.mkdir(parents=True)
    (stale / "00000.dcm").write_bytes(b"left by a stopped run")
    said = subprocess.run([*MR2CT, "pull-pairs", "--url", f"{orthanc.url}/dicom-web", "--out", str(out),
                           "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stderr[-2000:]
    assert "fetched 0, already there 4, fetched again 1 of which the PACS now holds another number of instances" in said.stdout
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent

    with init_db(os.environ["MR2CT_DATABASE_URL"])() as session:  # the series copied out of the PACS again is in the audit trail
        (row,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "pacs-data-pulled")).all()
    assert row.detail["series"] == [series.name] and row.detail["command"] == "pull-pairs" and row.detail["instances"] == 4
    assert row.detail["destination"] == str(out.resolve()) and row.detail["patient_id"] in PATIENT_IDS
    assert len(list(series.glob("*.dcm"))) == 4 and wanted in {pydicom.dcmread(p).SOPInstanceUID for p in series.glob("*.dcm")}
    assert not (tmp_path / ".pairs.partial").exists()  # nothing left beside the folder
    again = pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    assert again == {"patients": 2, "found": 5, "fetched": 0, "skipped": 5, "changed": 0, "removed": 0, "withdrawn": 0}


def test_pull_pairs_prune_deletes_the_series_folders_the_pacs_no_longer_holds(hospital, tmp_path):
    """A patient's pair deleted from the PACS since it was fetched (here: a folder of a series the
    PACS never held, under a patient hash of its own) goes with --prune, its patient folder with it;
    the pairs the PACS holds stay, as does a folder the pull did not make. Without it, it stays."""
    orthanc, _, _ = hospital
    out = tmp_path / "pairs"
    pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    held = sorted(p.relative_to(out) for p in out.rglob("*.dcm"))
    gone = out / ("ab" * 10) / "1.2.826.0.1.3680043.8.498.424242"
    gone.mkdir(parents=True)
    (gone / "00000.dcm").write_bytes(b"a slice of a series deleted from the PACS")
    notes = out / ("cd" * 10) / "physicist notes"
    notes.mkdir(parents=True)
    kept = pull_pairs(f"{orthanc.url}/dicom-web", out, PairsFilter(), username=orthanc.username, password=orthanc.password)
    assert kept["removed"] == 0 and gone.is_dir()
    said = subprocess.run([*MR2CT, "pull-pairs", "--url", f"{orthanc.url}/dicom-web", "--out", str(out), "--prune",
                           "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stderr[-2000:]
    assert "already there 5, removed 1 the PACS no longer holds ->" in said.stdout
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent

    with init_db(os.environ["MR2CT_DATABASE_URL"])() as session:  # the deletion audited (no pull of it recorded: no study named)
        (row,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "pulled-data-removed")).all()
    assert row.detail["series"] == [gone.name] and row.study_instance_uid is None and row.detail["command"] == "pull-pairs"
    assert not gone.parent.exists() and notes.is_dir()
    assert sorted(p.relative_to(out) for p in out.rglob("*.dcm")) == held
    assert not (tmp_path / ".pairs.partial").exists()


def test_pull_pairs_command_filters_and_says_what_is_wrong(hospital, tmp_path):
    orthanc, _, _ = hospital
    base = [*MR2CT, "pull-pairs", "--url", f"{orthanc.url}/dicom-web", "--username", orthanc.username]
    ok = subprocess.run([*base, "--password", orthanc.password, "--out", str(tmp_path / "one"), "--limit", "1"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "1 patient(s) with MR and CT" in ok.stdout and f"mr2ct evaluate --pairs {tmp_path / 'one'}" in ok.stdout
    assert not any(pid in ok.stdout + ok.stderr for pid in PATIENT_IDS)  # the per-patient REG query names no one in the log

    none = subprocess.run([*base, "--password", orthanc.password, "--out", str(tmp_path / "none"), "--ct-description", "^planning$"],
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 2 and "no patient on the PACS has both an MR and a CT" in none.stderr

    bad_regex = subprocess.run([*base, "--password", orthanc.password, "--out", str(tmp_path / "x"), "--mr-description", "T1("],
                               capture_output=True, text=True, timeout=60)
    assert bad_regex.returncode == 2 and "--mr-description is not a regular expression" in bad_regex.stderr
    for dates, said in ((["--date-from", "2026-01-01"], "--date-from must be a date as YYYYMMDD"),
                        (["--date-from", "20260301", "--date-to", "20260201"], "--date-from 20260301 is after --date-to 20260201")):
        bad_date = subprocess.run([*base, "--password", orthanc.password, "--out", str(tmp_path / "x"), *dates],
                                  capture_output=True, text=True, timeout=60)
        assert bad_date.returncode == 2 and said in bad_date.stderr, bad_date.stderr[-2000:]

    wrong = subprocess.run([*base, "--password", "wrong", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "401" in wrong.stderr
    with pytest.raises(PacsUnavailable, match="not reachable"):
        pull_pairs(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "x", PairsFilter(), timeout=5, attempts=1)


def test_a_pacs_that_refuses_stored_transfer_syntaxes_is_asked_for_its_default(hospital, tmp_path):
    """Not every DICOMweb server takes transfer-syntax=* (PS3.18): one that answers 406 Not
    Acceptable to it gets the request again without it, and the series still comes (transcoded
    there). The PACS here is Orthanc behind a loopback proxy that refuses such requests."""
    orthanc, source, _ = hospital
    out = tmp_path / "pairs"
    with dicomweb_proxy(orthanc, refuse_stored_syntax=True) as (url, _asked, refused):
        counts = pull_pairs(url, out, PairsFilter())
    assert counts["fetched"] == counts["found"] == 5 and len(refused) == 5  # each series asked twice, fetched once
    compressed_mr = str(pydicom.dcmread(next((source / "same-frame" / "mr").glob("*.dcm"))).SeriesInstanceUID)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in out.glob(f"*/{compressed_mr}/*.dcm")}
    assert syntaxes == {"1.2.840.10008.1.2.1"}  # the JPEG-LS MR came as the PACS's default: explicit VR little endian
    assert sum(1 for _ in out.rglob("*.dcm")) == 4 + 4 + 4 + 4 + 1


def test_only_the_cts_a_pull_may_take_are_asked_whether_they_are_synthetic(hospital, tmp_path):
    """Whether a CT is mr2ct's own sCT is in its instances' metadata, not in QIDO's answer: two
    requests per CT series. On a PACS of thousands of patients `--limit 20` must not ask them for
    every CT, and a second run must not ask again for the CTs it already has."""
    orthanc, source, _ = hospital
    ct_of = {pid: str(pydicom.dcmread(next((source / folder / "ct").glob("*.dcm"))).SeriesInstanceUID)
             for pid, folder in (("PULLPAT0", "same-frame"), ("PULLPAT1", "two-frames"), ("PULLSCT", "sct"))}
    out = tmp_path / "pairs"
    with dicomweb_proxy(orthanc) as (url, asked, _refused):
        first = pull_pairs(url, out, PairsFilter())
    assert first["patients"] == 2 and sorted(metadata_asked(asked)) == sorted(ct_of.values())  # every CT beside an MR, once
    with dicomweb_proxy(orthanc) as (url, asked, _refused):
        again = pull_pairs(url, out, PairsFilter())
    assert again == {"patients": 2, "found": 5, "fetched": 0, "skipped": 5, "changed": 0, "removed": 0, "withdrawn": 0}
    assert metadata_asked(asked) == [ct_of["PULLSCT"]]  # only the sCT, which no run fetches

    with dicomweb_proxy(orthanc) as (url, asked, _refused):
        one = pull_pairs(url, tmp_path / "one", PairsFilter(limit=1))
    taken = {p.name for p in (tmp_path / "one").glob("*/*")}
    assert one["patients"] == 1 and len(taken & set(ct_of.values())) == 1
    # Asked in the limit's order until one real CT was found: that one, and the sCT if it came first.
    assert set(metadata_asked(asked)) - {ct_of["PULLSCT"]} == taken & set(ct_of.values())
