"""Where a series stands, written on the MR series in Orthanc (dicom_node.outcomes): a note Orthanc
cannot take now is written once it can, and one it does not declare is kept for later; a real
Orthanc, a real SQLite database. The whole path (the plugin routes, the node ignores or
synthesizes, Explorer shows the note) is in test_orthanc_plugin."""

from __future__ import annotations

import json

import httpx
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.local_stack import OrthancServer, free_port, orthanc_config
from dicom_node.models import Job, Series
from dicom_node.orthanc_store import OUTCOME_FLAG, OrthancStore
from dicom_node.outcomes import OutcomeNotes, mark_due_for_job
from dicom_node.worker import claim_job, settle_job
from tests.conftest import SCANNER_AE
from training.phantom_dicom import write_mr_series

REASON = "its header says a contrast agent was given (Contrast/Bolus Agent), and select_contrast_agent is 'without'"


def _series(sessions, series_uid: str, study_uid: str, **values) -> None:
    with sessions.begin() as session:
        session.add(Series(series_instance_uid=series_uid, study_instance_uid=study_uid, modality="MR", calling_ae=SCANNER_AE,
                           instance_count=2, **values))


def _note(orthanc: OrthancServer, series_id: str) -> str | None:
    answer = httpx.get(f"{orthanc.url}/series/{series_id}/metadata/{OUTCOME_FLAG}", auth=orthanc.auth)
    return answer.text if answer.status_code == 200 else None


def _due(sessions, series_uid: str) -> bool:
    with sessions() as session:
        return session.get(Series, series_uid).outcome_due


def test_a_note_orthanc_could_not_take_is_written_once_it_is_up(tmp_path):
    """Orthanc down when the node ignores a series: the note stays due (nothing lost, no error
    raised into the node); Orthanc up, holding the series: the next round writes the reason on it.
    A series Orthanc does not hold (sent to the node only) is not flagged again. A job's claim and
    outcome flag its series again, and the note follows the job."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=31, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    other = write_mr_series(tmp_path / "mr2", seed=32, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    _series(sessions, "1.2.826.0.1.3680043.10.9999.1", "1.2.826.0.1.3680043.10.9999", state="ignored", reason=REASON, outcome_due=True)
    _series(sessions, mr.series_uid, mr.study_uid, state="ignored", reason=REASON, outcome_due=True)
    _series(sessions, other.series_uid, other.study_uid, state="stable", outcome_due=True)
    with sessions.begin() as session:
        session.add(Job(series_instance_uid=other.series_uid, state="queued", instance_count=2))
    port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", http_port=port, dicom_port=free_port())
    notes = OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password, timeout=2))
    assert notes.write_due() == 0  # Orthanc is not there
    assert _due(sessions, mr.series_uid) and _due(sessions, other.series_uid)
    with orthanc:
        ids = {}
        for series in (mr, other):
            for f in series.files:
                ids[series.series_uid] = httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth).json()["ParentSeries"]
        notes._quiet_until = 0.0  # the round after the pause the failure set
        assert notes.write_due() == 3
        ignored = _note(orthanc, ids[mr.series_uid])
        assert ignored is not None and ignored.startswith("mr2ct ") and ignored.endswith("not synthesized: " + REASON)
        assert "queued for synthesis (2 instances)" in (_note(orthanc, ids[other.series_uid]) or "")
        assert not _due(sessions, mr.series_uid) and not _due(sessions, "1.2.826.0.1.3680043.10.9999.1")
        with sessions() as session:
            assert session.get(Series, mr.series_uid).outcome_note == ignored

        job_id = claim_job(sessions, "w1")
        assert job_id is not None and _due(sessions, other.series_uid)
        notes.write_due()
        assert f"job {job_id} synthesizing" in (_note(orthanc, ids[other.series_uid]) or "")
        assert settle_job(sessions, job_id, "w1", state="failed", error="Orthanc refused the sCT: HTTP 507", lease_until=None)
        notes.write_due()
        failed = _note(orthanc, ids[other.series_uid]) or ""
        assert f"sCT failed (job {job_id}): Orthanc refused the sCT: HTTP 507" in failed and f"POST /jobs/{job_id}/retry" in failed


def test_an_orthanc_that_declares_no_such_metadata_keeps_the_note_for_later(tmp_path):
    """An Orthanc configured by hand without Mr2ctOutcome in UserMetadata answers 404: the node says
    so once in its log, writes nothing, and keeps the series due (written once Orthanc declares it
    and the pause is over)."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=33, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    _series(sessions, mr.series_uid, mr.study_uid, state="ignored", reason=REASON, outcome_due=True)
    config = orthanc_config(storage=tmp_path / "storage", http_port=free_port(), dicom_port=free_port(), aet="ORTHANC",
                            users={"mr2ct": "secret"}, modalities={}, python_plugin=False)
    assert config["UserMetadata"] == {OUTCOME_FLAG: 1025}  # what the project's Orthanc declares
    del config["UserMetadata"]
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    with OrthancServer(tmp_path, config_file=tmp_path / "orthanc.json") as orthanc:
        series_id = httpx.post(f"{orthanc.url}/instances", content=mr.files[0].read_bytes(), auth=orthanc.auth).json()["ParentSeries"]
        notes = OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password))
        assert notes.write_due() == 0
        assert _note(orthanc, series_id) is None
        assert _due(sessions, mr.series_uid)  # kept for an Orthanc that declares it
        assert notes.write_due() == 0  # quiet: no request per round to an Orthanc that cannot take it
        with sessions() as session:
            assert session.scalars(select(Series.outcome_note)).all() == [None]


def test_a_job_outcome_flags_only_its_own_series(tmp_path):
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    _series(sessions, "1.2.3.1", "1.2.3")
    _series(sessions, "1.2.3.2", "1.2.3")
    with sessions.begin() as session:
        job = Job(series_instance_uid="1.2.3.2", state="done", instance_count=2)
        session.add(job)
        session.flush()
        mark_due_for_job(session, job.id)
    assert not _due(sessions, "1.2.3.1") and _due(sessions, "1.2.3.2")
