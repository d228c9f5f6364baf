"""Audit events: one function that appends a row. There is no update or delete path."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.models import AuditEvent

log = logging.getLogger(__name__)

# Event names after DICOM PS3.15 A.5.3 (and IHE ATNA).
ASSOCIATION = "application-activity/association"
SECURITY_ALERT = "security-alert"
INSTANCES_TRANSFERRED = "dicom-instances-transferred"
INSTANCE_REFUSED = "dicom-instance-refused"
INSTANCE_NOT_RECORDED = "dicom-instance-not-recorded"  # spooled and acknowledged, but the database refused its row
ROUTING_GIVEN_UP = "routing-given-up"
SYNTHESIS_REQUESTED = "synthesis-requested"  # a user had the node copy a series from Orthanc (POST /synthesize)
DATA_PULLED = "pacs-data-pulled"  # `mr2ct pull` / `pull-pairs` copied a study's series from a PACS into a folder
PULLED_DATA_REMOVED = "pulled-data-removed"  # their --prune deleted such copies, the PACS no longer holding the series
SERIES_STABLE = "series-stable"
JOB_STARTED = "job-started"
JOB_FINISHED = "job-finished"
JOB_FAILED = "job-failed"
APPLICATION_START = "application-activity/start"
APPLICATION_STOP = "application-activity/stop"


def event(
    action: str,
    outcome: str,
    actor: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    **detail: Any,
) -> AuditEvent:
    """An audit row to add in a transaction that writes what it records (see record)."""
    return AuditEvent(action=action, outcome=outcome, actor=actor, study_instance_uid=study_uid,
                      series_instance_uid=series_uid, job_id=job_id, detail=detail)


def record(sessions: sessionmaker[Session], action: str, outcome: str, actor: str, **fields: Any) -> None:
    """Write one audit row in a transaction of its own; ``fields`` as ``event`` takes them."""
    with sessions.begin() as session:
        session.add(event(action, outcome, actor, **fields))
