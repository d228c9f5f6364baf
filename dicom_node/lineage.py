"""Where one patient's images went for training: from the audit rows of `mr2ct pull` and
`pull-pairs` (``pacs-data-pulled``, which name the patient and the folder) to the training runs
that read those folders, the runs fine-tuned from them, and the models they made. What a hospital
asks when a patient withdraws consent to research use; answered by ``GET /audit/lineage`` and
``mr2ct audit lineage``."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.models import AuditEvent, ModelVersion, TrainingRun, as_utc


def patient_lineage(session: Session, patient_id: str) -> dict[str, Any]:
    """The studies of ``patient_id`` copied out of the PACS and into which folder (and when ``--prune``
    deleted those copies, ``removed_at``; the runs that read them before still learned), the training
    runs that read one of those folders (``--data``, recorded resolved since 2026-12-06) or were
    fine-tuned from such a run (``--init-from`` its folder or a file in it), the models they
    exported and, of those, the ones registered and whether the active one is among them."""
    pulled = and_(AuditEvent.action == audit.DATA_PULLED, AuditEvent.outcome == "success",
                  AuditEvent.detail["patient_id"].as_string() == patient_id)
    pulls = [{"at": as_utc(r.at).isoformat(), "study_uid": r.study_instance_uid, "series": r.detail.get("series", []),
              "command": r.detail.get("command"), "source": r.detail.get("source"), "folder": r.detail.get("destination")}
             for r in session.scalars(select(AuditEvent).where(pulled).order_by(AuditEvent.id))]
    folders = {p["folder"] for p in pulls if p["folder"]}
    deleted: dict[tuple[str, str], str] = {}  # (folder, series) -> when --prune deleted the copy there
    if folders:
        for r in session.scalars(select(AuditEvent).where(AuditEvent.action == audit.PULLED_DATA_REMOVED).order_by(AuditEvent.id)):
            if r.detail.get("destination") in folders:
                for series_uid in r.detail.get("series", []):
                    deleted[(r.detail["destination"], series_uid)] = as_utc(r.at).isoformat()
    for p in pulls:  # when every series of it was deleted from its folder since (a later pull may have copied it again)
        times = [deleted.get((p["folder"], s)) for s in p["series"]]
        p["removed_at"] = max(times) if times and all(t is not None and t > p["at"] for t in times) else None  # type: ignore[type-var]
    runs: list[Any] = []
    learned: set[str] = set()  # the folders of the runs found so far: a run fine-tuned from one of them learned too
    columns = (TrainingRun.id, TrainingRun.out_dir, TrainingRun.config, TrainingRun.state, TrainingRun.started_at, TrainingRun.model_sha256)
    for r in session.execute(select(*columns).order_by(TrainingRun.id)):  # not their losses, epoch by epoch
        start = str((r.config or {}).get("init_from") or "")
        if (r.config or {}).get("data") in folders or (start and (start in learned or os.path.dirname(start) in learned)):
            runs.append(r)
            learned.add(r.out_dir)
    shas = {r.model_sha256 for r in runs if r.model_sha256}
    models = [{"id": m.id, "name": m.name, "sha256": m.sha256, "active": m.active}
              for m in session.scalars(select(ModelVersion).where(ModelVersion.sha256.in_(shas)).order_by(ModelVersion.id))] if shas else []
    return {"pulls": pulls,
            "training_runs": [{"run_id": r.id, "data": r.config.get("data"), "out_dir": r.out_dir, "state": r.state,
                               "started_at": as_utc(r.started_at).isoformat(), "model_sha256": r.model_sha256} for r in runs],
            "models": models, "active_model_learned_from_patient": any(m["active"] for m in models)}
