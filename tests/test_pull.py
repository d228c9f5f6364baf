"""An ML engineer points mr2ct at the PACS: phantom studies go into Orthanc, `mr2ct pull` turns
them into a local cache (no patient identifiers, split by patient, resumable), and training runs on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import pydicom
import pytest
import requests

from dicom_node.local_stack import OrthancServer, free_port
from synthesis.errors import PacsUnavailable
from tests.helpers import dicomweb_proxy, metadata_asked, rewrite_as_ge
from training.pacs_pull import DatasetCache, PullFilter, cache_id, pull

MR2CT = [sys.executable, "-m", "dicom_node.cli"]


@pytest.fixture(autouse=True)
def _audit_database(tmp_path, monkeypatch):
    """The database a `mr2ct pull` command writes its audit rows into: the test's own."""
    monkeypatch.setenv("MR2CT_DATABASE_URL", f"sqlite:///{tmp_path / 'audit.db'}")


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


@contextmanager
def _in_the_pacs(orthanc, files):
    """``files`` stored in the module's Orthanc for the block's time, their series deleted after
    (the module's other tests count the cohort alone)."""
    uploaded = set()
    try:
        for path in files:
            response = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30)
            response.raise_for_status()
            uploaded.add(response.json()["ParentSeries"])
        yield
    finally:
        for series_id in uploaded:
            requests.delete(f"{orthanc.url}/series/{series_id}", auth=orthanc.auth, timeout=30)


def test_synthetic_series_and_series_that_make_no_volume_are_left_out_of_the_pools(cohort_in_orthanc, orthanc, tmp_path):
    """The node stores its sCTs in the same PACS the ML engineer pulls training CTs from: a series
    that says Synthetic Data YES is left out (training on the model's own output would teach it its
    own errors). So is one whose ImageType says LOCALIZER: every CT study holds a topogram, a
    projection that was cached as a CT slice until 2026-12-05. A series that makes no volume (a
    localizer of three planes, two slices in one place) is left out with its reason instead of
    ending the pull. A second run neither fetches nor asks about any of them."""
    from training.phantom_dicom import write_mr_series

    sct = write_mr_series(tmp_path / "sct", seed=77, slices=3, size=32, pixel_spacing=8.0, patient_id="PHSCT01", modality="CT")
    broken = write_mr_series(tmp_path / "broken", seed=78, slices=3, size=32, pixel_spacing=8.0, patient_id="PHBAD01", modality="CT")
    topogram = write_mr_series(tmp_path / "topogram", seed=79, slices=1, size=32, pixel_spacing=8.0, patient_id="PHTOP01", modality="CT")
    ds = pydicom.dcmread(topogram.files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(topogram.files[0])
    for path in [*sct.files, broken.files[2]]:
        ds = pydicom.dcmread(path)
        if path in sct.files:
            ds.SyntheticData = "YES"  # as mr2ct's CT writer marks its sCT
        else:
            ds.ImagePositionPatient = pydicom.dcmread(broken.files[0]).ImagePositionPatient  # two slices in one place
        ds.save_as(path)
    with _in_the_pacs(orthanc, [*sct.files, *broken.files, *topogram.files]):
        cache_dir = tmp_path / "cache"
        counts = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("CT")], username=orthanc.username, password=orthanc.password)
        assert counts == {"found": 3 + 1 + 3, "fetched": 4, "skipped": 0, "synthetic": 1, "localizer": 1, "mosaic": 0, "phase": 0, "complex": 0, "dixon": 0, "unusable": 1, "refreshed": 0, "changed": 0, "contrast": 0,
                          "contrast_agent": 0, "fat_suppression": 0, "withdrawn": 0, "removed": 0}
        cache = DatasetCache(cache_dir)
        assert not {sct.series_uid, broken.series_uid, topogram.series_uid} & cache.known()
        assert cache.left_out()[topogram.series_uid] == "localizer"
        assert "two or more slices share one position" in cache.left_out()[broken.series_uid]
        with dicomweb_proxy(orthanc) as (url, asked, _refused):
            again = pull(url, cache_dir, [PullFilter("CT")])
        assert again == {"found": 7, "fetched": 0, "skipped": 4, "synthetic": 1, "localizer": 1, "mosaic": 0, "phase": 0, "complex": 0, "dixon": 0, "unusable": 1, "refreshed": 0, "changed": 0, "contrast": 0,
                          "contrast_agent": 0, "fat_suppression": 0, "withdrawn": 0, "removed": 0}
        assert metadata_asked(asked) == [] and not any(uid in path for path in asked
                                                      for uid in (sct.series_uid, broken.series_uid, topogram.series_uid))
        assert not any(pid in p.read_bytes() for p in cache_dir.rglob("*") if p.is_file() for pid in (b"PHSCT01", b"PHBAD01", b"PHTOP01"))
        said = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--modality", "CT",
                               "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
        assert said.returncode == 0, said.stderr[-2000:]
        assert "already cached 4, left out 1 synthetic" in said.stdout and "1 localizer(s)" in said.stdout
        assert "and 1 that make no volume" in said.stdout
        # a limit counts the series taken, not those left out: 4 good CTs wherever the two fall
        limited = pull(f"{orthanc.url}/dicom-web", tmp_path / "limited", [PullFilter("CT", limit=4)],
                       username=orthanc.username, password=orthanc.password, progress=False)
        assert limited["fetched"] == 4 and limited["found"] == 4 + limited["synthetic"] + limited["localizer"] + limited["unusable"]
        more = pull(f"{orthanc.url}/dicom-web", tmp_path / "limited", [PullFilter("CT", limit=5)],
                    username=orthanc.username, password=orthanc.password, progress=False)
        assert more == {"found": 7, "fetched": 0, "skipped": 4, "synthetic": 1, "localizer": 1, "mosaic": 0, "phase": 0, "complex": 0, "dixon": 0, "unusable": 1,
                        "refreshed": 0, "changed": 0, "contrast": 0, "contrast_agent": 0, "fat_suppression": 0, "withdrawn": 0, "removed": 0}  # looked at all: the PACS has no 5th


def test_a_siemens_mosaic_and_phase_images_are_left_out_before_their_pixels_are_fetched(orthanc, tmp_path):
    """A Siemens fMRI, diffusion or perfusion series comes as mosaics (ImageType MOSAIC): each image
    the slices of one volume tiled, hundreds of them. Until 2026-12-05 a pull fetched it whole, to
    leave it out (its images share one position) or, one volume, to cache the tiles as a head's
    slice. A field map's phase series (ImageType ... P ...: angles, not tissue) went into the MR
    pool, as did a Dixon's fat image. Now all are left out from their first instance's metadata,
    their pixels never fetched."""
    from training.phantom_dicom import write_mr_series

    def typed(name: str, seed: int, description: str, image_type: list[str], one_place: bool = False):
        series = write_mr_series(tmp_path / name, seed=seed, slices=3, size=32, pixel_spacing=8.0, patient_id="PHMOS01",
                                 series_description=description)
        place = pydicom.dcmread(series.files[0]).ImagePositionPatient
        for path in series.files:
            ds = pydicom.dcmread(path)
            ds.ImageType = image_type
            if one_place:
                ds.ImagePositionPatient = place  # time points: one place
            ds.save_as(path)
        return series

    bold = typed("bold", 80, "ep2d_bold_moco", ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"], one_place=True)
    phase = typed("phase", 81, "gre_field_mapping", ["ORIGINAL", "PRIMARY", "P", "ND"])
    # GE: ImageType ORIGINAL\\PRIMARY\\OTHER for all, the component in (0043,xx2F) of GEMS_PARM_01 (1 phase, 2 real);
    # pulled into the MR pool until 2026-12-05, with the PACS's JSON carrying the private element
    ge = {}
    for code, seed in ((1, 82), (2, 83)):
        ge[code] = write_mr_series(tmp_path / f"ge-{code}", seed=seed, slices=3, size=32, pixel_spacing=8.0, patient_id="PHMOS01",
                                   series_description="B0 field_map")
        rewrite_as_ge(ge[code].files, code)
    # a Dixon T1's fat image (its water and opposed-phase images alike): pulled into the MR pool until 2026-12-05
    fat = typed("fat", 84, "t1_vibe_dixon_field_map_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"])
    left = (bold, phase, ge[1], ge[2], fat)
    with _in_the_pacs(orthanc, [f for series in left for f in series.files]), dicomweb_proxy(orthanc) as (url, asked, _refused):
        counts = pull(url, tmp_path / "cache", [PullFilter("MR", description="ep2d|field_map")], progress=False)
    assert counts == {"found": 5, "fetched": 0, "skipped": 0, "synthetic": 0, "localizer": 0, "mosaic": 1, "phase": 2, "complex": 1, "dixon": 1,
                      "unusable": 0, "refreshed": 0, "changed": 0, "contrast": 0, "contrast_agent": 0, "fat_suppression": 0, "withdrawn": 0, "removed": 0}
    assert DatasetCache(tmp_path / "cache").left_out() == {bold.series_uid: "mosaic", phase.series_uid: "phase", ge[1].series_uid: "phase",
                                                           ge[2].series_uid: "complex", fat.series_uid: "dixon"}
    fetched = [path for path in asked if "/instances/" in path and not path.endswith("/metadata")
               and any(series.series_uid in path for series in left)]
    assert fetched == [], fetched


def test_the_mr_pool_takes_the_contrast_asked_for_told_before_the_pixels_are_fetched(orthanc, tmp_path):
    """A hospital's head MR studies hold T2, FLAIR and proton-density series beside the T1: until
    2026-12-05 `mr2ct pull --modality MR` cached them all into one pool, and a T1 model learned a mix.
    Now `--mr-contrast` (default T1) takes the contrast the node would synthesize, told from the first
    instance's metadata (the pixels of the others never fetched), not remembered as left out (a later
    pull asking for them fetches them), and the manifest records each MR series' contrast."""
    from training.phantom_dicom import write_mr_series

    made = {}
    for name, seed, timing in (("t1_se", 90, None), ("t2_tse", 91, ("SE", "4000", "100", None)),
                               ("t2_flair", 92, ("SE\\IR", "9000", "90", "2500")), ("pd_tse", 93, ("SE", "3000", "15", None)),
                               ("t1_post_gd", 94, None), ("t1_fs", 95, None)):
        made[name] = write_mr_series(tmp_path / name, seed=seed, slices=3, size=32, pixel_spacing=8.0, patient_id="PHCON01",
                                     series_description=f"contrast {name}", **({"mr_timing": timing} if timing else {}),
                                     contrast_agent="GADOBUTROL" if name == "t1_post_gd" else None, fat_suppressed=name == "t1_fs")
    cache = tmp_path / "cache"
    files = [f for series in made.values() for f in series.files]
    with _in_the_pacs(orthanc, files), dicomweb_proxy(orthanc) as (url, asked, _refused):
        default = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(cache), "--modality", "MR", "--description", "^contrast "],
                                 capture_output=True, text=True, timeout=300, env=dict(os.environ, MR2CT_LOG_FORMAT="json"))
        assert default.returncode == 0, default.stderr[-2000:]
        # its log in the node's JSON lines, for a cluster's collector: each MR series not pulled, with why
        logged = [json.loads(line) for line in default.stderr.splitlines() if line.startswith("{")]
        assert sum("its MR contrast is" in entry["message"] for entry in logged) == 3, default.stderr[-2000:]
        assert all(entry["logger"] and entry["level"] and entry["time"] for entry in logged)
        assert "fetched 1," in default.stdout and "not pulled 3 MR series of another contrast than T1" in default.stdout, default.stdout
        # a post-contrast T1 is T1 by its timing: left out by --mr-contrast-agent (default without), told by its metadata too
        assert "1 MR series with a contrast agent (--mr-contrast-agent without)" in default.stdout, default.stdout
        assert sum("with a contrast agent (Contrast/Bolus Agent (0018,0010) 'GADOBUTROL')" in entry["message"] for entry in logged) == 1
        # a fat-saturated T1 likewise (--mr-fat-suppression, default without)
        assert "1 MR series with fat suppression (--mr-fat-suppression without)" in default.stdout, default.stdout
        fetched = [path for path in asked if "/instances/" in path and not path.endswith("/metadata")
                   and any(made[name].series_uid in path for name in ("t2_tse", "t2_flair", "pd_tse", "t1_post_gd", "t1_fs"))]
        assert fetched == [], fetched
        entries = DatasetCache(cache).entries()
        assert [(e["series_uid"], e["contrast"], e["contrast_agent"], e["fat_suppression"], e["body_part"]) for e in entries] == [
            (made["t1_se"].series_uid, "T1", "WITHOUT", "WITHOUT", "HEAD")]  # and its BodyPartExamined: a card's mr_body_parts
        assert DatasetCache(cache).left_out() == {}
        more = pull(url, cache, [PullFilter("MR", description="^contrast ", contrasts=("T2", "FLUID_ATTENUATED"))], progress=False)
        assert (more["fetched"], more["skipped"], more["contrast"]) == (2, 1, 3)
        enhanced = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(cache), "--modality", "MR", "--description", "^contrast ",
                                   "--mr-contrast-agent", "WITH"], capture_output=True, text=True, timeout=300)
        assert enhanced.returncode == 0 and "fetched 1," in enhanced.stdout, enhanced.stdout + enhanced.stderr[-2000:]
        # the unenhanced T1 is cached already; the fat-saturated one, unenhanced too, is not taken (nor fetched)
        assert "1 MR series without a contrast agent" in enhanced.stdout, enhanced.stdout
        fat = pull(url, cache, [PullFilter("MR", description="^contrast ", contrasts=("T1",), fat_suppression=("WITH",))], progress=False)
        assert (fat["fetched"], fat["fat_suppression"]) == (1, 0)
    assert {e["series_uid"]: (e["contrast"], e["contrast_agent"], e["fat_suppression"]) for e in DatasetCache(cache).entries()} == {
        made["t1_se"].series_uid: ("T1", "WITHOUT", "WITHOUT"), made["t2_tse"].series_uid: ("T2", "WITHOUT", "WITHOUT"),
        made["t2_flair"].series_uid: ("FLUID_ATTENUATED", "WITHOUT", "WITHOUT"), made["t1_post_gd"].series_uid: ("T1", "WITH", "WITHOUT"),
        made["t1_fs"].series_uid: ("T1", "WITHOUT", "WITH")}
    bad = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(tmp_path / "other"), "--mr-contrast", "T3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--mr-contrast ['T3'] is not an MR contrast" in bad.stderr, bad.stderr[-2000:]
    bad_agent = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(tmp_path / "other"), "--mr-contrast-agent", "some"],
                               capture_output=True, text=True, timeout=60)
    assert bad_agent.returncode == 2 and "--mr-contrast-agent 'some' is none of without, with, any" in bad_agent.stderr, bad_agent.stderr
    bad_fat = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(tmp_path / "other"), "--mr-fat-suppression", "some"],
                             capture_output=True, text=True, timeout=60)
    assert bad_fat.returncode == 2 and "--mr-fat-suppression 'some' is none of without, with, any" in bad_fat.stderr, bad_fat.stderr
    bad_format = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(tmp_path / "other")], capture_output=True, text=True,
                                timeout=60, env=dict(os.environ, MR2CT_LOG_FORMAT="xml"))
    assert bad_format.returncode == 2 and "MR2CT_LOG_FORMAT must be text or json, got 'xml'" in bad_format.stderr


def test_every_instance_of_a_fetched_mr_series_is_read_as_the_node_reads_it(orthanc, tmp_path):
    """The first instance's metadata does not speak for the series: one whose later slices read T2
    after T1 ones (MIXED) is not cached into a T1 pool, whichever instance the PACS names first, and
    one whose lower slices say NECK is cached as a head and neck, which the card then says it
    learned (the node's config check holds select_body_parts to it). Until 2026-12-06 the pull read
    the first instance only."""
    from training.config import TrainConfig
    from training.phantom_dicom import write_mr_series
    from training.trainer import mr_learned

    mixed, neck = (write_mr_series(tmp_path / name, seed=seed, slices=4, size=32, pixel_spacing=8.0, patient_id="PHPARTS",
                                   series_description=f"every {name}") for name, seed in (("t1_then_t2", 96), ("head_neck", 97)))

    def timed_t2(ds):
        ds.ScanningSequence, ds.RepetitionTime, ds.EchoTime = "SE", "4000", "100"

    def says_neck(ds):
        ds.BodyPartExamined = "NECK"

    for series, change in ((mixed, timed_t2), (neck, says_neck)):  # the third and fourth slices
        for path in sorted(series.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)[2:]:
            ds = pydicom.dcmread(path)
            change(ds)
            ds.save_as(path)
    cache = tmp_path / "cache"
    t1_only = [PullFilter("MR", description="^every ", contrasts=("T1",))]
    # every series in the train split (the patient's split follows the cache's random salt; the card reads the train split)
    with _in_the_pacs(orthanc, [*mixed.files, *neck.files]), dicomweb_proxy(orthanc) as (url, asked, _refused):
        counts = pull(url, cache, t1_only, progress=False, validation_fraction=0.0)
        assert (counts["fetched"], counts["contrast"]) == (1, 1), counts
        # what its headers said is remembered: the next pull with the same filter fetches nothing of it
        asked.clear()
        again = pull(url, cache, t1_only, progress=False, validation_fraction=0.0)
        assert (again["fetched"], again["skipped"], again["contrast"]) == (0, 1, 1), again
        assert not [path for path in asked if mixed.series_uid in path], asked
        taking_mixed = pull(url, cache, [PullFilter("MR", description="^every ", contrasts=("T1", "MIXED"))], progress=False,
                            validation_fraction=0.0)
        assert (taking_mixed["fetched"], taking_mixed["skipped"]) == (1, 1), taking_mixed  # a pull that takes it fetches it
        assert DatasetCache(cache).headers_read()[mixed.series_uid] == {"contrast": "MIXED", "contrast_agent": "WITHOUT",
                                                                        "fat_suppression": "WITHOUT", "instances": 4}
        # the T2 slices deleted in the PACS (sent into the wrong series): what is left is read again, and is T1
        t1_cache = tmp_path / "t1-cache"
        assert pull(url, t1_cache, t1_only, progress=False)["contrast"] == 1
        for path in sorted(mixed.files, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)[2:]:
            found = requests.post(f"{orthanc.url}/tools/lookup", data=str(pydicom.dcmread(path).SOPInstanceUID), auth=orthanc.auth, timeout=30)
            requests.delete(f"{orthanc.url}/instances/{found.json()[0]['ID']}", auth=orthanc.auth, timeout=30).raise_for_status()
        corrected = pull(url, t1_cache, t1_only, progress=False)
        assert (corrected["fetched"], corrected["skipped"], corrected["contrast"]) == (1, 1, 0), corrected
    entry = {e["series_uid"]: e for e in DatasetCache(cache).entries()}[neck.series_uid]
    assert entry["contrast"] == "T1"
    assert sorted(entry["body_part"].split("\\")) == ["HEAD", "NECK"], entry["body_part"]
    assert mr_learned(TrainConfig(data=str(cache)))["mr_body_parts"] == ["HEAD", "NECK"]


def test_a_3d_sagittal_mr_is_cached_as_the_axial_slices_the_node_would_synthesize(orthanc, tmp_path):
    """The pools hold the slices the generator will see at the node: a 3D sagittal series (slices as
    far apart as its pixels) goes in as axial slices, with their spacing, and the manifest says so."""
    from synthesis.normalize import mr_to_unit
    from synthesis.volume import assemble, axial_reslice
    from training.phantom_dicom import write_mr_series

    sagittal = write_mr_series(tmp_path / "sag", seed=79, slices=24, size=32, columns=28, pixel_spacing=8.0, slice_spacing=8.0,
                               orientation="sagittal", patient_id="PHSAG01", series_description="SAG 3D T1")
    with _in_the_pacs(orthanc, sagittal.files):
        cache_dir = tmp_path / "cache"
        counts = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="^SAG 3D")], username=orthanc.username,
                      password=orthanc.password, progress=False)
        assert counts["fetched"] == 1
        (entry,) = DatasetCache(cache_dir).entries()
        assert entry["plane"] == "axial slices resliced from the sagittal acquisition"
        # 32 rows along z become 32 axial slices of 28 (y) x 24 (x)
        assert (entry["slices"], entry["rows"], entry["columns"]) == (32, 28, 24)
        assert entry["pixel_spacing"] == [8.0, 8.0] and entry["slice_spacing"] == 8.0
        (_, slices), = DatasetCache(cache_dir).pool("MR")
        volume = assemble([pydicom.dcmread(p) for p in sagittal.files]).volume
        reslice, _ = axial_reslice(volume)
        assert reslice is not None and (slices == mr_to_unit(reslice.forward(volume.voxels)).astype("float16")).all()


def _as_a_pull_before_planes_wrote_it(cache_dir, acquired):
    """Rewrite a cache as a pull before 2026-12-03 wrote it: no ``plane`` in any entry, and the
    series in ``acquired`` (series UID: its files) in their acquired slices under that pull's shard
    name. Returns those shards' names by series UID."""
    import hashlib

    import numpy as np

    from synthesis.normalize import mr_to_unit
    from synthesis.volume import assemble

    lines, shards = [], {}
    for entry in DatasetCache(cache_dir).entries():
        del entry["plane"]
        files = acquired.get(entry["series_uid"])
        if files is not None:
            (cache_dir / entry["shard"]).unlink()
            volume = assemble([pydicom.dcmread(p) for p in files]).volume
            slices = mr_to_unit(volume.voxels).astype(np.float16)
            shards[entry["series_uid"]] = hashlib.sha256(entry["series_uid"].encode()).hexdigest()[:24] + ".npz"
            entry.update(shard=shards[entry["series_uid"]], slices=slices.shape[0], rows=slices.shape[1], columns=slices.shape[2],
                         pixel_spacing=list(volume.pixel_spacing), slice_spacing=round(abs(volume.slice_spacing), 4))
            np.savez_compressed(cache_dir / entry["shard"], slices=slices)
        lines.append(json.dumps(entry, sort_keys=True))
    (cache_dir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return shards


def test_a_cache_pulled_before_slice_planes_gets_its_3d_sagittal_series_again_as_axial_slices(orthanc, tmp_path):
    """A cache an earlier mr2ct pulled holds a 3D sagittal series as its acquired slices (no
    ``plane`` in its entry): the next pull fetches that series again as the axial slices the node
    synthesizes, replaces its entry and shard, and leaves the axial series it holds alone."""
    from synthesis.normalize import mr_to_unit
    from synthesis.volume import assemble, axial_reslice
    from training.phantom_dicom import write_mr_series

    sagittal = write_mr_series(tmp_path / "sag", seed=83, slices=24, size=32, columns=28, pixel_spacing=8.0, slice_spacing=8.0,
                               orientation="sagittal", patient_id="PHOLD01", series_description="OLD 3D T1")
    axial = write_mr_series(tmp_path / "ax", seed=84, slices=3, size=32, pixel_spacing=8.0, patient_id="PHOLD01",
                            series_description="OLD AX T1", study_uid=sagittal.study_uid)
    with _in_the_pacs(orthanc, [*sagittal.files, *axial.files]):
        url, cache_dir, flt = f"{orthanc.url}/dicom-web", tmp_path / "cache", [PullFilter("MR", description="^OLD ")]
        first = pull(url, cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert first["fetched"] == 2
        old_shard = _as_a_pull_before_planes_wrote_it(cache_dir, {sagittal.series_uid: sagittal.files})[sagittal.series_uid]
        volume = assemble([pydicom.dcmread(p) for p in sagittal.files]).volume
        before = {e["series_uid"]: e for e in DatasetCache(cache_dir).entries()}
        assert (before[sagittal.series_uid]["slices"], before[sagittal.series_uid]["rows"], before[sagittal.series_uid]["columns"]) == (24, 32, 28)
        assert DatasetCache(cache_dir).outdated() == {sagittal.series_uid}

        # a pull whose filters leave the old series out says it is still there as acquired
        axial_only = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(cache_dir), "--modality", "MR", "--description", "^OLD AX",
                                     "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
        assert axial_only.returncode == 0, axial_only.stderr[-2000:]
        assert "already cached 1," in axial_only.stdout and "1 series in the cache are still in their acquired plane" in axial_only.stdout
        again = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(cache_dir), "--modality", "MR", "--description", "^OLD ",
                                "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "found 2 series, fetched 0, already cached 1, fetched again 1 that an earlier pull cached in their acquired plane" in again.stdout
        assert "still in their acquired plane" not in again.stdout
        cache = DatasetCache(cache_dir)
        after = {e["series_uid"]: e for e in cache.entries()}
        assert after[axial.series_uid] == before[axial.series_uid]  # axial as acquired is what the node shows: untouched
        entry = after[sagittal.series_uid]
        assert entry["plane"] == "axial slices resliced from the sagittal acquisition"
        assert (entry["slices"], entry["rows"], entry["columns"]) == (32, 28, 24)
        assert (entry["patient_key"], entry["split"]) == (before[sagittal.series_uid]["patient_key"], before[sagittal.series_uid]["split"])
        assert not (cache_dir / old_shard).exists() and (cache_dir / entry["shard"]).exists()
        pooled = {e["series_uid"]: data for e, data in cache.pool("MR")}
        reslice, _ = axial_reslice(volume)
        assert reslice is not None and (pooled[sagittal.series_uid] == mr_to_unit(reslice.forward(volume.voxels)).astype("float16")).all()
        assert not cache.outdated()

        third = pull(url, cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert (third["skipped"], third["refreshed"], third["fetched"]) == (2, 0, 0)


def test_a_series_cached_as_acquired_that_no_longer_makes_a_volume_leaves_the_cache(orthanc, tmp_path):
    """A 3D sagittal series an earlier pull cached as acquired, fetched again to be resliced, now
    makes no volume (an instance of another size has joined it in the PACS): it is left out, and its
    old entry and shard go with it, so training no longer sees the slices of the old plane."""
    from pydicom.uid import generate_uid

    from training.phantom_dicom import write_mr_series

    sagittal = write_mr_series(tmp_path / "sag", seed=85, slices=12, size=32, columns=28, pixel_spacing=8.0, slice_spacing=8.0,
                               orientation="sagittal", patient_id="PHOLD02", series_description="GONE 3D T1")
    with _in_the_pacs(orthanc, sagittal.files):
        url, cache_dir, flt = f"{orthanc.url}/dicom-web", tmp_path / "cache", [PullFilter("MR", description="^GONE ")]
        assert pull(url, cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)["fetched"] == 1
        old_shard = _as_a_pull_before_planes_wrote_it(cache_dir, {sagittal.series_uid: sagittal.files})[sagittal.series_uid]
        assert DatasetCache(cache_dir).outdated() == {sagittal.series_uid}

        odd = pydicom.dcmread(sagittal.files[0])  # the same series, another SOP instance, half the rows
        odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        odd.InstanceNumber, odd.Rows = 99, odd.Rows // 2
        odd.PixelData = odd.PixelData[: len(odd.PixelData) // 2]
        odd.ImagePositionPatient = [v + 1.0 for v in odd.ImagePositionPatient]
        path = tmp_path / "odd.dcm"
        odd.save_as(path)
        requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30).raise_for_status()

        again = subprocess.run([*MR2CT, "pull", "--url", url, "--cache", str(cache_dir), "--modality", "MR", "--description", "^GONE ",
                                "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "found 1 series, fetched 0, already cached 0" in again.stdout and "and 1 that make no volume" in again.stdout
        assert "still in their acquired plane" not in again.stdout
        assert "cached as acquired before, now left out" in again.stderr and "PHOLD02" not in again.stderr
        cache = DatasetCache(cache_dir)
        assert "mixed image sizes" in cache.left_out()[sagittal.series_uid]
        assert cache.entries() == [] and cache.pool("MR") == [] and not cache.outdated()
        assert not (cache_dir / old_shard).exists()
        third = pull(url, cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert (third["found"], third["unusable"], third["fetched"], third["skipped"]) == (1, 1, 0, 0)


def test_filters_and_limits_narrow_the_pull(cohort_in_orthanc, orthanc, tmp_path):
    counts = pull(f"{orthanc.url}/dicom-web", tmp_path / "c", [PullFilter("CT", limit=2), PullFilter("MR", description="^nothing$")],
                  username=orthanc.username, password=orthanc.password)
    assert counts["found"] == 2
    # the phantom studies are dated 2026-01-01: a study date range takes them or leaves them
    dated = {
        (start, end): pull(f"{orthanc.url}/dicom-web", tmp_path / f"d{start}-{end}", [PullFilter("CT", study_date_from=start, study_date_to=end)],
                           username=orthanc.username, password=orthanc.password, progress=False)["fetched"]
        for start, end in (("20251231", "20260101"), ("20260102", None), (None, "20251231"))
    }
    assert dated == {("20251231", "20260101"): 4, ("20260102", None): 0, (None, "20251231"): 0}
    # and are of the head
    parts = {part: pull(f"{orthanc.url}/dicom-web", tmp_path / f"b{part}", [PullFilter("CT", body_part=part)], username=orthanc.username,
                        password=orthanc.password, progress=False)["fetched"] for part in ("HEAD", "PELVIS")}
    assert parts == {"HEAD": 4, "PELVIS": 0}


def test_a_series_pulled_while_it_was_arriving_is_fetched_again_whole_when_the_pacs_holds_more(orthanc, tmp_path):
    """A pull that ran while the scanner was still sending cached half a series. The next pull sees
    the PACS hold more instances of it than the cache was made of (QIDO's Number of Series Related
    Instances against the count the manifest line records) and fetches it again whole, in place of
    the half; a slice deleted in the PACS since is followed the same way. A series whose count did
    not change is not fetched again."""
    import numpy as np

    from training.phantom_dicom import write_mr_series

    series = write_mr_series(tmp_path / "mr", seed=81, slices=6, size=32, pixel_spacing=8.0, slice_spacing=5.0, patient_id="PHGROW1",
                             series_description="GROWING phantom")
    cache_dir, flt = tmp_path / "cache", [PullFilter("MR", description="GROWING")]

    def cached() -> tuple[dict, int]:
        (entry,) = DatasetCache(cache_dir).entries()
        assert sorted(p.name for p in cache_dir.glob("*.npz")) == [entry["shard"]]  # the shard it replaced is gone
        return entry, np.load(cache_dir / entry["shard"])["slices"].shape[0]

    with _in_the_pacs(orthanc, series.files[:3]):
        first = pull(f"{orthanc.url}/dicom-web", cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert first["fetched"] == 1
        entry, slices = cached()
        assert (entry["instances"], entry["slices"], slices) == (3, 3, 3)
        for path in series.files[3:]:  # the rest of the series reaches the PACS
            requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=30).raise_for_status()
        said = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--modality", "MR",
                               "--description", "GROWING", "--username", orthanc.username, "--password", orthanc.password],
                              capture_output=True, text=True, timeout=120)
        assert said.returncode == 0, said.stderr[-2000:]
        assert "fetched 0, already cached 0, fetched again 1 of which the PACS now holds another number of instances" in said.stdout
        entry, slices = cached()
        assert (entry["instances"], entry["slices"], slices) == (6, 6, 6)
        again = pull(f"{orthanc.url}/dicom-web", cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert (again["skipped"], again["changed"], again["fetched"]) == (1, 0, 0)
        last = requests.post(f"{orthanc.url}/tools/lookup", data=str(pydicom.dcmread(series.files[-1]).SOPInstanceUID),
                             auth=orthanc.auth, timeout=30).json()[0]["ID"]
        requests.delete(f"{orthanc.url}/instances/{last}", auth=orthanc.auth, timeout=30).raise_for_status()
        fewer = pull(f"{orthanc.url}/dicom-web", cache_dir, flt, username=orthanc.username, password=orthanc.password, progress=False)
        assert (fewer["skipped"], fewer["changed"], fewer["fetched"]) == (0, 1, 0)
        entry, slices = cached()
        assert (entry["instances"], slices) == (5, 5)


def test_prune_takes_out_of_the_cache_the_series_the_pacs_no_longer_holds(orthanc, tmp_path):
    """A patient withdraws consent to research use and the hospital deletes their study from the
    research PACS: `mr2ct pull --prune` removes their series from the cache (shard deleted, the
    manifest saying why), keeps a series its filters did not ask for while the PACS holds it, and
    still counts the patient as trained on (an evaluation on pairs leaves them out). Without
    --prune nothing is removed; a series that comes back is cached anew. The deletion is in the
    audit trail (study and patient as the pull that copied them named them, though the cache was
    moved in between), and the patient's lineage says when their copy went."""
    import numpy as np
    from sqlalchemy import select

    from dicom_node import atna
    from dicom_node.db import init_db
    from dicom_node.lineage import patient_lineage
    from dicom_node.models import AuditEvent

    from training.phantom_dicom import write_mr_series

    withdrawn, kept = (write_mr_series(tmp_path / name, seed=seed, slices=3, size=32, pixel_spacing=8.0, slice_spacing=5.0,
                                       patient_id=pid, series_description=f"PRUNE {name}")
                       for name, seed, pid in (("withdrawn", 91, "PHWITHDRAWN"), ("kept", 92, "PHKEPT")))
    cache_dir, auth = tmp_path / "cache", dict(username=orthanc.username, password=orthanc.password, progress=False)
    with _in_the_pacs(orthanc, kept.files):
        with _in_the_pacs(orthanc, withdrawn.files):
            first = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--modality", "MR",
                                    "--description", "^PRUNE ", "--username", orthanc.username, "--password", orthanc.password],
                                   capture_output=True, text=True, timeout=120)
            assert first.returncode == 0 and "fetched 2," in first.stdout, first.stderr[-2000:]
        moved = tmp_path / "cache-moved"  # the cache moves before the prune: the rows still name the patient
        shutil.move(cache_dir, moved)
        cache_dir = moved
        cache = DatasetCache(cache_dir)
        gone = next(e for e in cache.entries() if e["series_uid"] == withdrawn.series_uid)
        kept_only = [PullFilter("MR", description="^PRUNE withdrawn")]  # the kept series is outside this pull's filter
        assert pull(f"{orthanc.url}/dicom-web", cache_dir, kept_only, **auth)["removed"] == 0 and len(cache.entries()) == 2
        said = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--modality", "MR",
                               "--description", "^PRUNE withdrawn", "--prune", "--username", orthanc.username, "--password",
                               orthanc.password], capture_output=True, text=True, timeout=120)
        assert said.returncode == 0, said.stderr[-2000:]
        assert "removed 1 the PACS no longer holds (--prune)" in said.stdout
        assert [e["series_uid"] for e in cache.entries()] == [kept.series_uid]
        assert not (cache_dir / gone["shard"]).exists() and np.load(cache_dir / cache.entries()[0]["shard"])["slices"].shape[0] == 3
        last = json.loads(cache.manifest.read_text().splitlines()[-1])
        assert last["series_uid"] == withdrawn.series_uid and "the PACS no longer held it" in last["removed"]
        assert cache.patients()[gone["patient_key"]] == gone["split"]  # still counted as trained on
        sessions = init_db(os.environ["MR2CT_DATABASE_URL"])
        with sessions() as session:
            (row,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "pulled-data-removed")).all()
            assert (row.study_instance_uid, row.detail["patient_id"], row.detail["series"]) == (withdrawn.study_uid, "PHWITHDRAWN",
                                                                                               [withdrawn.series_uid])
            assert row.detail["destination"] == str(cache_dir.resolve())
            xml = atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT"), atna.subjects_of(session, row))
            assert 'csd-code="110103"' in xml and 'EventActionCode="D"' in xml and "PHWITHDRAWN" in xml and withdrawn.study_uid in xml
            (copied,) = patient_lineage(session, "PHWITHDRAWN")["pulls"]
            assert copied["removed_at"] is not None and copied["removed_at"] > copied["at"]
            assert patient_lineage(session, "PHKEPT")["pulls"][0]["removed_at"] is None
        again = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="^PRUNE ")], prune=True, **auth)
        assert (again["skipped"], again["removed"], again["fetched"]) == (1, 0, 0)
        with _in_the_pacs(orthanc, withdrawn.files):  # sent to the PACS again: cached anew
            back = pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="^PRUNE ")], prune=True, **auth)
            assert (back["fetched"], back["skipped"], back["removed"]) == (1, 1, 0) and len(cache.entries()) == 2


def test_each_study_a_pull_copies_out_of_the_pacs_is_an_audit_row_and_an_atna_message(cohort_in_orthanc, orthanc, tmp_path):
    """Copying patients' images out of the PACS into a training cache is what a hospital's audit
    trail is for: one row per study fetched (its patient, series and instance count, the PACS and
    the folder, who ran it), none for what was cached already, a failure row when the PACS refuses;
    the node's audit_syslog sends each as a DICOM Instances Transferred message naming the study
    and the patient."""
    from sqlalchemy import select

    from dicom_node import atna
    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent

    cache_dir = tmp_path / "cache"
    base = [*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--modality", "CT", "--username", orthanc.username]
    first = subprocess.run([*base, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    sessions = init_db(os.environ["MR2CT_DATABASE_URL"])
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "pacs-data-pulled")).all()
        ct = [e for e in DatasetCache(cache_dir).entries() if e["modality"] == "CT"]
        assert len(rows) == len(ct) == 4 and {r.outcome for r in rows} == {"success"}  # four CT studies, one series each
        pulled = {uid for r in rows for uid in r.detail["series"]}
        assert pulled == {e["series_uid"] for e in ct}
        row = rows[0]
        assert row.actor.endswith("(mr2ct pull)") and row.detail["patient_id"].startswith("PH") and row.detail["instances"] == 6
        assert row.detail["source"] == f"{orthanc.url}/dicom-web" and row.detail["destination"] == str(cache_dir.resolve())
        xml = atna.message(row, atna.Source(source_id="MR2CT", ae_title="MR2CT"), atna.subjects_of(session, row))
        assert 'csd-code="110104"' in xml and 'EventActionCode="C"' in xml and row.study_instance_uid in xml
        assert row.detail["patient_id"] in xml and f"{orthanc.url}/dicom-web" in xml and str(cache_dir.resolve()) in xml
    from tests.helpers import served_api

    with served_api(sessions, {"auditor-token": "auditor"}) as api:  # an auditor asks what became of one patient's images
        found = requests.get(f"{api}/audit", params={"patient_id": row.detail["patient_id"], "action": "pacs-data-pulled"},
                             headers={"Authorization": "Bearer auditor-token"}, timeout=30)
    assert found.status_code == 200, found.text
    assert [item["study_instance_uid"] for item in found.json()["items"]] == [row.study_instance_uid]
    again = subprocess.run([*base, "--password", orthanc.password], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "fetched 0" in again.stdout, again.stderr[-2000:]
    refused = subprocess.run([*base, "--password", "wrong"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "401" in refused.stderr
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "pacs-data-pulled").order_by(AuditEvent.id)).all()
        assert [r.outcome for r in rows] == ["success"] * 4 + ["failure"] and "401" in rows[-1].detail["reason"]
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the database's folder should be")
    nowhere = dict(os.environ, MR2CT_DATABASE_URL=f"sqlite:///{blocked / 'mr2ct.db'}")
    unrecorded = subprocess.run([*base, "--password", orthanc.password, "--no-record"], capture_output=True, text=True, timeout=120,
                                env=nowhere)
    assert unrecorded.returncode == 0, unrecorded.stderr[-2000:]
    no_database = subprocess.run([*base, "--password", orthanc.password], capture_output=True, text=True, timeout=120, env=nowhere)
    assert no_database.returncode == 2 and "database_url" in no_database.stderr and "--no-record" in no_database.stderr


def test_wrong_password_and_unreachable_pacs_say_so(orthanc, tmp_path):
    with pytest.raises(PacsUnavailable, match="401"):
        pull(f"{orthanc.url}/dicom-web", tmp_path / "c", [PullFilter("MR")], username=orthanc.username, password="wrong")
    started = time.monotonic()
    with pytest.raises(PacsUnavailable, match="not reachable"):  # tried twice, 2 s apart
        pull(f"http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "c", [PullFilter("MR")], timeout=5, attempts=2)
    assert 2 <= time.monotonic() - started < 20  # not the default 5 attempts (30 s)
    result = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(tmp_path / "c"),
                             "--username", orthanc.username, "--password", "wrong"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "401" in result.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command, option in (("pull", "--cache"), ("pull-pairs", "--out")):  # refused before the PACS is asked
        refused = subprocess.run([*MR2CT, command, "--url", f"{orthanc.url}/dicom-web", option, str(a_file)],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and f"{option}: {a_file} is a file, not a folder" in refused.stderr, refused.stderr[-2000:]


def test_training_runs_on_a_pulled_cache_and_the_audit_follows_a_patient_into_the_active_model(cohort_in_orthanc, orthanc, tmp_path,
                                                                                               monkeypatch):
    """An ML engineer pulls the PACS into a cache, trains on it, fine-tunes another model from it and
    activates the first; when a patient withdraws consent, the auditor asks GET /audit/lineage where
    that patient's images went: the study pulled and into which folder, the training run that read
    it and the one fine-tuned from it, the models, and that the node runs one of them now. A patient
    never pulled has none of these."""
    from dicom_node.db import init_db
    from tests.helpers import served_api

    cache_dir = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)  # a relative --data, as typed at a prompt: the run records it resolved
    pulled = subprocess.run([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", "cache", "--validation-fraction", "0",
                             "--username", orthanc.username, "--password", orthanc.password], capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    out = tmp_path / "run"
    result = subprocess.run(
        [*MR2CT, "train", "--out", str(out), "--data", "cache", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tuned = subprocess.run([*MR2CT, "train", "--out", "tuned", "--init-from", str(out / "model.safetensors"), "--epochs", "1",
                            "--steps-per-epoch", "1", "--batch-size", "2", "--subjects-per-pool", "1", "--image-size", "64"],
                           capture_output=True, text=True, timeout=600)  # on phantom heads
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    for command in (["models", "register", str(out)], ["models", "activate", "1"]):
        done = subprocess.run([*MR2CT, *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    with served_api(init_db(os.environ["MR2CT_DATABASE_URL"]), {"auditor-token": "auditor"}) as api:
        def lineage(patient_id: str) -> dict:
            answer = requests.get(f"{api}/audit/lineage", params={"patient_id": patient_id}, headers={"Authorization": "Bearer auditor-token"},
                                  timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()

        withdrawn, stranger = lineage("PHMR0070001"), lineage("NOT-PULLED")
        refused = requests.get(f"{api}/audit/lineage", headers={"Authorization": "Bearer auditor-token"}, timeout=30)
    assert refused.status_code == 422  # which patient: a reason, not a list of everyone
    assert [p["folder"] for p in withdrawn["pulls"]] == [str(cache_dir.resolve())] and withdrawn["pulls"][0]["command"] == "pull"
    run, fine_tuned = withdrawn["training_runs"]  # the run on the cache, and the one fine-tuned from it on phantoms: it learned too
    assert run["data"] == str(cache_dir.resolve()) and run["state"] == "finished" and run["model_sha256"]
    assert fine_tuned["out_dir"] == str((tmp_path / "tuned").resolve()) and fine_tuned["data"] is None
    assert [m["sha256"] for m in withdrawn["models"]] == [run["model_sha256"]] and withdrawn["active_model_learned_from_patient"] is True
    assert stranger == {"pulls": [], "training_runs": [], "models": [], "active_model_learned_from_patient": False}
    said = subprocess.run([*MR2CT, "audit", "lineage", "--patient-id", "PHMR0070001"], capture_output=True, text=True, timeout=120)
    assert said.returncode == 0, said.stderr[-2000:]
    assert f"into {cache_dir.resolve()}" in said.stdout and f"training run {run['run_id']} (finished" in said.stdout
    assert "(active)" in said.stdout and "the active model learned from this patient's images" in said.stdout
    as_json = subprocess.run([*MR2CT, "audit", "lineage", "--patient-id", "PHMR0070001", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout) == withdrawn
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["data"]["cache"] == "cache"  # as given
    assert card["training"]["data"]["mr_slices"] == 5 * 6 and card["training"]["data"]["ct_slices"] == 4 * 6
    assert card["mr_contrasts"] == ["T1"]  # what the pull recorded of each MR series: the node's config check holds its selection to it
    assert card["mr_contrast_agents"] == ["WITHOUT"] and card["mr_fat_suppression"] == ["WITHOUT"]  # and whether each was enhanced, fat-saturated
    assert card["mr_body_parts"] == ["HEAD"]  # and what anatomy (BodyPartExamined): the config check holds select_body_parts to it
    # The cache is archived elsewhere and trained on there; that run's model is copied to a GPU host
    # (here: another folder), fine-tuned there without this database and registered here. The lineage
    # follows the cache by the id the pull recorded, and the registered model by its card.
    archived = tmp_path / "archive" / "cache-2026"
    archived.parent.mkdir()
    shutil.move(cache_dir, archived)
    assert withdrawn["pulls"][0]["cache_id"] == cache_id(archived) and len(cache_id(archived)) == 24
    moved_run = subprocess.run([*MR2CT, "train", "--out", "moved-run", "--data", str(archived), "--epochs", "1", "--steps-per-epoch", "1",
                                "--batch-size", "2"], capture_output=True, text=True, timeout=600)
    assert moved_run.returncode == 0, moved_run.stderr[-2000:]
    elsewhere = tmp_path / "gpu-host"
    elsewhere.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(tmp_path / "moved-run" / name, elsewhere / name)
    offline = subprocess.run([*MR2CT, "train", "--no-record", "--out", str(elsewhere / "tuned"), "--init-from", str(elsewhere / "model.safetensors"),
                              "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--subjects-per-pool", "1", "--image-size", "64"],
                             capture_output=True, text=True, timeout=600)
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert json.loads((elsewhere / "tuned" / "model.json").read_text())["training"]["learned_from_caches"] == [cache_id(archived)]
    registered = subprocess.run([*MR2CT, "models", "register", str(elsewhere / "tuned")], capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stderr[-2000:]
    followed = json.loads(subprocess.run([*MR2CT, "audit", "lineage", "--patient-id", "PHMR0070001", "--json"], capture_output=True,
                                         text=True, timeout=120).stdout)
    assert [r["run_id"] for r in followed["training_runs"]] == [run["run_id"], fine_tuned["run_id"], run["run_id"] + 2]
    assert followed["training_runs"][2]["data"] == str(archived)
    offline_sha = json.loads((elsewhere / "tuned" / "model.json").read_text())["sha256"]
    assert [m["sha256"] for m in followed["models"]] == [run["model_sha256"], offline_sha]
    nobody = subprocess.run([*MR2CT, "audit", "lineage", "--patient-id", "NOT-PULLED", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(nobody.stdout) == stranger  # no pull, so no cache: no model is this patient's by its card either


def test_evaluate_pairs_leaves_out_the_patients_a_pulled_cache_trained_on(cohort_in_orthanc, orthanc, tmp_path):
    """The cohort's held-out pair went into the PACS and `mr2ct pull` took its patient into the
    training cache: `evaluate --pairs --training-cache` refuses to score that patient (the model may
    have learnt from them) and scores a patient the cache has never seen."""
    from training.phantom_dicom import write_mr_series

    cache_dir = tmp_path / "cache"
    pull(f"{orthanc.url}/dicom-web", cache_dir, [PullFilter("MR", description="T1"), PullFilter("CT")],
         username=orthanc.username, password=orthanc.password)
    pairs = tmp_path / "pairs"
    shutil.copytree(cohort_in_orthanc, pairs)
    one_view = ["--test-time-augmentation", "none"]  # which patients are scored is the question, not how well
    result = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--json", *one_view], capture_output=True, text=True, timeout=300)
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
    scored = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--training-cache", str(cache_dir), "--json", *one_view],
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    assert [p["mr_series_uid"] for p in report["pairs"]] == [unseen.series_uid]
    assert sum("split of the training cache" in reason for reason in report["left_out"]) == 1

    not_a_cache = subprocess.run([*MR2CT, "evaluate", "--pairs", str(pairs), "--training-cache", str(tmp_path / "pairs")],
                                 capture_output=True, text=True, timeout=300)
    assert not_a_cache.returncode == 2 and "is not a dataset cache" in not_a_cache.stderr
    assert not (tmp_path / "pairs" / "salt").exists()  # looking did not make one


def test_a_series_whose_uid_is_not_a_dicom_uid_is_left_out_of_both_pulls(tmp_path):
    """A PACS may hold what a scanner wrote wrong: a series UID of 65 characters, or with a leading
    zero in a component. Neither pull takes it (pull-pairs would name a folder after it); the
    valid series beside it is fetched."""
    from training.pacs_pull import PairsFilter, pull_pairs
    from training.phantom_dicom import write_mr_series

    source = tmp_path / "source"
    good = write_mr_series(source / "good", seed=31, slices=3, size=32, pixel_spacing=8.0, patient_id="UIDPAT")
    write_mr_series(source / "ct", seed=31, slices=3, size=32, pixel_spacing=8.0, patient_id="UIDPAT", modality="CT",
                    study_uid=good.study_uid)
    bad_uids = {"long": "1.2.826.0.1.3680043.8.498." + "1" * 39, "leading-zero": "1.2.826.0.1.3680043.8.498.0123"}
    assert len(bad_uids["long"]) == 65
    for name, uid in bad_uids.items():
        series = write_mr_series(source / name, seed=32, slices=3, size=32, pixel_spacing=8.0, patient_id="UIDPAT",
                                 study_uid=good.study_uid)
        for path in series.folder.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = uid
            ds.save_as(path)
    with OrthancServer(tmp_path / "pacs", http_port=free_port(), dicom_port=free_port()) as server:
        for path in sorted(source.rglob("*.dcm")):
            requests.post(f"{server.url}/instances", data=path.read_bytes(), auth=server.auth, timeout=30).raise_for_status()
        stored = {s["MainDicomTags"]["SeriesInstanceUID"] for s in server.get("/series?expand")}
        assert set(bad_uids.values()) <= stored  # the PACS took them: the pulls must sort them out
        counts = pull(f"{server.url}/dicom-web", tmp_path / "cache", [PullFilter("MR")], username=server.username,
                      password=server.password)
        assert counts["found"] == counts["fetched"] == 1
        assert [e["series_uid"] for e in DatasetCache(tmp_path / "cache").entries()] == [good.series_uid]
        pairs = pull_pairs(f"{server.url}/dicom-web", tmp_path / "pairs", PairsFilter(), username=server.username,
                           password=server.password)
        assert pairs["fetched"] == 2 and pairs["found"] == 2  # the good MR and the CT
        folders = {p.name for p in (tmp_path / "pairs").glob("*/*") if p.is_dir()}
        assert good.series_uid in folders and not folders & set(bad_uids.values())


def test_forget_takes_a_withdrawn_patient_out_of_every_pulled_folder_for_good(cohort_in_orthanc, orthanc, tmp_path):
    """A patient withdraws consent to research use while the PACS keeps their studies (a clinical
    archive): `mr2ct forget` deletes their series from the training cache and the pairs folder the
    pulls copied them into (one moved since, named with --folder), audits each deletion, and no
    later pull takes them again. The other patients stay; the cache still counts them as trained
    on (a model may have learnt from them)."""
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent
    from training.pacs_pull import patient_key

    auth = ["--username", orthanc.username, "--password", orthanc.password]
    cache_dir, pairs_dir = tmp_path / "cache", tmp_path / "pairs"
    pulls = ([*MR2CT, "pull", "--url", f"{orthanc.url}/dicom-web", "--cache", str(cache_dir), "--validation-fraction", "0", *auth],
             [*MR2CT, "pull-pairs", "--url", f"{orthanc.url}/dicom-web", "--out", str(pairs_dir), *auth])
    for command in pulls:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    cache = DatasetCache(cache_dir)
    key = patient_key("PHPR0070000", "", cache.salt)
    theirs = [e for e in cache.entries() if e["patient_key"] == key]
    others = [e for e in cache.entries() if e["patient_key"] != key]
    assert len(theirs) == 2 and len(others) == 4 + 3  # their MR and CT; the MR-only and CT-only subjects
    pair_key = next(p.name for p in pairs_dir.iterdir() if p.is_dir())
    moved = tmp_path / "archive" / "cache"
    moved.parent.mkdir()
    shutil.move(cache_dir, moved)
    forgot = subprocess.run([*MR2CT, "forget", "--patient-id", "PHPR0070000"], capture_output=True, text=True, timeout=120)
    assert forgot.returncode == 1, forgot.stderr[-2000:]  # the cache is not where the pull copied into: said, not skipped silently
    assert f"{cache_dir.resolve()}: not there any more" in forgot.stderr and "--folder" in forgot.stderr
    assert f"{pairs_dir}: removed 2 series of the patient" in forgot.stdout and not (pairs_dir / pair_key).exists()
    forgot = subprocess.run([*MR2CT, "forget", "--patient-id", "PHPR0070000", "--folder", str(moved)], capture_output=True, text=True,
                            timeout=120)
    assert forgot.returncode == 0, forgot.stderr[-2000:]
    assert f"{moved}: removed 2 series of the patient" in forgot.stdout
    cache = DatasetCache(moved)
    assert sorted(e["series_uid"] for e in cache.entries()) == sorted(e["series_uid"] for e in others)
    assert not any((moved / e["shard"]).exists() for e in theirs) and all((moved / e["shard"]).exists() for e in others)
    assert cache.withdrawn() == {key} and key in cache.patients()  # still counted as trained on
    sessions = init_db(os.environ["MR2CT_DATABASE_URL"])
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "pulled-data-removed").order_by(AuditEvent.id)).all()
        removed = [(r.detail["destination"], sorted(r.detail["series"]), r.detail.get("patient_id")) for r in rows if r.detail["series"]]
    assert sorted(removed) == sorted([(str(pairs_dir.resolve()), sorted(e["series_uid"] for e in theirs), "PHPR0070000"),
                                      (str(moved.resolve()), sorted(e["series_uid"] for e in theirs), "PHPR0070000")])
    assert all("withdrew consent" in r.detail["why"] for r in rows)
    lineage = json.loads(subprocess.run([*MR2CT, "audit", "lineage", "--patient-id", "PHPR0070000", "--json"], capture_output=True,
                                        text=True, timeout=120).stdout)
    assert lineage["pulls"] and all(p["removed_at"] for p in lineage["pulls"])
    # The PACS still holds them: later pulls into both folders take everyone else, not them.
    again = subprocess.run([str(moved) if a == str(cache_dir) else a for a in pulls[0]], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "not taken 2 of patients withdrawn from the cache (mr2ct forget)" in again.stdout, again.stdout
    assert "fetched 0," in again.stdout and len(DatasetCache(moved).entries()) == 7
    again = subprocess.run(pulls[1], capture_output=True, text=True, timeout=300)  # the cohort's one pair was theirs
    assert again.returncode == 2 and "(not taken: 1 patient(s) withdrawn from this folder by mr2ct forget)" in again.stderr, again.stderr
    assert not (pairs_dir / pair_key).exists()


def test_forget_takes_a_folder_once_that_an_old_pull_named_by_path_and_a_later_one_by_id(tmp_path):
    """Pulls recorded before 2026-12-07 name their folder by path alone; later pulls into the same
    folder name it by its cache id too, and --folder may name it again. `mr2ct forget` withdraws
    the patient there once: one line, one audit row (it did so twice, the second row empty)."""
    from sqlalchemy import select

    from dicom_node import audit
    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent
    from training.pacs_pull import folder_salt, patient_key

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    key = patient_key("PHFORGET01", "", folder_salt(pairs / ".salt"))
    series_uid = "1.2.826.0.1.3680043.8.498.4242"
    (pairs / key / series_uid).mkdir(parents=True)
    (pairs / key / series_uid / "1.dcm").write_bytes(b"not read")
    sessions = init_db(os.environ["MR2CT_DATABASE_URL"])
    where = {"source": "http://pacs/dicom-web", "destination": str(pairs.resolve()), "command": "pull-pairs"}
    with sessions.begin() as session:
        for recorded in ({}, {"cache_id": cache_id(pairs)}):  # the old pull's row, then the later one's
            session.add(audit.event(audit.DATA_PULLED, "success", "tester (mr2ct pull-pairs)", study_uid="1.2.826.0.1.3680043.8.498.42",
                                    patient_id="PHFORGET01", issuer="", series=[series_uid], instances=1, **where, **recorded))
    forgot = subprocess.run([*MR2CT, "forget", "--patient-id", "PHFORGET01", "--folder", str(tmp_path / "." / "pairs")],
                            capture_output=True, text=True, timeout=120)
    assert forgot.returncode == 0, forgot.stderr[-2000:]
    assert [line for line in forgot.stdout.splitlines() if "series of the patient" in line] == [
        f"{tmp_path / '.' / 'pairs'}: removed 1 series of the patient; later pulls into it do not take them again"]
    assert not (pairs / key).exists()
    with sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == audit.PULLED_DATA_REMOVED)).all()
    assert [r.detail["series"] for r in rows] == [[series_uid]]
