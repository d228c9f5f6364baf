"""The worker: claims one job at a time (with a lease) and runs the synthesis pipeline on it."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

import synthesis
from dicom_node import audit
from dicom_node.db import PassErrors, cannot_reach, driver_message
from dicom_node.digest import instance_digest
from dicom_node.ingest import REJUDGED, SelectionRules, judge, mark_stable, stable_series
from dicom_node.models import QUEUED_AGAIN, Instance, Job, Series, utcnow
from dicom_node.orthanc_store import OrthancStore
from dicom_node.outcomes import mark_due_for_job
from dicom_node.retention import purged_reason
from dicom_node.spool import Spool
from synthesis.errors import InvalidInstance, Mr2ctError, PacsUnavailable, SeriesNotUsable, StorageIncomplete, Stopped

if TYPE_CHECKING:  # the pipeline (torch, highdicom) is imported by the Worker that runs it, not by the SCP or API processes
    from synthesis.infer import DeviceChoice
    from synthesis.model_file import LoadedModel

log = logging.getLogger(__name__)

LEASE_SECONDS = 600  # renewed every quarter of it while the job runs (held_lease): only a dead worker's job runs out
CHECK_SECONDS = 1.0  # how often a running job looks whether it is still its worker's (a cancel stops it within this)
MAX_ATTEMPTS = 20  # a job that cannot reach Orthanc is retried with backoff this many times: about an hour


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's modification time and size, None when it is not there: whether it changed."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def retry_delay(attempt: int) -> float:
    """2, 4, 8, ... seconds, at most five minutes."""
    return min(300.0, 2.0 ** attempt)


def claim_job(sessions: sessionmaker[Session], worker_id: str, lease_seconds: float = LEASE_SECONDS) -> int | None:
    """Take the oldest queued job (or one whose lease ran out); None when there is none.

    On PostgreSQL the candidate row is locked with FOR UPDATE SKIP LOCKED, so any number of
    workers claim different jobs without waiting on each other; the guarded UPDATE makes the
    claim safe on SQLite too.
    """
    now = utcnow()
    with sessions.begin() as session:
        candidate = session.scalars(
            select(Job.id)
            .where(or_((Job.state == "queued") & or_(Job.not_before.is_(None), Job.not_before <= now),
                       (Job.state == "running") & (Job.lease_until < now)))
            .order_by(Job.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if candidate is None:
            return None
        claimed = session.execute(
            update(Job)
            .where(Job.id == candidate, or_(Job.state == "queued", (Job.state == "running") & (Job.lease_until < now)))
            .values(state="running", worker=worker_id, started_at=now, lease_until=now + timedelta(seconds=lease_seconds), attempts=Job.attempts + 1,
                    progress=None, stage=None)
        ).rowcount
        if claimed:
            mark_due_for_job(session, candidate)
        return candidate if claimed else None


def _held_by(job_id: int, worker_id: str) -> Any:
    return (Job.id == job_id) & (Job.state == "running") & (Job.worker == worker_id)


def renew_lease(sessions: sessionmaker[Session], job_id: int, worker_id: str, lease_seconds: float = LEASE_SECONDS, **values: Any) -> bool:
    """Push back the end of the lease of a job this worker runs (and write ``values`` with it). False
    when the job is no longer this worker's (its lease ran out and another worker claimed it, or it
    was re-queued)."""
    with sessions.begin() as session:
        return bool(session.execute(
            update(Job).where(_held_by(job_id, worker_id)).values(lease_until=utcnow() + timedelta(seconds=lease_seconds), **values)).rowcount)


def still_held(sessions: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    with sessions() as session:
        return session.scalar(select(Job.id).where(_held_by(job_id, worker_id))) is not None


def settle_job(sessions: sessionmaker[Session], job_id: int, worker_id: str, deliver_to: list[str] | None = None, **values: Any) -> bool:
    """Write a job's outcome (done, failed, queued again) if the job is still this worker's; a
    worker that lost its lease leaves the job to the one that took it over. Returns whether written.
    ``deliver_to``: a done job's deliveries (dicom_node.delivery), written in the same transaction."""
    with sessions.begin() as session:
        written = bool(session.execute(update(Job).where(_held_by(job_id, worker_id)).values(**values)).rowcount)
        if written:
            mark_due_for_job(session, job_id)
        if written and deliver_to:
            from dicom_node.delivery import add_deliveries

            kept = add_deliveries(session, job_id, deliver_to, values["ct_series_uid"] if values.get("reused_job_id") else None)
            if kept:
                log.info("job %d kept an sCT already delivered to %s: not delivered again", job_id, ", ".join(kept))
        return written


STAGES = ("reading", "synthesizing", "storing")


class Progress:
    """How far a running job is: its stage (``STAGES``) and the fraction of its slices
    synthesized, set by the thread that runs the job and written to the job's row by its lease
    thread at the next check (the lookup it makes anyway becomes that write), so the job never
    waits on the database for it."""

    def __init__(self) -> None:
        self.fraction: float | None = None
        self.stage: str | None = None
        # Held by the lease thread while it looks at or writes the job's row, and by the worker while
        # it writes the job's outcome: once ``settled``, the lease thread looks no more, so it never
        # takes the job's own outcome for a cancel (and warns of one) in the moment before it stops.
        self.lock = threading.Lock()
        self.settled = False

    def __call__(self, fraction: float) -> None:
        self.fraction = round(min(max(fraction, 0.0), 1.0), 4)

    def enter(self, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.stage = stage

    def values(self) -> dict[str, Any]:
        return {"progress": self.fraction, "stage": self.stage}

    @contextmanager
    def settling(self) -> Iterator[None]:
        """Around the write of the job's outcome: the lease thread's last look is over before it
        starts, and there is none after it."""
        with self.lock:
            self.settled = True
            yield


@contextmanager
def held_lease(sessions: sessionmaker[Session], job_id: int, worker_id: str, lease_seconds: float = LEASE_SECONDS,
               check_seconds: float = CHECK_SECONDS, progress: Progress | None = None) -> Iterator[threading.Event]:
    """While the block runs: look every ``check_seconds`` whether the job is still this worker's
    and renew its lease every quarter of it, so a job longer than one lease (a long series on a
    CPU) is not claimed and run a second time by another worker; ``progress`` (its fraction and
    stage), when it moved, is written with that look. The event it yields is set once the job is
    no longer this worker's: cancelled by an administrator, or its lease ran out."""
    stop, lost = threading.Event(), threading.Event()
    tracker = Progress() if progress is None else progress

    def beat() -> None:
        renewed, written = time.monotonic(), tracker.values()  # what the claim wrote: nothing yet
        errors = PassErrors(log, f"the lease of job={job_id}", f"cannot check the lease of job={job_id}")
        while not stop.wait(min(check_seconds, lease_seconds / 4)):
            with tracker.lock:
                if tracker.settled:
                    return  # the worker writes the job's outcome: the row is no longer for this thread to look at
                now = tracker.values()
                moved = now if now != written else {}
                try:
                    if time.monotonic() - renewed >= lease_seconds / 4:
                        held, renewed = renew_lease(sessions, job_id, worker_id, lease_seconds, **moved), time.monotonic()
                    elif moved:  # the write says whether the job is still this worker's as well as a lookup would
                        held = settle_job(sessions, job_id, worker_id, **moved)
                    else:
                        held = still_held(sessions, job_id, worker_id)
                    written = now
                    errors.succeeded()
                except Exception as exc:  # the database away for a moment: try again at the next beat
                    errors.failed(exc)
                    continue
                if not held:
                    log.warning("job=%d is no longer this worker's (cancelled, or its lease ran out)", job_id)
                    lost.set()
                    return

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


class Worker:
    def __init__(
        self, sessions: sessionmaker[Session], model: LoadedModel, device: DeviceChoice, store: OrthancStore,
        uid_root: str, batch_size: int, precision: str = "auto", torch_compile: bool = False, test_time_augmentation: str = "model",
        lease_seconds: float = LEASE_SECONDS, synthesis_plane: str = "auto", ct_plane: str = "acquired",
        deliver_to: list[str] | None = None, on_delivery: Callable[[], None] | None = None, originals_from: str = "spool",
        spool_dir: Path | None = None,
    ) -> None:
        self.tta, self.lease_seconds, self.plane, self.ct_plane = test_time_augmentation, lease_seconds, synthesis_plane, ct_plane
        # originals_from orthanc: an original is read from this process's spool_dir where that holds it, else from Orthanc
        self.own_spool = Spool(spool_dir) if originals_from == "orthanc" and spool_dir is not None else None
        self.originals_from = originals_from
        self.deliver_to, self.on_delivery = list(deliver_to or []), on_delivery  # results sent on by Orthanc (dicom_node.delivery)
        self.sessions, self.model, self.device, self.store = sessions, self._as_configured(model), device, store
        self.uid_root, self.batch_size, self.precision, self.torch_compile = uid_root, batch_size, precision, torch_compile
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._refused_model: tuple[Any, ...] | None = None  # the active model last refused, and its files then (refresh_model)

    def warm_up(self) -> None:
        """Pay the first-use costs before the first job does: highdicom's tables of the standard and,
        unless compiling (which is per input shape), the model's first forward on this device."""
        import numpy as np

        from synthesis.infer import synthesize
        from synthesis.sr_writer import warm_up as warm_up_sr

        started = time.perf_counter()
        warm_up_sr()
        if not self.torch_compile:
            size = int(self.model.card.get("input_size", 64))
            spacing = self.model.pixel_spacing_mm
            ramp = np.arange(size * size, dtype=np.float32).reshape(1, size, size)  # not blank: a blank MR is refused
            synthesize(ramp, (spacing, spacing), self.model, self.device.device, 1, self.precision)
        log.info("worker warmed up in %.2f s", time.perf_counter() - started)

    def _as_configured(self, model: LoadedModel) -> LoadedModel:
        """The model with the configured test-time augmentation written into its card (the CT's
        UIDs, its derivation text and the SR then all say what was run)."""
        return model if self.tta == "model" else model.with_views(self.tta)

    def refresh_model(self) -> None:
        """Use the registry's active model when there is one (a new activation applies to the next job).
        An active model that cannot be loaded raises once: the next jobs keep the current model
        without trying again (reading and hashing its files, logging the same error) until the
        activation or its files change."""
        from dicom_node.registry import active_model, registered_weights
        from synthesis.card import card_path_for
        from synthesis.model_file import load_model

        active = active_model(self.sessions)
        if active is None or active.sha256 == self.model.sha256:
            return
        weights = Path(active.weights_path)
        attempt = (active.id, active.sha256, *(_stamp(p) for p in (weights, card_path_for(weights))))
        if attempt == self._refused_model:
            return
        try:
            model = self._as_configured(load_model(registered_weights(active)))
        except Exception:
            self._refused_model = attempt
            raise
        self.model, self._refused_model = model, None
        log.info("model switched to sha256=%s name=%s", self.model.short_digest, active.name)

    def run_job(self, job_id: int, shutdown: threading.Event | None = None) -> None:
        """Run a claimed job, its lease renewed meanwhile; the outcome is written only while the job
        is still this worker's. ``shutdown`` (the service stopping) stops it between batches and
        puts it back in the queue at once, for this node's next start or another worker."""
        progress = Progress()
        with held_lease(self.sessions, job_id, self.worker_id, self.lease_seconds, progress=progress) as lost:
            self._run_job(job_id, lost, shutdown or threading.Event(), progress)

    def _settle(self, job_id: int, tracker: Progress, **values: Any) -> bool:
        """Write the job's outcome (``values``, columns of its row) if it is still this worker's;
        ``tracker``, the job's Progress, keeps its lease thread from looking meanwhile and after.
        A job done gets its deliveries (``deliver_to``) in the same transaction."""
        deliver_to = self.deliver_to if values.get("state") == "done" else None
        with tracker.settling():
            written = settle_job(self.sessions, job_id, self.worker_id, deliver_to, **values)
        if written and deliver_to and self.on_delivery is not None:
            self.on_delivery()
        if written:
            return True
        log.warning("job outcome not recorded job=%d: the job is no longer this worker's (cancelled, or its lease ran out and "
                    "another worker holds it)", job_id)
        return False

    def _run_job(self, job_id: int, lost: threading.Event, shutdown: threading.Event, progress: Progress) -> None:
        from synthesis.ct_writer import SyntheticCTSeries
        from synthesis.infer import synthesize_volume
        from synthesis.sr_writer import build_provenance_sr
        from synthesis.volume import assemble

        started = time.perf_counter()
        try:
            self.refresh_model()
        except Exception as exc:  # keep the current model; the job still runs
            log.error("cannot load the active model, keeping sha256=%s: %s", self.model.short_digest, exc)
        with self.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            series = session.get(Series, job.series_instance_uid)
            assert series is not None
            rows = session.execute(select(Instance.path, Instance.purged_at, Instance.sop_instance_uid).where(
                Instance.series_instance_uid == job.series_instance_uid, Instance.set_aside.is_(None))).all()
            paths = [row.path for row in rows]
            sop_uids = [row.sop_instance_uid for row in rows]
            purged = sum(row.purged_at is not None for row in rows)
            series_uid, study_uid = series.series_instance_uid, series.study_instance_uid
        actor = f"worker {self.worker_id}"
        audit.record(self.sessions, audit.JOB_STARTED, "success", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id, instances=len(paths))
        log.info("job started job=%d series=%s instances=%d", job_id, series_uid, len(paths))

        def should_stop() -> bool:
            return lost.is_set() or shutdown.is_set()

        try:
            if purged and self.originals_from != "orthanc":  # with orthanc, read from there (below) like any original not here
                raise SeriesNotUsable(purged_reason(purged, len(paths)))
            # Orthanc down or refusing the login: retry later without synthesizing a series that could
            # not be stored (each attempt used to run the whole synthesis first)
            self.store.check_reachable()
            progress.enter("reading")
            files = self._read_originals(series_uid, study_uid, paths, sop_uids, purged)
            datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
            del files
            digest = self.input_digest(datasets)
            kept = self._unchanged_since(job_id, series_uid, digest)
            if kept is not None:
                self._keep(job_id, progress, kept, digest, len(datasets), actor, study_uid, series_uid, started)
                return
            source = assemble(datasets)
            progress.enter("synthesizing")
            hu, reslice, plane = synthesize_volume(source.volume, self.model, self.device.device, self.plane, batch_size=self.batch_size,
                                                   precision=self.precision, compile=self.torch_compile, should_stop=should_stop,
                                                   progress=progress)
            log.info("job synthesized job=%d in %s", job_id, plane)
            ct = SyntheticCTSeries(source=source, hu=hu, model=self.model, uid_root=self.uid_root, device_label=self.device.label,
                                   reslice=reslice, ct_plane=self.ct_plane)
            sr = build_provenance_sr(
                ct=ct, mr_headers=source.headers, uid_root=self.uid_root,
                processing_seconds=time.perf_counter() - started, device_label=self.device.label,
            )
            if should_stop():  # the last moment to stop with nothing stored; once storing begins, the series goes whole
                raise Stopped("stopped before storing")
            progress.enter("storing")
            stored = self.store.store(ct.encoded(i) for i in range(len(ct)))  # encoded lazily, one at a time
            # then what an earlier sCT of this series left in it (the series is replaced, not merged)
            stale_removed, held = self.store.remove_others(ct.series_instance_uid, stored)
            if stale_removed:
                log.info("job removed stale sCT instances job=%d count=%d (an earlier sCT of this series had slices this one has not)",
                         job_id, stale_removed)
            self.store.store([sr])
            self.store.verify(ct.series_instance_uid, len(ct), held)
            self.store.verify(str(sr.SeriesInstanceUID), 1)
        except Stopped as exc:
            if lost.is_set():
                log.info("job stopped job=%d series=%s: no longer this worker's (cancelled, or its lease ran out), %s; nothing stored",
                         job_id, series_uid, exc)
            elif self._settle(job_id, progress, **QUEUED_AGAIN, not_before=None,
                              error=f"queued again: the worker stopped (shut down) while running it, {exc}"):
                audit.record(self.sessions, "job-requeued", "warning", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id,
                             reason="the worker was shut down while it ran")
                log.info("job queued again job=%d series=%s: the worker is shutting down, %s; nothing stored", job_id, series_uid, exc)
            return
        except (PacsUnavailable, StorageIncomplete) as exc:
            with self.sessions() as session:
                attempts = session.get(Job, job_id).attempts  # type: ignore[union-attr]
            if attempts < MAX_ATTEMPTS:
                delay = retry_delay(attempts)
                if not self._settle(job_id, progress, **QUEUED_AGAIN, error=str(exc)[:2000],
                                    not_before=utcnow() + timedelta(seconds=delay)):
                    return
                audit.record(self.sessions, "job-retry-scheduled", "warning", actor, study_uid=study_uid, series_uid=series_uid,
                             job_id=job_id, attempt=attempts, retry_in_seconds=delay, reason=str(exc)[:500])
                log.warning("job will retry job=%d attempt=%d in=%.0fs reason=%s", job_id, attempts, delay, exc)
                return
            self._fail(job_id, progress, actor, study_uid, series_uid, f"{exc} (gave up after {attempts} attempts)")
            return
        except Exception as exc:
            reason = str(exc) if isinstance(exc, Mr2ctError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, Mr2ctError):
                log.error("job failed job=%d series=%s reason=%s", job_id, series_uid, reason)
            else:
                log.exception("job failed job=%d series=%s", job_id, series_uid)
            self._fail(job_id, progress, actor, study_uid, series_uid, reason)
            return
        seconds = time.perf_counter() - started
        audit.record(  # what went into Orthanc, whatever becomes of the job's row
            self.sessions, audit.INSTANCES_TRANSFERRED, "success", actor, study_uid=study_uid, series_uid=ct.series_instance_uid,
            job_id=job_id, destination=self.store.url, instances=len(ct) + 1, sr_series_uid=str(sr.SeriesInstanceUID),
            stale_removed=stale_removed,
        )
        if not self._settle(
            job_id, progress, state="done", finished_at=utcnow(), lease_until=None, error=None, not_before=None, ct_series_uid=ct.series_instance_uid,
            sr_series_uid=str(sr.SeriesInstanceUID), sr_sop_instance_uid=str(sr.SOPInstanceUID),
            model_sha256=self.model.sha256, device=self.device.label, seconds=seconds, instance_count=len(datasets), progress=1.0, stage=None,
            input_digest=digest, ct_instances=len(ct), reused_job_id=None,
        ):
            return
        audit.record(
            self.sessions, audit.JOB_FINISHED, "success", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id,
            ct_series_uid=ct.series_instance_uid, sr_series_uid=str(sr.SeriesInstanceUID), seconds=round(seconds, 2),
            model_sha256=self.model.sha256, device=self.device.label, slice_plane=ct.plane,
        )
        log.info("job done job=%d series=%s ct_series=%s seconds=%.2f", job_id, series_uid, ct.series_instance_uid, seconds)

    def input_digest(self, datasets: list[pydicom.Dataset]) -> str:
        """What this worker's sCT of these originals (in any order) is made from: what each says
        (``instance_digest``: the same whichever transfer syntax or File Meta header it came in,
        from the spool or from Orthanc; until 2026-12-06 the files' bytes, so a series read back
        from Orthanc or sent again in implicit VR was made again), and what else decides its pixels
        and UIDs (the model and its views, the planes, the precision, uid_root, mr2ct's version;
        not the device: a CPU and a GPU worker of one cluster make the same sCT to within rounding)."""
        whole = hashlib.sha256()
        for part in sorted(instance_digest(ds) for ds in datasets):
            whole.update(part.encode())
        whole.update("|".join((self.model.output_key, self.plane, self.ct_plane, self.precision, self.uid_root,
                               synthesis.__version__)).encode())
        return whole.hexdigest()

    def _unchanged_since(self, job_id: int, series_uid: str, digest: str) -> Job | None:
        """The series' newest done job made from the same originals with the same settings, when its
        sCT and SR are still whole in Orthanc (a series sent again unchanged: a PACS's route fired
        twice, a study re-sent by hand). None when there is none, Orthanc lost part of it (a
        deleted sCT: sending the series again is how a site gets it back, so it is made again),
        or this job is an administrator's retry (POST /jobs/{id}/retry: made again as asked)."""
        with self.sessions() as session:
            if session.scalar(select(Job.remake).where(Job.id == job_id)):
                return None
            earlier = session.scalars(select(Job).where(
                Job.series_instance_uid == series_uid, Job.id != job_id, Job.state == "done", Job.input_digest == digest,
                Job.ct_instances.is_not(None)).order_by(Job.id.desc()).limit(1)).first()
        if earlier is None or not earlier.ct_series_uid or not earlier.sr_series_uid:
            return None
        if self.store.series_instance_count(earlier.ct_series_uid) != earlier.ct_instances:
            return None
        if self.store.series_instance_count(earlier.sr_series_uid) != 1:
            return None
        return earlier

    def _keep(self, job_id: int, progress: Progress, earlier: Job, digest: str, instances: int, actor: str, study_uid: str,
              series_uid: str, started: float) -> None:
        """Settle the job done with the sCT an earlier job made of the same originals (still whole in
        Orthanc); ``reused_job_id`` names the job that made it (one that kept it names that one)."""
        seconds = time.perf_counter() - started
        maker = earlier.reused_job_id or earlier.id
        if not self._settle(
            job_id, progress, state="done", finished_at=utcnow(), lease_until=None, error=None, not_before=None,
            ct_series_uid=earlier.ct_series_uid, sr_series_uid=earlier.sr_series_uid, sr_sop_instance_uid=earlier.sr_sop_instance_uid,
            model_sha256=self.model.sha256, device=self.device.label, seconds=seconds, instance_count=instances, progress=1.0, stage=None,
            input_digest=digest, ct_instances=earlier.ct_instances, reused_job_id=maker,
        ):
            return
        audit.record(
            self.sessions, audit.JOB_FINISHED, "success", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id,
            ct_series_uid=earlier.ct_series_uid, sr_series_uid=earlier.sr_series_uid, seconds=round(seconds, 2),
            model_sha256=self.model.sha256, device=self.device.label, kept_from_job=maker,
        )
        log.info("job done job=%d series=%s: the same originals and settings as job %d, whose sCT is whole in Orthanc: kept, "
                 "not made again (seconds=%.2f)", job_id, series_uid, maker, seconds)

    def _read_originals(self, series_uid: str, study_uid: str, paths: list[str], sop_uids: list[str], purged: int = 0) -> list[bytes]:
        """The series' originals from the spool, as files; with ``originals_from = orthanc``, those
        this process's spool_dir does not hold (a worker on another host than the SCP's) from
        Orthanc, and one Orthanc does not hold yet (its routing still sending it) waits for a later
        attempt. One that is gone from the spool (a spool retention round deleting it while this job
        started, or removed by hand) fails the job with how many are missing and what to do, not a
        file error naming a path; with ``originals_from = orthanc`` those spool retention deleted
        (``purged``) are read from Orthanc too, and the job fails at once when Orthanc lacks any."""
        try:
            if self.originals_from == "orthanc":
                return self._read_here_or_from_orthanc(series_uid, study_uid, paths, sop_uids, purged)
            return [Path(p).read_bytes() for p in paths]
        except FileNotFoundError:
            with self.sessions() as session:
                purged = session.scalar(select(func.count()).select_from(Instance).where(
                    Instance.series_instance_uid == series_uid, Instance.purged_at.is_not(None), Instance.set_aside.is_(None))) or 0
            if purged:
                raise SeriesNotUsable(purged_reason(purged, len(paths))) from None
            missing = sum(not os.path.exists(p) for p in paths)
            raise SeriesNotUsable(f"{missing} of the series' {len(paths)} originals are no longer in the spool (deleted by "
                                  "spool retention as this job started, or removed by hand): send the series again") from None

    def _read_here_or_from_orthanc(self, series_uid: str, study_uid: str, paths: list[str], sop_uids: list[str],
                                   purged: int = 0) -> list[bytes]:
        here: dict[str, bytes] = {}
        for path, uid in zip(paths, sop_uids):
            try:  # the row's file is this process's spool's (an SCP on this host with the same spool_dir wrote it)
                if self.own_spool is not None and Path(path) == self.own_spool.path_for(study_uid, series_uid, uid):
                    here[uid] = Path(path).read_bytes()
            except (FileNotFoundError, InvalidInstance):
                pass
        wanted = [uid for uid in sop_uids if uid not in here]
        if wanted:
            fetched = self.store.series_files(series_uid, wanted)
            if len(fetched) < len(wanted) and purged:  # deleted here for good: no later attempt finds them in this spool
                raise SeriesNotUsable(f"{purged_reason(purged, len(sop_uids))} (Orthanc at {self.store.url} holds {len(fetched)} of "
                                      f"the {len(wanted)} this host's spool does not)")
            if len(fetched) < len(wanted):
                raise StorageIncomplete(f"Orthanc at {self.store.url} holds {len(fetched)} of the {len(wanted)} originals of the series "
                                        "this host's spool does not (originals_from = orthanc): tried again once it may hold them")
            here.update(fetched)
            log.info("originals read from Orthanc series=%s instances=%d of %d (not in this host's spool)", series_uid, len(fetched),
                     len(sop_uids))
        return [here[uid] for uid in sop_uids]

    def _fail(self, job_id: int, tracker: Progress, actor: str, study_uid: str, series_uid: str, reason: str) -> None:
        if not self._settle(job_id, tracker, state="failed", finished_at=utcnow(), error=reason[:2000], lease_until=None, stage=None):
            return
        audit.record(self.sessions, audit.JOB_FAILED, "failure", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id, reason=reason[:500])

    def loop(self, stop: threading.Event, poll_seconds: float, wake: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop``; between polls, ``wake`` (set when a job is queued, see
        ``db.wake_on_job_queued``) starts the next claim at once instead of up to ``poll_seconds`` later."""
        wake = wake or threading.Event()
        try:
            self.warm_up()
        except Exception:  # a slower first job, nothing worse
            log.exception("warm-up failed")
        errors = PassErrors(log, "the job claim", "cannot claim a job")
        while not stop.is_set():
            wake.clear()  # before the claim: a job queued during it sets the event again
            try:
                job_id = claim_job(self.sessions, self.worker_id, self.lease_seconds)
                errors.succeeded()
            except Exception as exc:
                errors.failed(exc)
                job_id = None
            if job_id is None:
                wake.wait(poll_seconds)
                continue
            try:
                self.run_job(job_id, stop)
            except Exception as exc:  # past the job's own handling: a write of its start or outcome
                self._after_unrecorded(job_id, exc, stop, poll_seconds)

    def _after_unrecorded(self, job_id: int, exc: Exception, stop: threading.Event, poll_seconds: float) -> None:
        """``run_job`` raised past its own handling: the database went away while the job wrote its
        start, an audit row or its outcome. The job goes back to the queue (an outage: it runs again,
        its sCT the same, under the same UIDs) or fails with the reason (any other error, so that a
        defect does not run it over and over), as soon as the database takes the write; meanwhile
        this worker waits, and then goes on with the next job. Until 2026-12-07 the worker's thread
        died of it: the node received series and synthesized none until it was restarted."""
        errors = PassErrors(log, f"job={job_id}", f"job={job_id} ended without its outcome recorded")
        errors.failed(exc)
        outage = cannot_reach(exc)
        reason = f"the database was away while it ran ({driver_message(exc)})" if outage else f"{type(exc).__name__}: {exc}"
        values: dict[str, Any] = (
            {**QUEUED_AGAIN, "not_before": None, "error": f"queued again: {reason}"[:2000]}
            if outage else {"state": "failed", "finished_at": utcnow(), "lease_until": None, "stage": None, "error": reason[:2000]})
        while not stop.is_set():
            try:
                written = settle_job(self.sessions, job_id, self.worker_id, **values)
                errors.succeeded()
            except Exception as again:
                errors.failed(again)
                stop.wait(max(poll_seconds, 1.0))
                continue
            if written:
                log.warning("job %s job=%d: %s", "queued again" if outage else "failed", job_id, reason)
                try:
                    with self.sessions() as session:
                        job = session.get(Job, job_id)
                        series = session.get(Series, job.series_instance_uid) if job is not None else None
                    audit.record(self.sessions, "job-requeued" if outage else audit.JOB_FAILED, "warning" if outage else "failure",
                                 f"worker {self.worker_id}", study_uid=series.study_instance_uid if series else None,
                                 series_uid=series.series_instance_uid if series else None, job_id=job_id, reason=reason[:500])
                except Exception as lost:  # the database away again: the job's row says it all the same
                    log.warning("job=%d: its audit row not written: %s", job_id, driver_message(lost))
            return


def complete_series(sessions: sessionmaker[Session], series_uid: str, stable_seconds: float, rules: SelectionRules, actor: str,
                    from_state: str = "receiving") -> None:
    """Complete one series: a job, or 'ignored' with the reason; both audited. ``from_state``:
    see ``ingest.mark_stable`` (nothing happens to a series no longer in it)."""
    state, job_id = mark_stable(sessions, series_uid, stable_seconds, rules, from_state)
    if state == from_state:
        return
    with sessions() as session:
        series = session.get(Series, series_uid)
        study_uid, count, reason = (series.study_instance_uid, series.instance_count, series.reason) if series else (None, 0, None)
    if state == "stable":
        audit.record(sessions, audit.SERIES_STABLE, "success", actor, study_uid=study_uid, series_uid=series_uid, job_id=job_id, instances=count)
        log.info("series complete series=%s job=%s instances=%d", series_uid, job_id, count)
    else:
        audit.record(sessions, audit.SERIES_STABLE, "warning", actor, study_uid=study_uid, series_uid=series_uid, instances=count, reason=reason, synthesized=False)
        log.info("series not synthesized series=%s reason=%s", series_uid, reason)


def rejudge(sessions: sessionmaker[Session], rules: SelectionRules, actor: str, series_uids: Sequence[str] = (),
            reason_code: str | None = None, since: datetime | None = None, originals_from_orthanc: bool = False,
            dry_run: bool = False) -> dict[str, Any]:
    """Judge series the selection rules set aside again, by ``rules`` (after a model that learned
    more was activated with select_follow_model, or the node restarted with wider rules): a job for
    each that passes now, the reason again for each that does not, each audited as a completion is,
    and the whole as ``series-rejudged``. The series: ``series_uids``, and with ``reason_code`` every
    series that rule set aside (last received ``since``; at most 1,000, the latest first).
    ValueError for a request that names none, an invalid UID or a rule no change alters. ``dry_run``:
    what would happen, nothing changed (``would``: synthesize, or stay set aside with the ``reason``).

    Returns ``judged``, ``synthesized`` and ``items``, each series' answer: ``series_uid``, ``state``
    (stable: a job made, ``job_id``; ignored: ``reason``), or ``not_judged`` with why (unknown, not
    set aside, set aside for what no rule change alters, its originals deleted by spool retention
    where the workers read none from Orthanc)."""
    from dicom_node.spool import is_valid_uid

    if not series_uids and reason_code is None:
        raise ValueError("name the series (series_uids) or a rule that set them aside (reason_code)")
    bad = [uid for uid in series_uids if not is_valid_uid(uid)]
    if bad:
        raise ValueError(f"{len(bad)} of the series UIDs are not valid UIDs (digits and dots, at most 64 characters)")
    if reason_code is not None and reason_code not in REJUDGED:
        raise ValueError(f"reason_code {reason_code!r} is not a rule a series can be judged again by; one of {', '.join(REJUDGED)}")
    uids = list(dict.fromkeys(series_uids))
    if reason_code is not None:
        query = select(Series.series_instance_uid).where(Series.state == "ignored", Series.reason_code == reason_code)
        if since is not None:
            query = query.where(Series.last_received_at >= since)
        with sessions() as session:
            uids += [u for u in session.scalars(query.order_by(Series.last_received_at.desc()).limit(1000)) if u not in uids]
    answers: list[dict[str, Any]] = []
    for uid in uids:
        with sessions() as session:
            row = session.get(Series, uid)
            purged = session.scalar(select(func.count()).select_from(Instance).where(
                Instance.series_instance_uid == uid, Instance.purged_at.is_not(None), Instance.set_aside.is_(None))) or 0
            why = ("the node holds no such series" if row is None
                   else f"it is {row.state}, not set aside" if row.state != "ignored"
                   else f"it was set aside for what no rule change alters ({row.reason_code or 'recorded before reason codes'}: {row.reason})"
                   if row.reason_code not in REJUDGED
                   else f"spool retention deleted {purged} of its originals: send the series again, or POST /synthesize it from Orthanc"
                   if purged and not originals_from_orthanc else None)
            skip = judge(session, row, rules) if dry_run and why is None else None
        if why is not None:
            answers.append({"series_uid": uid, "not_judged": why})
        elif dry_run:
            answers.append({"series_uid": uid, "would": "synthesize"} if skip is None else
                           {"series_uid": uid, "would": "stay set aside", "reason": skip.reason})
        else:
            complete_series(sessions, uid, 0, rules, actor, from_state="ignored")
            with sessions() as session:
                row = session.get(Series, uid)
                job_id = session.scalar(select(func.max(Job.id)).where(Job.series_instance_uid == uid))
            answers.append({"series_uid": uid, "state": row.state, **({"job_id": job_id} if row.state == "stable" else {"reason": row.reason})}
                           if row is not None else {"series_uid": uid, "not_judged": "deleted meanwhile"})
    if dry_run:
        return {"judged": 0, "synthesized": 0, "would_synthesize": sum(a.get("would") == "synthesize" for a in answers), "items": answers}
    made = sum(a.get("state") == "stable" for a in answers)
    audit.record(sessions, "series-rejudged", "success", actor, asked=len(uids), synthesized=made,
                 still_ignored=sum(a.get("state") == "ignored" for a in answers), not_judged=sum("not_judged" in a for a in answers),
                 reason_code=reason_code)
    log.info("series judged again: %d asked, %d synthesized now", len(uids), made)
    return {"judged": sum("state" in a for a in answers), "synthesized": made, "items": answers}


def stability_loop(
    sessions: sessionmaker[Session], stable_seconds: float, poll_seconds: float, stop: threading.Event,
    rules: Callable[[], SelectionRules] = SelectionRules, arriving: Callable[[], set[str]] = set,
) -> None:
    """Turn series that stayed quiet for ``stable_seconds`` into jobs (like Orthanc's StableAge);
    ``rules``: the selection rules as they stand at each completion (``registry.FollowedSelection``).
    ``arriving``: series whose spooled instances still wait for their rows (``Recorder.pending_series``):
    not quiet, however old their last committed row. Until 2026-12-07 a series whose rows a database
    outage held back was completed from the rows before it, and synthesized again once the rest landed."""
    def one_pass() -> None:
        held = arriving()
        due = [uid for uid in stable_series(sessions, stable_seconds) if uid not in held]
        now = rules() if due else SelectionRules()  # once a pass: the registry asked once, not per series
        for series_uid in due:
            complete_series(sessions, series_uid, stable_seconds, now, "stability monitor")

    errors = PassErrors(log, "the stability monitor", "stability monitor pass failed")
    while not stop.wait(poll_seconds):
        errors.attempt(one_pass)
