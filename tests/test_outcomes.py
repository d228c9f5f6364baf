"""Where a series stands, written on the MR series in Orthanc (dicom_node.outcomes): a note Orthanc
cannot take now is written once it can, and one it does not declare is kept for later; a real
Orthanc, a real SQLite database. The whole path (the plugin routes, the node ignores or
synthesizes, Explorer shows the note) is in test_orthanc_plugin."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
from sqlalchemy import select, update

from dicom_node.db import init_db
from dicom_node.ingest import ReceivedInstance, mark_stable
from dicom_node.local_stack import OrthancServer, free_port, orthanc_config
from dicom_node.forwarder import OrthancRestDestination, forward_pending
from dicom_node.models import Instance, Job, Series, utcnow
from dicom_node.orthanc_store import OUTCOME_FLAG, OrthancStore
from dicom_node.outcomes import OutcomeNotes, _claim_due, _release, mark_due_for_job
from dicom_node.recorder import SpooledInstance, record_batch
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
    A series Orthanc does not hold (sent to the node only) is looked for again a while, then given
    up. A job's claim and outcome flag its series again, and the note follows the job."""
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
        assert not _due(sessions, mr.series_uid)
        assert _due(sessions, "1.2.826.0.1.3680043.10.9999.1")  # not in Orthanc (yet): looked for again after a pause
        assert notes.write_due() == 0  # ...not at once
        with sessions.begin() as session:  # its last instance came 11 minutes ago and the pause is over: given up
            session.get(Series, "1.2.826.0.1.3680043.10.9999.1").last_received_at = utcnow() - timedelta(minutes=11)
            session.get(Series, "1.2.826.0.1.3680043.10.9999.1").outcome_after = utcnow()
        assert notes.write_due() == 1
        assert not _due(sessions, "1.2.826.0.1.3680043.10.9999.1")
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


def test_a_series_orthanc_receives_after_the_node_judged_it_gets_its_note(tmp_path):
    """The node's own forward_originals (or a scanner sending to both) may deliver a series to
    Orthanc after the node ignored it: the round that finds no series looks again after the pause,
    and writes the note once Orthanc holds it."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=34, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    _series(sessions, mr.series_uid, mr.study_uid, state="ignored", reason=REASON, outcome_due=True)
    with OrthancServer(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as orthanc:
        notes = OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password))
        assert notes.write_due() == 1 and _due(sessions, mr.series_uid)  # not there yet: due again, after a pause
        series_id = httpx.post(f"{orthanc.url}/instances", content=mr.files[0].read_bytes(), auth=orthanc.auth).json()["ParentSeries"]
        assert notes.write_due() == 0 and _note(orthanc, series_id) is None  # the pause holds
        with sessions.begin() as session:
            session.get(Series, mr.series_uid).outcome_after = utcnow()  # the pause is over
        assert notes.write_due() == 1
        assert (_note(orthanc, series_id) or "").endswith("not synthesized: " + REASON)
        assert not _due(sessions, mr.series_uid)


def test_a_second_writer_waits_for_the_first_so_notes_land_in_order(tmp_path):
    """Two worker processes write notes: while one holds a series' note (taken, not yet written), a
    change of the series' standing flags it again, and the other writer does not take it (it would
    write the newer note first and the first writer's older one over it). Once the first lets go,
    the newer note is written last."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=35, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    _series(sessions, mr.series_uid, mr.study_uid, state="stable", outcome_due=True)
    with sessions.begin() as session:
        session.add(Job(series_instance_uid=mr.series_uid, state="queued", instance_count=2))
    with OrthancServer(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as orthanc:
        series_id = httpx.post(f"{orthanc.url}/instances", content=mr.files[0].read_bytes(), auth=orthanc.auth).json()["ParentSeries"]
        first, second = (OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password)) for _ in range(2))
        [held] = _claim_due(sessions, 10)  # the first writer's round, between taking and writing
        assert "queued" in (held.text or "")
        job_id = claim_job(sessions, "w1")  # the job starts: the series is due again
        assert job_id is not None and _due(sessions, mr.series_uid)
        assert second.write_due() == 0 and _note(orthanc, series_id) is None  # held by the first
        assert first._write(held.series_uid, held.text) and "queued" in (_note(orthanc, series_id) or "")
        _release(sessions, [held.series_uid])
        assert second.write_due() == 1
        assert f"job {job_id} synthesizing" in (_note(orthanc, series_id) or "")


def test_a_judged_series_that_receives_more_instances_says_so(tmp_path):
    """A series judged (its note written in Orthanc) that receives more instances is judged again
    once complete: meanwhile its note says so, with where its last job stands, instead of the
    judgement the new instances may overturn. A series first being received gets no note."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")

    def arrive(sop: str) -> None:
        info = ReceivedInstance("1.2.840.10008.5.1.4.1.1.4", sop, "1.2.3", "1.2.3.4", "MR", "T1", "axial", "patient")
        record_batch(sessions, [SpooledInstance(info, Path(f"/spool/{sop}.dcm"), 100, "1.2.840.10008.1.2.1", SCANNER_AE, None, utcnow())])

    arrive("1.2.3.4.1")
    assert not _due(sessions, "1.2.3.4")
    state, job_id = mark_stable(sessions, "1.2.3.4", 0)
    assert state == "stable" and job_id is not None and _due(sessions, "1.2.3.4")
    [taken] = _claim_due(sessions, 10)
    assert f"job {job_id} queued for synthesis (1 instances)" in (taken.text or "")
    with sessions.begin() as session:  # as the writer records it once Orthanc took it
        session.get(Series, "1.2.3.4").outcome_note = taken.text
    _release(sessions, ["1.2.3.4"])
    arrive("1.2.3.4.2")
    assert _due(sessions, "1.2.3.4")
    [taken] = _claim_due(sessions, 10)
    assert (taken.text or "").endswith(f"receiving instances again (2 so far): judged again once the series is complete; "
                                       f"until then, job {job_id} queued for synthesis (1 instances)")


def test_a_note_whose_writer_died_before_writing_it_is_written_by_another(tmp_path):
    """A worker process killed between taking a series' note and writing it (its host lost, OOM)
    cleared the flag when it took it: once its lease is over, another writer takes the series
    again and writes the note, so the change is not lost until the series' next one."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=36, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    _series(sessions, mr.series_uid, mr.study_uid, state="ignored", reason=REASON, outcome_due=True)
    with OrthancServer(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as orthanc:
        series_id = httpx.post(f"{orthanc.url}/instances", content=mr.files[0].read_bytes(), auth=orthanc.auth).json()["ParentSeries"]
        [held] = _claim_due(sessions, 10)  # the writer that dies: it took the note and never wrote it
        assert held.series_uid == mr.series_uid and not _due(sessions, mr.series_uid)
        survivor = OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password))
        assert survivor.write_due() == 0 and _note(orthanc, series_id) is None  # its lease still holds
        with sessions.begin() as session:
            session.get(Series, mr.series_uid).outcome_after = utcnow() - timedelta(seconds=1)  # the lease is over
        assert survivor.write_due() == 1
        assert (_note(orthanc, series_id) or "").endswith("not synthesized: " + REASON)
        with sessions() as session:  # let go of: not taken again
            assert session.get(Series, mr.series_uid).outcome_after is None
        assert survivor.write_due() == 0


def test_a_slow_writer_renews_its_lease_and_leaves_a_series_another_writer_took(tmp_path):
    """A writer alive but slower than its lease (Orthanc answering slowly for a batch): once half
    the lease has passed it renews it on the series it still holds and writes them; a series
    another writer took meanwhile (the lease ran out all the same) carries that writer's newer
    note, and the slow writer's older one does not land over it."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mine = write_mr_series(tmp_path / "mr", seed=37, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    lost = write_mr_series(tmp_path / "mr2", seed=38, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    for mr in (mine, lost):
        _series(sessions, mr.series_uid, mr.study_uid, state="stable", outcome_due=True)
        with sessions.begin() as session:
            session.add(Job(series_instance_uid=mr.series_uid, state="queued", instance_count=2))
    with OrthancServer(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as orthanc:
        ids = {mr.series_uid: httpx.post(f"{orthanc.url}/instances", content=mr.files[0].read_bytes(), auth=orthanc.auth)
               .json()["ParentSeries"] for mr in (mine, lost)}
        slow, other = (OutcomeNotes(sessions, OrthancStore(orthanc.url, orthanc.username, orthanc.password)) for _ in range(2))
        taken = sorted(_claim_due(sessions, 10), key=lambda due: due.series_uid != mine.series_uid)
        assert [due.series_uid for due in taken] == [mine.series_uid, lost.series_uid]
        # time passes for the slow writer: its lease on `mine` is near its end, on `lost` over
        near, over = utcnow() + timedelta(seconds=5), utcnow() - timedelta(seconds=1)
        with sessions.begin() as session:
            session.get(Series, mine.series_uid).outcome_after = near
            session.get(Series, lost.series_uid).outcome_after = over
        taken = [taken[0]._replace(lease=near), taken[1]._replace(lease=over)]
        assert None not in [claim_job(sessions, "w1") for _ in range(2)]  # both jobs start: the series' standing changes
        assert other.write_due() == 1  # the other writer takes `lost` (its lease over), writes the newer note
        assert "synthesizing" in (_note(orthanc, ids[lost.series_uid]) or "")
        slow.write_taken(taken)
        assert "queued for synthesis" in (_note(orthanc, ids[mine.series_uid]) or "")  # renewed, written
        assert "synthesizing" in (_note(orthanc, ids[lost.series_uid]) or "")  # the older note did not land over it
        with sessions() as session:  # both let go of; `mine` is due again (its job started meanwhile) for the next round
            assert [session.get(Series, mr.series_uid).outcome_after for mr in (mine, lost)] == [None, None]
        assert other.write_due() == 1 and "synthesizing" in (_note(orthanc, ids[mine.series_uid]) or "")


def test_a_series_routed_into_orthanc_after_the_notes_gave_up_gets_its_note(tmp_path):
    """forward_originals with a backlog (or Orthanc down for long): the node judged the series and
    Orthanc did not hold it within the notes' window, so the writer gave up on it; once the routing
    puts it into that Orthanc, the series is due again and its note is written."""
    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    mr = write_mr_series(tmp_path / "mr", seed=39, slices=2, size=32, pixel_spacing=4.0, slice_spacing=8.0)
    long_ago = utcnow() - timedelta(minutes=30)
    ds = [pydicom.dcmread(path, stop_before_pixels=True) for path in mr.files]
    record_batch(sessions, [SpooledInstance(ReceivedInstance(d.SOPClassUID, d.SOPInstanceUID, mr.study_uid, mr.series_uid, "MR"), path,
                                            path.stat().st_size, "1.2.840.10008.1.2.1", SCANNER_AE, None, long_ago)
                            for d, path in zip(ds, mr.files)])
    with sessions.begin() as session:
        series = session.get(Series, mr.series_uid)
        series.state, series.reason, series.outcome_due = "ignored", REASON, True
        session.execute(update(Instance).values(forward_next_at=utcnow() + timedelta(hours=1)))  # the routing's backlog
    with OrthancServer(tmp_path / "orthanc", http_port=free_port(), dicom_port=free_port()) as orthanc:
        store = OrthancStore(orthanc.url, orthanc.username, orthanc.password)
        notes = OutcomeNotes(sessions, store)
        assert notes.write_due() == 1 and store.series_id(mr.series_uid) is None  # not in Orthanc, past the window: given up
        assert not _due(sessions, mr.series_uid) and notes.write_due() == 0
        with sessions.begin() as session:
            session.execute(update(Instance).values(forward_next_at=utcnow()))  # the backlog is through
        assert forward_pending(sessions, OrthancRestDestination(store)) == (2, 0)
        assert _due(sessions, mr.series_uid)
        assert notes.write_due() == 1
        assert (_note(orthanc, store.series_id(mr.series_uid) or "") or "").endswith("not synthesized: " + REASON)
        assert forward_pending(sessions, OrthancRestDestination(store)) == (0, 0) and not _due(sessions, mr.series_uid)
