"""Load (8 senders, 2,000 instances), a bounded fuzz of instance validation, and a check that no
patient identifier reaches a log line."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.ingest import validate
from dicom_node.local_stack import NodeServer, free_port, storescu
from dicom_node.models import Instance, Job
from dicom_node.spool import Spool
from synthesis.errors import InvalidInstance
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from training.phantom_dicom import write_mr_series


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_eight_senders_2000_instances_all_kept_each_series_synthesized_once(orthanc, tmp_path):
    workdir, port = tmp_path / "node", free_port()
    # node_env's one forward per slice, as a site under this load would configure it (the shipped
    # model's 32 views would make these 2,000 slices ~20 minutes of inference on 2 cores).
    env = node_env(workdir, port, orthanc)
    # The shipped default's 10 s of quiet before a series is complete (the tests' 1.5 s let a sender
    # stalled that long on a loaded machine have its series made a job early, and the rest a second).
    env["MR2CT_STABLE_SECONDS"] = "10"
    sizes = [400, 350, 300, 250, 250, 200, 150, 100]  # mixed series sizes, 2,000 in all
    # 128x128 at 1 mm: the model's own grid, so each slice is one 128x128 forward (at 2 mm it
    # would be resampled to 256x256, 4x the inference, which made this test 6 minutes on 2 cores).
    series = [write_mr_series(tmp_path / f"s{i}", seed=1100 + i, slices=n, size=128, pixel_spacing=1.0, slice_spacing=0.5)
              for i, n in enumerate(sizes)]
    with NodeServer(workdir, env, port) as node:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda s: storescu(s.folder, port, NODE_AE, SCANNER_AE, timeout=600), series))
        seconds = time.monotonic() - started
        assert all(r.returncode == 0 and not r.stderr.strip() for r in results), [r.stderr for r in results if r.returncode]
        for s in series:
            assert wait_for_job(env["MR2CT_DATABASE_URL"], s.series_uid, timeout=600).state == "done"
        peak = _peak_rss_mib(node.proc.pid)  # type: ignore[union-attr]
    with init_db(env["MR2CT_DATABASE_URL"])() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2000
        per_series = dict(session.execute(select(Job.series_instance_uid, func.count()).group_by(Job.series_instance_uid)).all())
    assert sorted(per_series.values()) == [1] * 8
    assert len(list((workdir / "spool").rglob("*.dcm"))) == 2000
    print(f"2000 instances from 8 senders acknowledged in {seconds:.1f} s ({2000 / seconds:.0f}/s); node peak RSS {peak:.0f} MiB")
    assert peak < 2048


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    series = write_mr_series(tmp_path_factory.mktemp("fuzz"), seed=1200, slices=1, size=16, pixel_spacing=8.0)
    return series.files[0].read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_instances_are_accepted_whole_or_refused_cleanly(good_bytes, tmp_path_factory, data):
    raw = bytearray(good_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(132, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(200, len(raw)))]
    try:
        ds = pydicom.dcmread(io.BytesIO(bytes(raw)))
        info = validate(ds, str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")))
    except InvalidInstance:
        return
    except Exception:
        return  # pydicom could not parse it; the SCP answers 0xC000 for these
    spool = Spool(tmp_path_factory.getbasetemp() / "fuzz-spool")
    path = spool.path_for(info.study_uid, info.series_uid, info.sop_instance_uid)
    assert spool.root in path.resolve().parents


def test_no_patient_identifier_reaches_the_logs(node, tmp_path):
    series = write_mr_series(tmp_path / "mr", seed=1300, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                             patient_name="DOE^JANE^LOGCHECK", patient_id="PID-LOG-4711")
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    log_text = node.log_path.read_text(errors="replace")
    assert "job done" in log_text
    for needle in ("DOE^JANE", "LOGCHECK", "PID-LOG-4711", "JANE"):
        assert needle not in log_text


def test_a_malformed_patient_value_neither_fails_the_job_nor_reaches_a_log_line(node, orthanc, tmp_path):
    """A scanner that writes the birth date as 1970-02-03, the study time as 09:00:00, the sex as
    "Female" or a name without a caret: highdicom failed the job on the first three (the sCT made,
    no SR) and logged the name; and pydicom warns of a value that breaks its VR's rules by quoting
    it (a UI whose length is wrong swallows the elements after it, the name among them). None of
    the values reaches the node's log, and its CT and SR say what the MR says."""
    from pydicom import config

    from tests.helpers import series_datasets, study_series

    series = write_mr_series(tmp_path / "mr", seed=1301, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                             patient_name="ROE RICHARD LOGCHECK", patient_id="PID-LOG-4712")
    malformed = {"PatientBirthDate": "1970-02-03", "PatientAge": "45 years", "PatientSex": "Female", "StudyTime": "09:00:00"}
    mode, config.settings.writing_validation_mode = config.settings.writing_validation_mode, config.IGNORE
    try:
        for path in series.folder.iterdir():
            ds = pydicom.dcmread(path)
            for keyword, value in malformed.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = mode
    start = node.log_path.stat().st_size
    assert storescu(series.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    assert wait_for_job(node.database_url, series.series_uid, timeout=120).state == "done"
    with open(node.log_path, "rb") as fh:
        fh.seek(start)
        log_text = fh.read().decode(errors="replace")
    assert "job done" in log_text
    for needle in ("1970-02-03", "45 years", "Female", "09:00:00", "LOGCHECK", "PID-LOG-4712"):
        assert needle not in log_text, needle
    derived = [series_datasets(orthanc, s)[0] for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["Modality"] in ("CT", "SR")]
    assert sorted(ds.Modality for ds in derived) == ["CT", "SR"]
    for ds in derived:
        assert {k: str(ds.get(k, "")) for k in malformed} == malformed and str(ds.PatientName) == "ROE RICHARD LOGCHECK", ds.Modality
