"""Database tables (SQLAlchemy 2.x typed mappings)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC: one with an offset converted, one without taken as UTC (SQLite hands back
    the node's times without their offset, and an API filter may come without one)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16), default="open")  # open, released, aborted
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)  # for audit queries; never logged
    modality: Mapped[str] = mapped_column(String(16))
    calling_ae: Mapped[str] = mapped_column(String(16))
    series_description: Mapped[str] = mapped_column(String(64), default="")
    orientation: Mapped[str] = mapped_column(String(16), default="")  # the first instance's: axial, sagittal, coronal, oblique
    image_type: Mapped[str] = mapped_column(String(64), default="", server_default="")  # the first instance's ImageType
    # the first instance's complex component (MAGNITUDE, PHASE, REAL, IMAGINARY) where it says, and what said it
    component: Mapped[str] = mapped_column(String(16), default="", server_default="")
    component_source: Mapped[str] = mapped_column(String(80), default="", server_default="")
    # the first instance's MR contrast (synthesis.contrast) and what told it, MIXED where another instance reads another
    # (recorder.heed, since 2026-12-06); '' when not read (recorded before 0024)
    contrast: Mapped[str] = mapped_column(String(24), default="", server_default="")
    contrast_source: Mapped[str] = mapped_column(String(160), default="", server_default="")
    # every BodyPartExamined its instances name, backslash-separated in the order first named (recorder.heed)
    body_part: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # WITH or WITHOUT a contrast agent, as the first instance's header says (synthesis.contrast.contrast_agent), WITH
    # where any other instance's says so (recorder.heed, since 2026-12-06), and what told it; '' when not read (before 0025)
    contrast_agent: Mapped[str] = mapped_column(String(8), default="", server_default="")
    contrast_agent_source: Mapped[str] = mapped_column(String(160), default="", server_default="")
    # WITH or WITHOUT fat suppression, as its header says (synthesis.contrast.fat_suppression; WITH where any other
    # instance's says so), and what told it; '' before 0026
    fat_suppression: Mapped[str] = mapped_column(String(8), default="", server_default="")
    fat_suppression_source: Mapped[str] = mapped_column(String(160), default="", server_default="")
    # an instance sent again (or moved away) since the four answers above were folded from its headers: they are read
    # again from the spooled files when the series completes (ingest.refresh_headers; since 0034)
    headers_stale: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # receiving -> stable (a job was made) | ignored (selection rules said no)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    # the reason's code (dicom_node.ingest.REASON_CODES) while ignored; '' otherwise, and for series ignored before 0029
    reason_code: Mapped[str] = mapped_column(String(24), default="", server_default="", index=True)
    # where the series stands (ignored and why, its job queued, running, done, failed) is due to be written on the MR
    # series in Orthanc (its Mr2ctOutcome metadata, dicom_node.outcomes); the note last written there; before 0027 none
    outcome_due: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    outcome_note: Mapped[str | None] = mapped_column(Text)
    # no writer takes the note before this: a writer holds it (so that two never write one series' notes out of
    # order), or Orthanc did not hold the series yet (routed there after the node judged it); None: free (0030);
    # set and not due: a writer holds it, and once the time is past, that writer died (taken again; indexed 0031)
    outcome_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class Instance(Base):
    __tablename__ = "instances"
    # spool retention's round each minute: the originals still held, oldest first, without a scan of all rows
    __table_args__ = (Index("ix_instances_purged_received", "purged_at", "received_at"),
                      # forward_commitment's round: the originals still held and not committed, without a scan of all rows
                      Index("ix_instances_committed_purged", "forward_committed_at", "purged_at"))

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    # its slice plane (ingest.validate): a series whose instances name several is no one volume (a localizer)
    orientation: Mapped[str] = mapped_column(String(16), default="", server_default="")
    # a single-frame one's Image Position (Patient), to 0.01 mm ('' for multi-frame): a series with
    # several images at one position (b-values, echoes) is no one volume either
    position: Mapped[str] = mapped_column(String(48), default="", server_default="")
    # a multi-frame one's frames, and how many positions they lie at (1 and 1 for a single frame):
    # fewer positions than frames is no one volume (an enhanced diffusion or multi-echo series)
    frames: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    frame_positions: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # a multi-frame one's positions, as a digest: several instances at the same positions (one echo
    # or b-value each) are no one volume either (None: a single frame, or recorded before 0018)
    frame_set: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Routing of the original (forward_originals): retried with backoff until it lands. An instance the
    # destination refused forward_max_refusals times is given up: forward_next_at NULL, error kept.
    forwarded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    forward_attempts: Mapped[int] = mapped_column(Integer, default=0)
    forward_refusals: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    forward_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    forward_error: Mapped[str | None] = mapped_column(Text)
    # Storage commitment of the routed original (forward_commitment): the request that asks the
    # destination for it (a ForwardCommitment's id; None: not asked, or to be asked again), and
    # when the destination's N-EVENT-REPORT said it holds it. Retention waits for the latter.
    forward_commitment_id: Mapped[int | None] = mapped_column(Integer, index=True)
    forward_committed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Spool retention (spool_retention_hours): when the original was deleted from the spool. A
    # re-send of the instance clears it (the spool holds it again).
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why the instance is no part of its series' sCT until it is sent again (None: it is): the series
    # was asked for as Orthanc holds it (POST /synthesize), and Orthanc no longer held this one (a
    # slice deleted there on purpose). Not counted in the series' instance_count meanwhile.
    set_aside: Mapped[str | None] = mapped_column(Text)


class RefusedInstance(Base):
    """An instance the SCP refused with a failure status, kept until the same SOP Instance UID is
    stored: meanwhile its series is not synthesized from the rest, which would leave a gap in the
    sCT (a TPS may fill it by interpolation, unseen)."""

    __tablename__ = "refused_instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(6))
    reason: Mapped[str] = mapped_column(Text)
    refused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(ForeignKey("series.series_instance_uid"), index=True)
    # queued -> running -> done | failed
    state: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # retry backoff
    worker: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    ct_series_uid: Mapped[str | None] = mapped_column(String(64))
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    seconds: Mapped[float | None] = mapped_column()
    # Of the series' slices, the fraction synthesized so far (0..1, test-time views counted): written
    # by the running worker about once a second; None until its first batch, 1.0 once done.
    progress: Mapped[float | None] = mapped_column(Float)
    # What a running job is doing: "reading" its originals from the spool, "synthesizing", or
    # "storing" the CT and SR in the PACS (progress is 1 by then); None when it is not running.
    stage: Mapped[str | None] = mapped_column(String(16))
    # What a done job's sCT was made from (SHA-256 of its originals' files and of what else decides the pixels:
    # the model with its views, planes, precision, uid_root, mr2ct's version), how many CT instances it stored, and
    # the earlier job whose sCT, still whole in Orthanc, it kept instead of making it again (the same series sent
    # again unchanged); None before 0028 and for jobs not done
    input_digest: Mapped[str | None] = mapped_column(String(64))
    ct_instances: Mapped[int | None] = mapped_column(Integer)
    reused_job_id: Mapped[int | None] = mapped_column(Integer)
    remake: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # made by POST /jobs/{id}/retry: never kept


# The values of a job put back in the queue (a shut-down worker's, one to retry, one whose process
# died): no lease, and nothing of the run it left; the next claim starts it afresh.
QUEUED_AGAIN: dict[str, Any] = {"state": "queued", "lease_until": None, "progress": None, "stage": None}


class AuditEvent(Base):
    """Append-only audit trail (modelled on DICOM PS3.15 A.5 event types)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # success, failure, warning
    actor: Mapped[str] = mapped_column(String(128))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ModelVersion(Base):
    """The model registry: registered model files, their cards, training losses and metrics; one is active."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    weights_path: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(32))
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    losses: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # per epoch, the paper's Table 2
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    active: Mapped[bool] = mapped_column(default=False)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrainingRun(Base):
    """A `mr2ct train` run, recorded as it trains: the paper's Table 2 losses appended at the end
    of every epoch, its state, and the model it exported."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    out_dir: Mapped[str] = mapped_column(Text, index=True)
    command: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)  # running, finished, interrupted, failed
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    epochs_planned: Mapped[int] = mapped_column(Integer)
    epochs_completed: Mapped[int] = mapped_column(Integer, default=0)
    losses: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # per epoch: epoch, the Table 2 losses, seconds
    model_sha256: Mapped[str | None] = mapped_column(String(64))


class Evaluation(Base):
    """A model scored on a hospital's own MR/CT pairs (`mr2ct evaluate --pairs --registry`): the
    evidence for promoting it. The pairs are named by a digest of their series UIDs, so two
    evaluations on the same pairs are found as such, with no patient identifier stored."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    against_sha256: Mapped[str | None] = mapped_column(String(64))
    dataset_digest: Mapped[str] = mapped_column(String(64), index=True)  # SHA-256 of the scored pairs' series UIDs
    label: Mapped[str] = mapped_column(String(128), default="")
    pairs: Mapped[int] = mapped_column(Integer)
    test_time_augmentation: Mapped[str] = mapped_column(String(16))
    mae_hu: Mapped[float] = mapped_column(Float)
    psnr_db: Mapped[float] = mapped_column(Float)
    ssim: Mapped[float] = mapped_column(Float)
    mae_linear_hu: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the JSON report of `mr2ct evaluate --pairs`


class ApiToken(Base):
    """Bearer tokens for the admin API; only a SHA-256 of each token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # admin, auditor, requester
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # to the minute (tokens.LAST_USED_RESOLUTION)


class AuditExport(Base):
    """Where the audit trail's export to a repository (``audit_syslog``) stands: the last audit row
    sent, and which process sends (a lease, so that of several node processes one sends, in order)."""

    __tablename__ = "audit_exports"

    destination: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)  # rows of actions no DICOM audit message stands for
    holder: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Commitment(Base):
    """A storage commitment request (N-ACTION of Storage Commitment Push Model) and its answer, the
    N-EVENT-REPORT the node sends on an association of its own to the requester's address."""

    __tablename__ = "commitments"

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    items: Mapped[list[list[str]]] = mapped_column(JSON, default=list)  # [SOP Class UID, SOP Instance UID] as asked
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # pending -> reported (the requester took the N-EVENT-REPORT) | given-up (it never did)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    committed: Mapped[int | None] = mapped_column(Integer)  # of the items, how many the report said the node holds
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


class ForwardCommitment(Base):
    """A storage commitment request the node sent to its routing destination (``forward_commitment``:
    N-ACTION of Storage Commitment Push Model) for originals it routed there, and what the
    destination's N-EVENT-REPORT answered."""

    __tablename__ = "forward_commitments"

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    destination: Mapped[str] = mapped_column(String(200))
    instances: Mapped[int] = mapped_column(Integer)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # requested -> committed (all) | partial (some failed: those routed again) | expired (no report in
    # forward_commitment_wait_seconds: asked again) | refused (the N-ACTION did not go, or failed)
    state: Mapped[str] = mapped_column(String(16), default="requested", index=True)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    committed: Mapped[int | None] = mapped_column(Integer)
    failed: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class Delivery(Base):
    """A done job's sCT series and SR to be sent on by Orthanc to a DICOM modality declared there
    (``deliver_to``: a treatment planning system, say), retried with a growing pause until sent."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True)
    modality: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # pending -> sent | given-up (after MAX_ATTEMPTS; POST /deliveries/retry asks again); with deliver_commitment
    # pending -> committing (sent, the modality's storage commitment report awaited) -> sent | pending again
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    instances: Mapped[int | None] = mapped_column(Integer)  # what Orthanc reported sent
    last_error: Mapped[str | None] = mapped_column(Text)
    # with deliver_commitment: the storage commitment transaction Orthanc opened with the modality for the last
    # sending, and when the modality reported every instance committed (0032; None before, and without it)
    commitment_uid: Mapped[str | None] = mapped_column(String(64))
    committed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
