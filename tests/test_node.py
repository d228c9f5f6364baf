"""What a PACS administrator relies on from the node: selection rules, completion on release,
routing originals to Orthanc, refusals when the spool is full, host-bound AE titles,
association limits, recovery after a crash, DICOM over TLS."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage, RLELossless
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db import close_engines, init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import NodeServer, OrthancServer, echoscu, free_port, nodelay_env, start_storescp, stop_process, storescu
from dicom_node.models import AuditEvent, Instance, Job, Series
from dicom_node.worker import STAGES
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token, audit_events, make_pki, rewrite_as_ge, series_datasets, study_series
from training.phantom_dicom import write_mr_series


def _series_row(node, uid: str, timeout: float = 60, state: str | None = None) -> Series:
    sessions = init_db(node.database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            row = session.get(Series, uid)
        if row is not None and (state is None or row.state == state):
            return row
        time.sleep(0.3)
    raise AssertionError(f"series {uid} did not reach state {state} in {timeout} s")


def _small(tmp_path: Path, name: str, seed: int, **kwargs) -> "object":
    kwargs.setdefault("slices", 4)
    return write_mr_series(tmp_path / name, seed=seed, size=kwargs.pop("size", 48), pixel_spacing=5.0, slice_spacing=10.0, **kwargs)


def test_series_that_do_not_match_the_selection_rules_are_recorded_with_the_reason(node_factory, tmp_path):
    node = node_factory(select_min_slices="3", select_orientations="axial", select_description_exclude="localizer")
    wanted = _small(tmp_path, "wanted", 201)
    too_short = _small(tmp_path, "short", 202, slices=2)
    sagittal = _small(tmp_path, "sagittal", 203, orientation="sagittal")
    scout = _small(tmp_path, "scout", 204, series_description="3-plane LOCALIZER")
    for series in (wanted, too_short, sagittal, scout):
        assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, wanted.series_uid, timeout=120).state == "done"
    rows = {name: _series_row(node, s.series_uid, state="ignored") for name, s in (("short", too_short), ("sagittal", sagittal), ("scout", scout))}
    assert "fewer than the 3 required" in rows["short"].reason
    assert "orientation sagittal" in rows["sagittal"].reason
    assert "exclusion" in rows["scout"].reason
    assert {name: row.reason_code for name, row in rows.items()} == {"short": "min_slices", "sagittal": "orientation", "scout": "description"}
    sessions = init_db(node.database_url)
    with sessions() as session:
        assert not session.scalars(select(Job).where(Job.series_instance_uid.in_([too_short.series_uid, sagittal.series_uid, scout.series_uid]))).all()
        audited = session.scalars(select(AuditEvent).where(AuditEvent.series_instance_uid == sagittal.series_uid, AuditEvent.action == "series-stable")).all()
        assert audited and audited[0].detail["synthesized"] is False


def test_localizers_are_recorded_as_such_not_made_into_a_failed_job_or_a_ct_of_three_slices(node_factory, tmp_path):
    """Every MR exam starts with a localizer: slices in three planes in one series, or a stack
    whose ImageType says LOCALIZER. Until 2026-12-05 the first failed its job ("mixed
    orientations") and the second became an sCT of three slices, in every exam a scanner routed.
    Now neither is synthesized and each is recorded with why; the exam's T1 is synthesized."""
    node = node_factory()
    study = "1.2.826.0.1.3680043.8.498.231"
    wanted = _small(tmp_path, "t1", 231, study_uid=study)
    three_plane = _small(tmp_path, "three-plane", 232, slices=3, series_description="3-plane loc", study_uid=study)
    for path, orientation in zip(sorted(three_plane.files)[1:], ([0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1])):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = orientation  # sagittal, then coronal, after the axial slice
        ds.save_as(path)
    flagged = _small(tmp_path, "flagged", 233, slices=3, series_description="scout", study_uid=study)
    for path in flagged.files:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    phase = _small(tmp_path, "phase", 236, slices=3, series_description="gre_field_mapping", study_uid=study)
    for path in phase.files:  # a field map's phase difference: Siemens writes P third
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        ds.save_as(path)
    # GE writes ImageType ORIGINAL\\PRIMARY\\OTHER for magnitude and phase alike, and the component in a
    # private element (0043,xx2F of GEMS_PARM_01; 1: phase): synthesized until 2026-12-05. The T1 is GE's too (0: magnitude).
    ge_phase = _small(tmp_path, "ge-phase", 237, slices=3, series_description="B0 map", study_uid=study)
    rewrite_as_ge(ge_phase.files, 1)
    rewrite_as_ge(wanted.files, 0)
    water = _small(tmp_path, "dixon-water", 238, slices=3, series_description="t1_vibe_dixon_tra_W", study_uid=study)
    for path in water.files:  # a Dixon's water image, which Siemens sends as a series of its own beside the in-phase one
        ds = pydicom.dcmread(path)
        ds.ImageType = ["DERIVED", "PRIMARY", "DIXON", "WATER"]
        ds.save_as(path)
    for series in (three_plane, flagged, phase, ge_phase, water, wanted):
        assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, wanted.series_uid, timeout=120).state == "done"
    assert "holds P, excluded by select_image_type_exclude (phase images)" in _series_row(node, phase.series_uid, state="ignored").reason
    assert "holds WATER, excluded by select_image_type_exclude (a Dixon water" in _series_row(node, water.series_uid, state="ignored").reason
    assert (_series_row(node, ge_phase.series_uid, state="ignored").reason
            == "GE's private image type (0043,xx2F) 1 says PHASE, excluded by select_complex_component_exclude (phase images)")
    three_plane_row = _series_row(node, three_plane.series_uid, state="ignored")
    assert "its slices lie in 3 planes (axial, coronal, sagittal)" in three_plane_row.reason
    flagged_row = _series_row(node, flagged.series_uid, state="ignored")
    assert "LOCALIZER" in flagged_row.reason and "select_image_type_exclude" in flagged_row.reason
    with init_db(node.database_url)() as session:
        assert not session.scalars(select(Job).where(Job.series_instance_uid.in_([three_plane.series_uid, flagged.series_uid,
                                                                                   phase.series_uid, ge_phase.series_uid,
                                                                                   water.series_uid]))).all()


def test_a_series_with_several_images_at_each_position_is_recorded_as_such_not_made_into_a_failed_job(node_factory, orthanc, tmp_path):
    """A diffusion series holds a b=0 and a b=1000 image at every position (so do multi-echo and
    dynamic series): no one volume. Until 2026-12-05 every such series a scanner routed became a
    job that failed (a failure on the dashboard and in the metrics for each exam); now it is
    recorded ignored with why, as a localizer is, and no job is made. Asked for by name
    (POST /synthesize), the same reason comes back as a 422. So is an enhanced multi-frame series
    whose frames repeat positions."""
    node = node_factory()
    series = _small(tmp_path, "dwi", 235, series_description="ep2d_diff_b0_1000")
    for path in list(series.files):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.DiffusionBValue = 1000
        ds.save_as(path.with_name(f"b1000-{path.name}"), enforce_file_format=True)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    row = _series_row(node, series.series_uid, state="ignored")
    assert "its 8 images lie at 4 positions" in row.reason and "diffusion b-values" in row.reason
    with init_db(node.database_url)() as session:
        assert not session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid)).all()
    for path in series.folder.glob("*.dcm"):
        assert httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=orthanc.auth).status_code == 200
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'pacs-admin')}"}
    asked = httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/synthesize", json={"series_uid": series.series_uid},
                       headers=admin, timeout=60)
    assert asked.status_code == 422 and "its 8 images lie at 4 positions" in asked.json()["detail"], asked.text

    # The same in one enhanced multi-frame instance, as Philips and newer Siemens scanners send
    # diffusion (a failed job until 2026-12-05, after its frames were read)
    import highdicom as hd

    singles = [pydicom.dcmread(f) for f in sorted(series.folder.glob("*.dcm"))]
    enhanced_uid = pydicom.uid.generate_uid()
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        singles, series_instance_uid=enhanced_uid, series_number=7, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    folder = tmp_path / "enhanced"
    folder.mkdir()
    image.save_as(folder / "dwi.dcm", enforce_file_format=True)
    assert storescu(folder, node.port, NODE_AE, SCANNER_AE, propose="-R").returncode == 0
    assert "its 8 images lie at 4 positions" in _series_row(node, enhanced_uid, state="ignored").reason

    # ... and in one multi-frame instance per b-value (or echo), each at the same four positions:
    # counted instance by instance, it made a failed job until 2026-12-05
    per_value_uid, per_value = pydicom.uid.generate_uid(), tmp_path / "per-b-value"
    per_value.mkdir()
    for number, b_value in enumerate((0, 1000), start=1):
        frames = [ds for ds in singles if float(ds.get("DiffusionBValue", 0)) == b_value]
        assert len(frames) == 4
        hd.legacy.LegacyConvertedEnhancedMRImage(
            frames, series_instance_uid=per_value_uid, series_number=8, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=number,
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian).save_as(per_value / f"b{b_value}.dcm", enforce_file_format=True)
    assert storescu(per_value, node.port, NODE_AE, SCANNER_AE, propose="-R").returncode == 0
    assert "its 8 images lie at 4 positions" in _series_row(node, per_value_uid, state="ignored").reason


def test_a_series_whose_stray_slice_moved_to_its_own_series_is_synthesized_when_sent_again(node_factory, tmp_path):
    """A sagittal slice filed into an axial series by mistake keeps the series out (two planes);
    once it is sent again under a series of its own (corrected upstream, same SOP Instance UID)
    and the axial slices are sent again, the series is one volume and is synthesized: its planes
    are those of the instances it holds now (a series once marked stayed out until 2026-12-05)."""
    node = node_factory()
    series = _small(tmp_path, "t1", 234, slices=5)
    stray = sorted(series.files)[-1]
    ds = pydicom.dcmread(stray)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(stray)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert "2 planes (axial, sagittal)" in _series_row(node, series.series_uid, state="ignored").reason
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(corrected / stray.name)
    assert storescu(corrected, node.port, NODE_AE, SCANNER_AE).returncode == 0
    stray.unlink()
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "done", job.error
    assert job.instance_count == 4


def test_the_image_type_rule_is_the_sites_to_widen_or_turn_off():
    """By default a localizer, a Siemens mosaic (a volume's slices tiled in one image: fMRI,
    diffusion; synthesized as a slice until 2026-12-05) and phase images (synthesized until
    2026-12-05) are kept out; select_image_type_exclude=""
    synthesizes a series flagged LOCALIZER; DERIVED added keeps maps out."""
    from dicom_node.ingest import SelectionRules
    from dicom_node.settings import Settings

    flagged = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")
    adc = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type="DERIVED\\PRIMARY\\DIFFUSION\\ADC")
    default = SelectionRules(image_types_excluded=tuple(Settings().select_image_type_exclude))
    assert default.reason_to_skip(flagged) is not None and default.reason_to_skip(adc) is None
    mosaic = Series(modality="MR", series_description="", instance_count=1, orientation="axial", image_type="ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC")
    assert "holds MOSAIC" in default.reason_to_skip(mosaic) and "holds MOSAIC" in SelectionRules().reason_to_skip(mosaic)
    # phase images (a field map's phase difference, SWI's phase; Siemens P third, Philips P fourth): angles, not tissue
    for image_type in ("ORIGINAL\\PRIMARY\\P\\ND", "ORIGINAL\\PRIMARY\\P_FFE\\P\\FFE", "DERIVED\\PRIMARY\\PHASE MAP"):
        phase = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type=image_type)
        assert "(phase images)" in default.reason_to_skip(phase), image_type
    magnitude = Series(modality="MR", series_description="", instance_count=20, orientation="axial", image_type="ORIGINAL\\PRIMARY\\M\\ND")
    assert default.reason_to_skip(magnitude) is None
    # a Dixon T1 comes as four series of one timing: only the in-phase one has the T1 contrast (the others made sCTs until 2026-12-05)
    dixon = {image: Series(modality="MR", series_description="", instance_count=20, orientation="axial",
                           image_type=f"DERIVED\\PRIMARY\\DIXON\\{image}") for image in ("IN_PHASE", "OPP_PHASE", "WATER", "FAT")}
    assert default.reason_to_skip(dixon["IN_PHASE"]) is None
    for image in ("OPP_PHASE", "WATER", "FAT"):
        assert default.reason_to_skip(dixon[image]) == (f"ImageType 'DERIVED\\\\PRIMARY\\\\DIXON\\\\{image}' holds {image}, excluded by "
                                                        "select_image_type_exclude (a Dixon water, fat or opposed-phase image: its in-phase "
                                                        "image is the T1 one)")
    off = SelectionRules(image_types_excluded=tuple(Settings(select_image_type_exclude="").select_image_type_exclude))
    assert off.reason_to_skip(flagged) is None
    wider = SelectionRules(image_types_excluded=tuple(Settings(select_image_type_exclude="localizer, derived").select_image_type_exclude))
    assert "DERIVED" in wider.reason_to_skip(adc)


def test_a_node_stopped_by_sigterm_finishes_its_log_audit_and_database_and_exits_0(node_factory, tmp_path):
    """A stop (a rolling restart, an orchestrator's SIGTERM) ends the process with status 0 once
    everything is written: the log's last line says stopped, the stop is audited, and the SQLite
    database's write-ahead log is folded back (every connection closed), though the process now
    leaves without the interpreter's teardown of torch's modules."""
    node = node_factory()
    series = write_mr_series(tmp_path / "mr", seed=240, slices=3, size=32, pixel_spacing=6.0, slice_spacing=10.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    close_engines()  # this test's own connections (wait_for_job's): the node's are then the last
    proc = node.proc
    node.stop()
    assert proc is not None and proc.returncode == 0
    assert node.log_path.read_text().splitlines()[-1].endswith("INFO dicom_node.service stopped")
    database = Path(node.database_url.removeprefix("sqlite:///"))
    assert not Path(f"{database}-wal").exists()  # the last connection closed checkpoints and removes it
    stops = audit_events(node.database_url, lambda e: e.action == "application-activity/stop")
    assert [e.outcome for e in stops] == ["success"]


def test_a_series_completes_when_its_association_is_released(node_factory, tmp_path):
    """Completion on release queues the job, and the queueing wakes the worker: neither the hour
    of stable_seconds nor the minute between the worker's polls is waited for."""
    node = node_factory(stable_seconds="3600", complete_on_release="true", poll_seconds="60")
    series = _small(tmp_path, "mr", 210)
    started = time.monotonic()
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=45)
    assert job.state == "done", job.error
    assert time.monotonic() - started < 45
    # nor does stopping wait for it: each background round sees SIGTERM within a second (it took the
    # whole minute of poll_seconds until 2026-12-06, and an orchestrator's grace period is shorter)
    stopping = time.monotonic()
    node.stop()
    assert time.monotonic() - stopping < 20
    assert "INFO dicom_node.service stopped" in node.log_path.read_text()


def test_originals_are_routed_to_orthanc(node_factory, orthanc, tmp_path):
    node = node_factory(forward_originals="true")
    series = _small(tmp_path, "mr", 220)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    deadline = time.monotonic() + 60
    held = 0
    while time.monotonic() < deadline and held < 4:
        found = httpx.post(f"{orthanc.url}/tools/lookup", content=series.series_uid, auth=orthanc.auth).json()
        held = len(orthanc.get(f"/series/{found[0]['ID']}")["Instances"]) if found else 0
        time.sleep(0.3)
    assert held == 4
    sessions = init_db(node.database_url)
    with sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
        assert all(r.forwarded_at is not None for r in rows)


def test_originals_are_routed_by_c_store_to_any_ae_in_the_syntax_they_came_in(node_factory, orthanc, tmp_path):
    """forward_to = AE@host:port routes by DICOM (here to Orthanc's DICOM port, not its REST API):
    each original lands in the transfer syntax it was received in, a JPEG-LS one included."""
    series = _small(tmp_path, "mr", 225)
    jpeg_ls = tmp_path / "jpeg-ls.dcm"
    subprocess.run(["dcmcjpls", str(series.files[0]), str(jpeg_ls)], check=True, env=nodelay_env())
    series.files[0].unlink()
    node = node_factory(forward_originals="true", forward_to=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    # As at any PACS, the node's AE must be known to the destination before it may store there.
    registered = httpx.put(f"{orthanc.url}/modalities/mr2ct-router", auth=orthanc.auth,
                           json={"AET": NODE_AE, "Host": "127.0.0.1", "Port": node.port, "AllowStore": True})
    assert registered.status_code == 200, registered.text
    try:
        assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
        assert storescu(jpeg_ls, node.port, NODE_AE, SCANNER_AE, propose="-xt").returncode == 0
        sessions = init_db(node.database_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sessions() as session:
                rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
            if len(rows) == 4 and all(r.forwarded_at is not None for r in rows):
                break
            time.sleep(0.3)
    finally:
        httpx.delete(f"{orthanc.url}/modalities/mr2ct-router", auth=orthanc.auth)
    assert len(rows) == 4 and all(r.forwarded_at is not None for r in rows), [r.forward_error for r in rows]
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=series.series_uid, auth=orthanc.auth).json()
    held = orthanc.get(f"/series/{found[0]['ID']}")["Instances"]
    syntaxes = {httpx.get(f"{orthanc.url}/instances/{i}/metadata/TransferSyntax", auth=orthanc.auth).text for i in held}
    assert len(held) == 4 and syntaxes == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"}
    with sessions() as session:
        audited = session.scalars(select(AuditEvent).where(AuditEvent.actor == "forwarder")).all()
    assert any(a.detail.get("destination") == f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}" for a in audited)


def test_a_destination_that_takes_only_uncompressed_data_gets_compressed_originals_decoded(node_factory, tmp_path):
    """dcmtk's storescp accepts only uncompressed, undeflated syntaxes by default: a JPEG-LS and a
    deflated original reach it decoded (pixel for pixel the same, same UIDs); the spool keeps
    them as received."""
    series = _small(tmp_path, "mr", 227, slices=2)
    jpeg_ls, deflated = tmp_path / "jpeg-ls.dcm", tmp_path / "deflated.dcm"
    subprocess.run(["dcmcjpls", str(series.files[0]), str(jpeg_ls)], check=True, env=nodelay_env())
    subprocess.run(["dcmconv", "+td", str(series.files[1]), str(deflated)], check=True, env=nodelay_env())
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    storescp = start_storescp(received, port, "PLAINPACS")
    try:
        node = node_factory(forward_originals="true", forward_to=f"PLAINPACS@127.0.0.1:{port}")
        assert storescu(jpeg_ls, node.port, NODE_AE, SCANNER_AE, propose="-xt").returncode == 0
        assert storescu(deflated, node.port, NODE_AE, SCANNER_AE, propose="-xd").returncode == 0
        # storescp answers a C-STORE once the file is written: wait for the node to have both answers.
        sessions = init_db(node.database_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with sessions() as session:
                routed = session.scalars(select(Instance.forwarded_at).where(Instance.series_instance_uid == series.series_uid)).all()
            if len(routed) == 2 and all(routed):
                break
            time.sleep(0.3)
    finally:
        stop_process(storescp)
    arrived = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in received.iterdir())}
    assert len(arrived) == 2
    with init_db(node.database_url)() as session:
        for source, syntax in ((series.files[0], "1.2.840.10008.1.2.4.80"), (series.files[1], "1.2.840.10008.1.2.1.99")):
            original = pydicom.dcmread(source)
            copy = arrived[original.SOPInstanceUID]  # the same instance UID
            assert copy.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
            assert (copy.pixel_array == original.pixel_array).all()
            row = session.get(Instance, original.SOPInstanceUID)
            assert row.forwarded_at is not None and row.transfer_syntax_uid == syntax
            assert pydicom.dcmread(row.path).file_meta.TransferSyntaxUID == syntax  # the spool keeps it as received


def test_an_unreachable_c_store_destination_is_retried_and_nothing_is_lost(node_factory, tmp_path):
    closed = free_port()
    node = node_factory(forward_originals="true", forward_to=f"NOBODY@127.0.0.1:{closed}")
    series = _small(tmp_path, "mr", 226, slices=2)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    sessions = init_db(node.database_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with sessions() as session:
            rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
        if rows and all(r.forward_attempts >= 1 for r in rows):
            break
        time.sleep(0.3)
    assert len(rows) == 2 and all(r.forward_attempts >= 1 and r.forwarded_at is None for r in rows)
    assert all("did not accept an association" in (r.forward_error or "") for r in rows)
    assert all(Path(r.path).is_file() for r in rows)  # still in the spool, to be routed when the AE is back
    assert echoscu(node.port, NODE_AE, SCANNER_AE).returncode == 0
    # The administrator sees the failures, brings the AE up and asks for a retry without waiting out the backoff.
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'pacs-admin')}"}
    status = httpx.get(f"{base}/routing", headers=admin).json()
    assert status["destination"] == f"dicom://NOBODY@127.0.0.1:{closed}" and status["failing"] == 2 and status["routed"] == 0
    assert {f["sop_instance_uid"] for f in status["failures"]} == {r.sop_instance_uid for r in rows}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # let the backoff grow to 16 s, so only the retry can explain a quick delivery
        with sessions() as session:
            attempts = session.scalars(select(Instance.forward_attempts).where(Instance.series_instance_uid == series.series_uid)).all()
        if min(attempts) >= 5:
            break
        time.sleep(0.5)
    received = tmp_path / "received"
    received.mkdir()
    storescp = start_storescp(received, closed, "NOBODY")
    try:
        retried = time.monotonic()
        assert httpx.post(f"{base}/routing/retry", headers=admin).json()["rescheduled"] <= 2  # (one may have come due by itself)
        while time.monotonic() < retried + 10 and httpx.get(f"{base}/routing", headers=admin).json()["routed"] < 2:
            time.sleep(0.3)
    finally:
        stop_process(storescp)
    status = httpx.get(f"{base}/routing", headers=admin).json()
    assert status["routed"] == 2 and status["failing"] == 0 and status["waiting"] == 0


def test_a_full_spool_answers_out_of_resources_and_keeps_nothing(node_factory, tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    node = node_factory(spool_min_free_mb=str(free_mb + 10_000))
    series = _small(tmp_path, "mr", 230, slices=1)
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(pydicom.dcmread(series.files[0]))
        assert status.Status == 0xA700
        assert assoc.send_c_echo().Status == 0  # the node keeps serving
    finally:
        assoc.release()
    assert not [p for p in (node.workdir / "spool").rglob("*") if p.is_file()]
    sessions = init_db(node.database_url)
    with sessions() as session:
        refused = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused")).all()
    assert refused and refused[0].detail["status"] == "0xA700"


def test_an_ae_title_bound_to_another_host_is_rejected_from_here(node_factory):
    node = node_factory(allowed_aes=f"{SCANNER_AE}@127.0.0.1,REMOTE_ONLY@10.255.255.1")
    assert echoscu(node.port, NODE_AE, SCANNER_AE).returncode == 0
    refused = echoscu(node.port, NODE_AE, "REMOTE_ONLY")
    assert refused.returncode != 0
    assert "reject" in (refused.stdout + refused.stderr).lower()


def test_with_check_called_ae_an_association_for_another_node_is_rejected_and_audited(node_factory):
    """A scanner set up for another node's AE title on this host and port is turned away (and
    the administrator sees why), not silently taken as if it were meant for this node."""
    node = node_factory(check_called_ae="true")
    assert echoscu(node.port, NODE_AE, SCANNER_AE).returncode == 0
    refused = echoscu(node.port, "OTHER_NODE", SCANNER_AE)
    assert refused.returncode != 0 and "called ae title not recognized" in (refused.stdout + refused.stderr).lower()
    assert audit_events(node.database_url, lambda e: e.outcome == "failure" and "OTHER_NODE" in (e.detail or {}).get("reason", ""))


def test_associations_past_the_limit_are_rejected(node_factory):
    node = node_factory(max_associations="1")
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert held.is_established
    try:
        assert echoscu(node.port, NODE_AE, "ECHOSCU").returncode != 0
    finally:
        held.release()
    time.sleep(0.5)
    assert echoscu(node.port, NODE_AE, "ECHOSCU").returncode == 0


def test_after_kill_9_the_spool_is_recovered_and_the_series_synthesized_once(node_factory, tmp_path):
    workdir = tmp_path / "crashing-node"
    first = node_factory(workdir=workdir, stable_seconds="3600")
    series = _small(tmp_path, "mr", 240, slices=6)
    assert storescu(series.folder, first.port, NODE_AE, SCANNER_AE).returncode == 0
    first.kill()
    # An instance that reached the disk but not the database when the process died,
    # and a half-written temporary that was never acknowledged.
    study_dir = workdir / "spool" / series.study_uid
    extra = pydicom.dcmread(series.files[-1])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.240240"
    extra.ImagePositionPatient = [*extra.ImagePositionPatient[:2], float(extra.ImagePositionPatient[2]) + 10.0]
    extra.save_as(study_dir / series.series_uid / f"{extra.SOPInstanceUID}.dcm", enforce_file_format=True)
    (study_dir / series.series_uid / ".1.2.3.tmp").write_bytes(b"partial")
    second = node_factory(workdir=workdir, port=first.port, stable_seconds="1.5")
    job = wait_for_job(second.database_url, series.series_uid, timeout=120)
    assert job.state == "done", job.error
    assert not (study_dir / series.series_uid / ".1.2.3.tmp").exists()
    sessions = init_db(second.database_url)
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid)).all()
        instances = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
    assert len(jobs) == 1
    assert len(instances) == 7 == len(list((study_dir / series.series_uid).glob("*.dcm")))
    assert jobs[0].instance_count == 7


def _rows_by_series(database_url: str) -> dict[str, list[Instance]]:
    sessions = init_db(database_url)
    with sessions() as session:
        rows = session.scalars(select(Instance)).all()
    grouped: dict[str, list[Instance]] = {}
    for row in rows:
        grouped.setdefault(row.series_instance_uid, []).append(row)
    return grouped


def test_instances_sent_again_under_another_series_move_there_whole(node_factory, tmp_path):
    """A series split upstream (or an instance corrected into another series) and sent again keeps
    its SOP Instance UIDs: the instances move to the new series, whose sCT is made from them, the
    old series counts fewer, and no stale copy stays in the spool for a restart to record back.
    Until 2026-12-05 the rows kept naming the old files, and the new series was synthesized
    without them. Then a node restarted after a crash between a move and the old copy's deletion
    deletes that copy, and records a move the crash left unrecorded."""
    workdir = tmp_path / "moving-node"
    node = node_factory(workdir=workdir, complete_on_release="true")
    series = _small(tmp_path, "mr", 245)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    split = tmp_path / "split"
    split.mkdir()
    split_uid = "1.2.826.0.1.3680043.8.498.245245"
    for path in series.files[2:]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = split_uid, 99, "T1 split"
        ds.save_as(split / path.name, enforce_file_format=True)
    assert storescu(split, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, split_uid, timeout=120)
    assert job.state == "done", job.error
    assert job.instance_count == 2
    spool = workdir / "spool" / series.study_uid
    rows = _rows_by_series(node.database_url)
    assert {uid: len(found) for uid, found in rows.items()} == {series.series_uid: 2, split_uid: 2}
    for uid, found in rows.items():
        assert sorted(Path(r.path) for r in found) == sorted((spool / uid).glob("*.dcm"))
    assert _series_row(node, series.series_uid).instance_count == 2
    assert _series_row(node, split_uid).instance_count == 2
    node.stop()

    # A crash between a move's commit and the deletion of the old copy left that copy (written
    # before the move); a crash right after another move's file reached the spool left it unrecorded.
    moved_back = rows[split_uid][0]
    stale = spool / series.series_uid / Path(moved_back.path).name
    original = pydicom.dcmread(moved_back.path)
    original.SeriesInstanceUID = series.series_uid  # as it was before the split
    original.save_as(stale, enforce_file_format=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    unrecorded_uid = "1.2.826.0.1.3680043.8.498.245246"
    unrecorded = pydicom.dcmread(rows[series.series_uid][0].path)
    unrecorded.SeriesInstanceUID = unrecorded_uid
    (spool / unrecorded_uid).mkdir()
    unrecorded.save_as(spool / unrecorded_uid / f"{unrecorded.SOPInstanceUID}.dcm", enforce_file_format=True)
    restarted = node_factory(workdir=workdir, port=node.port)
    assert wait_for_job(restarted.database_url, unrecorded_uid, timeout=120).state == "done"
    assert not stale.exists()
    rows = _rows_by_series(restarted.database_url)
    assert {uid: len(found) for uid, found in rows.items()} == {series.series_uid: 1, split_uid: 2, unrecorded_uid: 1}
    assert not (spool / series.series_uid / f"{unrecorded.SOPInstanceUID}.dcm").exists()
    recovery = audit_events(restarted.database_url, lambda e: e.action == "spool-recovery")
    assert recovery[-1].detail["superseded_removed"] == 1 and recovery[-1].detail["recovered"] == 1


def test_an_sct_made_again_from_fewer_slices_leaves_none_of_the_old_ones_in_orthanc(node_factory, orthanc, tmp_path):
    """A series split upstream (two of its four slices sent again under a series of their own) and
    made again: its new sCT has two slices, and Orthanc's copy of the sCT series must hold just
    those. Until 2026-12-05 the two slices of the MR slices that had left stayed in the sCT series
    (a planning system would take them for part of it), and the count Orthanc gave (4 of 2) made
    the job retry for an hour and fail."""
    node = node_factory(complete_on_release="true")
    series = _small(tmp_path, "mr", 247)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    first = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert first.state == "done", first.error
    split, again = tmp_path / "split", tmp_path / "again"
    split.mkdir(), again.mkdir()
    for path in series.files[2:]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.826.0.1.3680043.8.498.247247", 98
        ds.save_as(split / path.name, enforce_file_format=True)
    assert storescu(split, node.port, NODE_AE, SCANNER_AE).returncode == 0
    shutil.copy(series.files[0], again / series.files[0].name)  # the series that stays is sent again
    assert storescu(again, node.port, NODE_AE, SCANNER_AE).returncode == 0
    second = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=first.id)
    assert second.state == "done", second.error
    assert second.ct_series_uid == first.ct_series_uid  # the same model, the same sCT series
    (sct,) = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["SeriesInstanceUID"] == second.ct_series_uid]
    kept = {pydicom.dcmread(f).SOPInstanceUID for f in series.files[:2]}
    assert sorted(ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in series_datasets(orthanc, sct)) == sorted(kept)
    transferred = audit_events(node.database_url, lambda e: e.action == "dicom-instances-transferred" and e.job_id == second.id)
    assert transferred[-1].detail["stale_removed"] == 2


def test_a_series_sent_again_unchanged_keeps_its_sct_and_one_changed_or_whose_sct_was_deleted_is_made_again(
        node_factory, orthanc, tmp_path):
    """A PACS route that fires twice, or a study re-sent by hand, brings a series the node has made
    an sCT of: until 2026-12-06 each time was a whole synthesis (11 minutes for 200 slices with the
    card's 32 views on 2 cores) that wrote the same instances again. Now a job whose originals and
    settings are those of the series' last done job, whose sCT and SR Orthanc still holds whole,
    is done at once with that sCT (GET /jobs shows which job's). An administrator's retry is made
    again; so is a series with a slice changed (the same UIDs, other pixels), and one whose sCT was
    deleted in Orthanc: sending the series again is how a site gets it back."""
    node = node_factory(complete_on_release="true")
    series = _small(tmp_path, "mr", 251)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    first = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert first.state == "done", first.error
    assert first.reused_job_id is None and first.ct_instances == 4 and len(first.input_digest) == 64

    def sct_in_orthanc() -> dict[str, str]:
        (sct,) = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["SeriesInstanceUID"] == first.ct_series_uid]
        return {i: httpx.get(f"{orthanc.url}/instances/{i}/metadata/ReceptionDate", auth=orthanc.auth).text for i in sct["Instances"]}

    before = sct_in_orthanc()
    time.sleep(1.1)  # a copy stored again would have a later ReceptionDate (seconds)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0  # the same files again
    second = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=first.id)
    assert second.state == "done", second.error
    assert (second.reused_job_id, second.ct_series_uid, second.sr_series_uid) == (first.id, first.ct_series_uid, first.sr_series_uid)
    assert second.input_digest == first.input_digest
    assert sct_in_orthanc() == before  # nothing stored again
    finished = audit_events(node.database_url, lambda e: e.action == "job-finished" and e.job_id == second.id)
    assert finished[-1].detail["kept_from_job"] == first.id
    token = api_token(node.database_url, "auditor", "reader")
    shown = httpx.get(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/jobs/{second.id}", headers={"Authorization": f"Bearer {token}"}).json()
    assert shown["reused_job_id"] == first.id

    # The same slices in another transfer syntax (a sender that prefers implicit VR; an archive that
    # stores losslessly compressed) are the same originals: until 2026-12-06 their other bytes made
    # the sCT again. The spool keeps each as received, so the node's rows say which came.
    rle = tmp_path / "rle"
    rle.mkdir()
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(rle / path.name, enforce_file_format=True)
    previous = second
    for folder, propose, syntax in ((series.folder, "-xi", ImplicitVRLittleEndian), (rle, "-xr", RLELossless)):
        assert storescu(folder, node.port, NODE_AE, SCANNER_AE, propose=propose).returncode == 0
        again = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=previous.id)
        assert again.state == "done", again.error
        with init_db(node.database_url)() as session:
            received = set(session.scalars(select(Instance.transfer_syntax_uid).where(
                Instance.series_instance_uid == series.series_uid, Instance.set_aside.is_(None))))
        assert received == {str(syntax)}
        assert (again.reused_job_id, again.input_digest) == (first.id, first.input_digest), syntax.name
        previous = again
    assert sct_in_orthanc() == before

    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'physicist')}"}
    asked = httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/jobs/{previous.id}/retry", headers=admin, timeout=30)
    assert asked.status_code == 201, asked.text
    remade = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=previous.id)
    assert remade.state == "done" and remade.reused_job_id is None  # an administrator's retry is made again, as asked
    assert sct_in_orthanc() != before

    changed = tmp_path / "changed"
    changed.mkdir()
    for number, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        if number == 1:  # a corrected slice: the same UIDs, other pixels
            pixels = ds.pixel_array
            pixels[:8, :8] = pixels.max()
            ds.PixelData = pixels.tobytes()
        ds.save_as(changed / path.name, enforce_file_format=True)
    assert storescu(changed, node.port, NODE_AE, SCANNER_AE).returncode == 0
    third = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=remade.id)
    assert third.state == "done", third.error
    assert third.reused_job_id is None and third.input_digest != first.input_digest
    assert set(sct_in_orthanc()) == set(before)  # the same UIDs, stored again

    (sct,) = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["SeriesInstanceUID"] == first.ct_series_uid]
    assert httpx.delete(f"{orthanc.url}/series/{sct['ID']}", auth=orthanc.auth).status_code == 200
    assert storescu(changed, node.port, NODE_AE, SCANNER_AE).returncode == 0
    fourth = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=third.id)
    assert fourth.state == "done", fourth.error
    assert fourth.reused_job_id is None and fourth.input_digest == third.input_digest
    assert len(sct_in_orthanc()) == 4  # back in Orthanc


def test_an_orthanc_that_keeps_first_copies_gets_the_new_sct_and_the_corrected_original(tmp_path):
    """Orthanc's default (OverwriteInstances false) keeps the first copy of an instance and answers
    AlreadyStored. A late MR slice makes the sCT again, and its slices' UIDs follow their index:
    the old slices stayed at their old positions beside the new one (two at one position, one
    missing; the instance count was right, so the job was done), and a corrected original routed
    again stayed uncorrected, until 2026-12-05. Now the copy Orthanc holds is replaced when it differs."""
    plain = OrthancServer(tmp_path / "orthanc", free_port(), free_port())
    config = json.loads(plain.write_config().read_text())
    config["OverwriteInstances"] = False
    (tmp_path / "orthanc-keeps-first.json").write_text(json.dumps(config))
    with OrthancServer(tmp_path / "orthanc", config["HttpPort"], config["DicomPort"], config_file=tmp_path / "orthanc-keeps-first.json") as orthanc:
        port = free_port()
        env = node_env(tmp_path / "node", port, orthanc)
        env.update(MR2CT_COMPLETE_ON_RELEASE="true", MR2CT_FORWARD_ORIGINALS="true")
        with NodeServer(tmp_path / "node", env, port) as node:
            series = _small(tmp_path, "mr", 246)
            late = tmp_path / "late"
            late.mkdir()
            shutil.move(series.files[2], late / series.files[2].name)  # the third slice comes later
            # a scanner that sends to both: Orthanc holds the second slice already, as its association gave it (implicit VR)
            ds = pydicom.dcmread(series.files[1])
            ds.file_meta.TransferSyntaxUID, ds.file_meta.SourceApplicationEntityTitle = ImplicitVRLittleEndian, SCANNER_AE
            scanners = io.BytesIO()
            ds.save_as(scanners, enforce_file_format=True, implicit_vr=True)
            taken = httpx.post(f"{orthanc.url}/instances", content=scanners.getvalue(), auth=orthanc.auth, timeout=30).json()["ID"]
            assert storescu(series.folder, port, NODE_AE, SCANNER_AE).returncode == 0
            first = wait_for_job(env["MR2CT_DATABASE_URL"], series.series_uid, timeout=120)
            assert first.state == "done", first.error
            # the node's copy says the same: Orthanc keeps the scanner's (until 2026-12-06 it was deleted and stored again)
            kept = httpx.get(f"{orthanc.url}/instances/{taken}/metadata/TransferSyntax", auth=orthanc.auth, timeout=30)
            assert kept.status_code == 200 and kept.text == ImplicitVRLittleEndian, kept.text
            corrected = pydicom.dcmread(series.files[0])
            corrected.ImageComments = "corrected after the first send"
            corrected.save_as(late / series.files[0].name, enforce_file_format=True)
            assert storescu(late, port, NODE_AE, SCANNER_AE).returncode == 0
            second = wait_for_job(env["MR2CT_DATABASE_URL"], series.series_uid, timeout=120, done_before=first.id)
            assert second.state == "done", second.error
            held = {s["MainDicomTags"]["Modality"]: s for s in study_series(orthanc, series.study_uid)}
            sct = series_datasets(orthanc, held["CT"])
            mr = series_datasets(orthanc, held["MR"])
    mr_positions = sorted({float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in [*series.folder.glob("*.dcm"), *late.glob("*.dcm")]})
    assert len(mr_positions) == 4
    assert sorted(float(ds.ImagePositionPatient[2]) for ds in sct) == mr_positions  # slice for slice on the MR, each once
    assert [ds.get("ImageComments") for ds in mr if ds.SOPInstanceUID == corrected.SOPInstanceUID] == ["corrected after the first send"]


def test_dicom_over_tls_with_client_certificates(node_factory, tmp_path):
    pki = make_pki(tmp_path)
    node = node_factory(tls_certificate=str(pki / "server.pem"), tls_private_key=str(pki / "server.key"), tls_ca_file=str(pki / "ca.pem"))
    series = _small(tmp_path, "mr", 250)
    tls = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
    sent = storescu(series.folder, node.port, NODE_AE, SCANNER_AE, extra_args=tls)
    assert sent.returncode == 0, sent.stderr
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    # Plain TCP, or TLS without a client certificate, gets nowhere.
    assert echoscu(node.port, NODE_AE, SCANNER_AE, timeout=30).returncode != 0
    assert echoscu(node.port, NODE_AE, SCANNER_AE, extra_args=["+tla", "+cf", str(pki / "ca.pem")], timeout=30).returncode != 0


def test_originals_are_routed_over_tls_to_another_node(node_factory, tmp_path):
    """Node A routes by C-STORE over TLS to node B, which requires client certificates: A checks
    B's certificate against the CA and presents its own; B holds every original."""
    pki = make_pki(tmp_path)
    tls = {"tls_ca_file": str(pki / "ca.pem")}
    b = node_factory(tls_certificate=str(pki / "server.pem"), tls_private_key=str(pki / "server.key"),
                     allowed_aes=f"{SCANNER_AE},{NODE_AE}", **tls)
    a = node_factory(tls_certificate=str(pki / "client.pem"), tls_private_key=str(pki / "client.key"), forward_originals="true",
                     forward_to=f"{NODE_AE}@127.0.0.1:{b.port}", forward_tls="true", **tls)
    series = _small(tmp_path, "mr", 255)
    client = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
    assert storescu(series.folder, a.port, NODE_AE, SCANNER_AE, extra_args=client).returncode == 0
    # A marks an instance forwarded once B has answered its C-STORE, a moment after B committed it:
    # wait for both sides.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with init_db(b.database_url)() as session:
            held = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
        with init_db(a.database_url)() as session:
            rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series.series_uid)).all()
        if len(held) == 4 and len(rows) == 4 and all(r.forwarded_at is not None for r in rows):
            break
        time.sleep(0.3)
    assert len(held) == 4
    assert len(rows) == 4 and all(r.forwarded_at is not None for r in rows)


def test_other_sop_classes_are_accepted_only_to_be_routed(node_factory, orthanc, tmp_path):
    from pydicom.data import get_testdata_file

    ct_path = get_testdata_file("CT_small.dcm")
    plain = node_factory()
    refused = storescu(Path(ct_path), plain.port, NODE_AE, SCANNER_AE)
    assert refused.returncode != 0 or "Error" in refused.stderr  # CT is not negotiated by a plain node
    routing = node_factory(forward_originals="true", forward_sop_classes="1.2.840.10008.5.1.4.1.1.2")
    sent = storescu(Path(ct_path), routing.port, NODE_AE, SCANNER_AE)
    assert sent.returncode == 0 and not sent.stderr.strip(), sent.stderr
    ds = pydicom.dcmread(ct_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.post(f"{orthanc.url}/tools/lookup", content=ds.SOPInstanceUID, auth=orthanc.auth).json():
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the CT instance was not routed to Orthanc")
    row = _series_row(routing, ds.SeriesInstanceUID, state="ignored")
    assert "modality 'CT'" in row.reason  # routed, never synthesized


def test_an_instance_the_destination_keeps_refusing_is_given_up_and_asked_again_on_retry(node_factory, tmp_path):
    """Node A takes CT only to route it; node B takes no CT: every pass B refuses it. After
    forward_max_refusals refusals A stops asking (no retry every five minutes for ever), the
    administrator sees it given up with the reason and an audit row, and POST /routing/retry asks again."""
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    b = node_factory(allowed_aes=f"{SCANNER_AE},{NODE_AE}")
    a = node_factory(forward_originals="true", forward_sop_classes="1.2.840.10008.5.1.4.1.1.2", forward_max_refusals="2",
                     forward_to=f"{NODE_AE}@127.0.0.1:{b.port}")
    assert storescu(Path(get_testdata_file("CT_small.dcm")), a.port, NODE_AE, SCANNER_AE).returncode == 0
    sessions = init_db(a.database_url)

    def row() -> Instance:
        with sessions() as session:
            return session.get(Instance, ct.SOPInstanceUID)

    deadline = time.monotonic() + 30  # backoff 1 s then 2 s: given up within seconds
    while time.monotonic() < deadline and (row() is None or row().forward_next_at is not None or row().forward_refusals < 2):
        time.sleep(0.3)
    given_up = row()
    assert given_up.forward_refusals == 2 and given_up.forward_next_at is None and given_up.forwarded_at is None
    assert "accepted no presentation context" in given_up.forward_error and "given up" in given_up.forward_error
    time.sleep(5)  # well past the next backoff: nobody asks B again
    assert row().forward_attempts == given_up.forward_attempts
    base = f"http://127.0.0.1:{a.env['MR2CT_API_PORT']}"
    admin = {"Authorization": f"Bearer {api_token(a.database_url, 'admin', 'pacs-admin')}"}
    status = httpx.get(f"{base}/routing", headers=admin).json()
    assert status["failing"] == 1 and status["given_up"] == 1 and status["routed"] == 0
    assert status["failures"][0]["sop_instance_uid"] == ct.SOPInstanceUID and status["failures"][0]["given_up"] is True
    with sessions() as session:
        audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "routing-given-up")).all()
    assert len(audited) == 1 and audited[0].detail["sop_instance_uid"] == ct.SOPInstanceUID and audited[0].detail["refusals"] == 2
    assert httpx.post(f"{base}/routing/retry", headers=admin).json()["rescheduled"] == 1
    deadline = time.monotonic() + 30  # asked again: refused twice more, given up again
    while time.monotonic() < deadline and row().forward_attempts < given_up.forward_attempts + 2:
        time.sleep(0.3)
    assert row().forward_attempts == given_up.forward_attempts + 2 and row().forward_next_at is None
    assert echoscu(a.port, NODE_AE, SCANNER_AE).returncode == 0


def test_a_series_that_cannot_make_a_volume_or_lost_an_original_fails_its_job_with_the_reason(node_factory, tmp_path):
    node = node_factory()
    series = _small(tmp_path, "mr", 260, slices=3)
    broken = pydicom.dcmread(series.files[2])
    # one slice in a frame of reference of its own (two slices in one place, the example here until
    # 2026-12-05, is now told at completion, without a job)
    broken.FrameOfReferenceUID = pydicom.uid.generate_uid()
    broken.save_as(series.files[2], enforce_file_format=True)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, series.series_uid, timeout=120)
    assert job.state == "failed" and "the instances name 2 frames of reference" in job.error
    with init_db(node.database_url)() as session:
        failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "job-failed", AuditEvent.job_id == job.id)).one()
    assert "2 frames of reference" in failed.detail["reason"]
    assert echoscu(node.port, NODE_AE, SCANNER_AE).returncode == 0  # nothing else stops

    # An original gone from the spool under a retried job (removed by hand: a retention round and a
    # retry hold the series in turn, so no round does this): the job says how many and what to do,
    # not a file error.
    spooled = Path(node.env["MR2CT_SPOOL_DIR"]) / series.study_uid / series.series_uid
    (spooled / f"{pydicom.dcmread(series.files[1]).SOPInstanceUID}.dcm").unlink()
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'node-admin')}"}
    retried = httpx.post(f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/jobs/{job.id}/retry", headers=admin, timeout=30)
    assert retried.status_code == 201, retried.text
    gone = wait_for_job(node.database_url, series.series_uid, timeout=120, done_before=job.id)
    assert gone.state == "failed" and "1 of the series' 3 originals are no longer in the spool" in gone.error
    assert "send the series again" in gone.error and str(spooled) not in gone.error


def _long_job_running(node, tmp_path: Path, seed: int):
    """Send a 48-slice 128x128 series at 1 mm (the model's grid: one 128x128 forward a view) to
    ``node`` (started with 8 views: a job of several seconds on 2 cores, ~15 s without bf16) and
    return (series, job) once its job runs. (At 256x256 it was 4x the inference per slice: ~40 s a
    test on an AVX2-only CPU.)"""
    series = write_mr_series(tmp_path / f"long{seed}", seed=seed, slices=48, size=128, pixel_spacing=1.0, slice_spacing=3.0)
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    sessions = init_db(node.database_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sessions() as session:
            job = session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid, Job.state == "running")).first()
        if job is not None:
            return series, job
        time.sleep(0.1)
    raise AssertionError("the job never ran")


def test_the_api_shows_how_far_a_running_job_is(node_factory, orthanc, tmp_path):
    """A long series on a CPU takes minutes: GET /jobs/{id} (and the dashboard, and the demo's bar)
    shows what the job is doing (reading, synthesizing, storing, in that order) and the fraction of
    its slices synthesized, rising while it runs, and 1 once it is done."""
    node = node_factory(test_time_augmentation="dihedral")
    series, job = _long_job_running(node, tmp_path, 231)
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    token = api_token(node.database_url, "auditor", "watching")
    auditor, dashboard = {"Authorization": f"Bearer {token}"}, {"mr2ct_token": token}
    seen: list[float] = []
    stages: list[str] = []
    pages: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        detail = httpx.get(f"{base}/jobs/{job.id}", headers=auditor, timeout=30).json()
        if detail["state"] != "running":
            break
        if detail["stage"] is not None and detail["stage"] not in stages[-1:]:
            stages.append(detail["stage"])
        if detail["progress"] is not None:
            seen.append(detail["progress"])
            if not pages and detail["progress"] < 1:
                pages.append(httpx.get(f"{base}/dashboard", cookies=dashboard, timeout=30).text)
        time.sleep(0.1)
    assert detail["state"] == "done" and detail["progress"] == 1.0 and detail["stage"] is None
    assert seen == sorted(seen), seen  # it never goes back
    assert "synthesizing" in stages and stages == sorted(stages, key=STAGES.index), stages  # nor do its stages
    assert any(0 < p < 1 for p in seen), seen  # followed while it ran, not only at the end
    assert pages and re.search(rf"<tr id='job-{job.id}'><td>{job.id}</td><td class='running'>running \d+%</td>", pages[0])
    assert "http-equiv='refresh'" in pages[0]  # the page follows the job by itself
    done = httpx.get(f"{base}/dashboard", cookies=dashboard, timeout=30).text
    assert "<td class='done'>done</td>" in done and "http-equiv='refresh'" not in done


def test_a_running_job_cancelled_by_the_administrator_stops_with_nothing_stored(node_factory, orthanc, tmp_path):
    """A series sent by mistake is already being synthesized: the administrator cancels its job,
    the worker stops within about a second with nothing in Orthanc, and goes on with the next."""
    node = node_factory(test_time_augmentation="dihedral")
    mistaken, job = _long_job_running(node, tmp_path, 232)
    sessions = init_db(node.database_url)
    base = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}"
    admin = {"Authorization": f"Bearer {api_token(node.database_url, 'admin', 'pacs-admin')}"}
    answer = httpx.post(f"{base}/jobs/{job.id}/cancel", headers=admin)
    assert answer.status_code == 200 and answer.json() == {"job_id": job.id, "state": "cancelled", "was_running": True}
    assert wait_for_job(node.database_url, mistaken.series_uid, timeout=30).id == job.id  # an ended job: whoever waits stops waiting

    following = _small(tmp_path, "following", 233)
    assert storescu(following.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, following.series_uid, timeout=120).state == "done"  # the worker went on
    with sessions() as session:
        cancelled = session.get(Job, job.id)
        transferred = session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instances-transferred")).all()
    assert cancelled.state == "cancelled" and cancelled.ct_series_uid is None and "while it ran" in cancelled.error
    assert all(event.detail.get("job_id") != job.id for event in transferred)
    lookup = httpx.post(f"{orthanc.url}/tools/lookup", content=mistaken.study_uid, auth=orthanc.auth, timeout=30).json()
    assert lookup == []  # no sCT, no SR: Orthanc has never heard of the study
    assert "job stopped job=%d" % job.id in node.log_path.read_text()
    again = httpx.post(f"{base}/jobs/{job.id}/cancel", headers=admin)
    assert again.status_code == 409 and "is cancelled" in again.json()["detail"]


def test_a_node_stopped_while_a_job_runs_queues_it_again_and_the_next_start_finishes_it(node_factory, orthanc, tmp_path):
    """A rolling restart: SIGTERM while a series is being synthesized stops the job between batches
    with nothing stored and puts it back in the queue at once (not after its 10-minute lease), and
    the restarted node runs that same job to the end."""
    workdir = tmp_path / "restarting-node"
    first = node_factory(workdir=workdir, test_time_augmentation="dihedral")
    series, job = _long_job_running(first, tmp_path, 234)
    sessions = init_db(first.database_url)
    first.stop()
    with sessions() as session:
        requeued = session.get(Job, job.id)
    assert requeued.state == "queued" and "shut down" in requeued.error and requeued.ct_series_uid is None
    assert httpx.post(f"{orthanc.url}/tools/lookup", content=series.study_uid, auth=orthanc.auth, timeout=30).json() == []
    assert f"job queued again job={job.id}" in first.log_path.read_text()

    second = node_factory(workdir=workdir, port=first.port)
    done = wait_for_job(second.database_url, series.series_uid, timeout=180)
    assert done.id == job.id and done.state == "done" and done.error is None
    with sessions() as session:
        assert len(session.scalars(select(Job).where(Job.series_instance_uid == series.series_uid)).all()) == 1
