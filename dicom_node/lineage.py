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
    exported and, of those, the ones registered and whether the active one is among them. Since
    2026-12-07 the pulls, runs and model cards also name the cache by its ``cache_id``
    (``training.pacs_pull.cache_id``), which moves with it: a run on a cache moved or copied
    elsewhere, one fine-tuned from weights copied elsewhere, and a registered model trained on
    another host or with ``--no-record`` (its card lists the caches) are followed too."""
    pulled = and_(AuditEvent.action == audit.DATA_PULLED, AuditEvent.outcome == "success",
                  AuditEvent.detail["patient_id"].as_string() == patient_id)
    pulls = [{"at": as_utc(r.at).isoformat(), "study_uid": r.study_instance_uid, "series": r.detail.get("series", []),
              "command": r.detail.get("command"), "source": r.detail.get("source"), "folder": r.detail.get("destination"),
              "cache_id": r.detail.get("cache_id"), "issuer": r.detail.get("issuer")}
             for r in session.scalars(select(AuditEvent).where(pulled).order_by(AuditEvent.id))]
    folders = {p["folder"] for p in pulls if p["folder"]}
    caches = {p["cache_id"] for p in pulls if p["cache_id"]}  # the same folders wherever they were moved since (pulls since 2026-12-07)
    deleted: dict[tuple[str, str], str] = {}  # (folder's cache_id, else its path; series) -> when --prune deleted the copy there
    if folders:
        for r in session.scalars(select(AuditEvent).where(AuditEvent.action == audit.PULLED_DATA_REMOVED).order_by(AuditEvent.id)):
            if r.detail.get("destination") in folders or r.detail.get("cache_id") in caches:
                for series_uid in r.detail.get("series", []):
                    for folder in {r.detail.get("cache_id"), r.detail.get("destination")} - {None}:
                        deleted[(folder, series_uid)] = as_utc(r.at).isoformat()
    for p in pulls:  # when every series of it was deleted from its folder since (a later pull may have copied it again)
        times = [deleted.get((p["cache_id"] or p["folder"], s)) for s in p["series"]]  # the folder by its id where the pull recorded one
        p["removed_at"] = max(times) if times and all(t is not None and t > p["at"] for t in times) else None  # type: ignore[type-var]
    runs: list[Any] = []
    learned: set[str] = set()  # the folders of the runs found so far: a run fine-tuned from one of them learned too
    columns = (TrainingRun.id, TrainingRun.out_dir, TrainingRun.config, TrainingRun.state, TrainingRun.started_at, TrainingRun.model_sha256)
    for r in session.execute(select(*columns).order_by(TrainingRun.id)):  # not their losses, epoch by epoch
        config = r.config or {}
        start = str(config.get("init_from") or "")
        if (config.get("data") in folders or caches.intersection(config.get("learned_from_caches") or ())
                or (start and (start in learned or os.path.dirname(start) in learned))):
            runs.append(r)
            learned.add(r.out_dir)
    shas = {r.model_sha256 for r in runs if r.model_sha256}
    # A registered model whose card says it learned from one of the caches: trained elsewhere (a GPU
    # host with its own database) or with --no-record, it has no run here to follow.
    registered = select(ModelVersion.id, ModelVersion.name, ModelVersion.sha256, ModelVersion.active, ModelVersion.card)
    models = [{"id": m.id, "name": m.name, "sha256": m.sha256, "active": m.active}
              for m in session.execute(registered.order_by(ModelVersion.id))
              if m.sha256 in shas or caches.intersection(((m.card or {}).get("training") or {}).get("learned_from_caches") or ())
              ] if shas or caches else []
    return {"pulls": pulls,
            "training_runs": [{"run_id": r.id, "data": r.config.get("data"), "out_dir": r.out_dir, "state": r.state,
                               "started_at": as_utc(r.started_at).isoformat(), "model_sha256": r.model_sha256} for r in runs],
            "models": models, "active_model_learned_from_patient": any(m["active"] for m in models)}
