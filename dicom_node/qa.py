"""Constancy QA of the running service (``mr2ct qa``), as a radiotherapy department checks its CT
scanner each morning: a phantom head whose true CT is known is rendered as a T1 MR series with
fresh UIDs, sent to the node by C-STORE like a scanner's, and the sCT the node stores in Orthanc
is read back and compared with the truth inside the body: MAE and mean error in HU, per tissue
too. The whole path is exercised (DICOM, selection, the active model, the views, the CT writer,
Orthanc), so a changed model, a wrong setting or a broken route shows as a changed figure or a
failure, not in a patient's plan. Each run is an audit row (``qa-run``: the figures, pass or
fail against ``--max-mae-hu``); the QA study is deleted from Orthanc afterwards unless kept.
Beside it go small series the node must not synthesize, each in a study of its own: one of a contrast
it does not select (FLAIR by default), a post-contrast T1 and a fat-saturated T1 (while the node
takes neither, as by default): the run fails if the node makes an sCT of any (``run_qa``'s
interlocks).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom

from dicom_node.orthanc_store import OrthancStore
from dicom_node.settings import Settings, parse_dicom_destination

if TYPE_CHECKING:
    from dicom_node.ingest import SelectionRules

QA_PATIENT_NAME = "MR2CT^QA PHANTOM"
QA_PATIENT_ID = "MR2CT-QA"
QA_DESCRIPTION = "mr2ct QA phantom T1"


class QaFailed(Exception):
    """The QA could not be run through (the node refused, no sCT came): what happened."""


def default_node(settings: Settings) -> str:
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "::", "") else settings.dicom_host
    return f"{settings.ae_title}@{host}:{settings.dicom_port}"


def send(files: list[Path], node: str, calling_ae: str, timeout: float = 30.0, ssl_context: Any = None) -> None:
    """C-STORE every file to the node (a scanner's way; over TLS with ``ssl_context``); QaFailed saying what went wrong."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from dicom_node.transport import NodeAE

    called, host, port = parse_dicom_destination(node)
    ae = NodeAE(calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    try:
        assoc = ae.associate(host, port, ae_title=called, tls_args=(ssl_context, host) if ssl_context is not None else None)
    except OSError as exc:  # the TLS handshake refused (ssl.SSLError)
        raise QaFailed(f"no TLS association with {node}: {type(exc).__name__}: {exc}") from exc
    if not assoc.is_established:
        raise QaFailed(f"no association with {node} as {calling_ae} (not listening, {calling_ae} not in the node's allowed_aes, "
                       f"or the node speaks DICOM over TLS{' only with another CA' if ssl_context is not None else ': use --tls'})")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                raise QaFailed(f"the node answered C-STORE of {path.name} with "
                               f"{'nothing' if code is None else f'status 0x{code:04X}'}")
    finally:
        if assoc.is_established:
            assoc.release()


def _ct_series(store: OrthancStore, study_uid: str) -> list[str]:
    found = store.client.post("tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "CT"}}).json()
    return [str(series_id) for series_id in found]


def wait_for_sct(store: OrthancStore, study_uid: str, slices: int, timeout: float) -> tuple[str, list[str]]:
    """Orthanc's id of the study's CT series and of its instances, once it holds ``slices`` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for series_id in _ct_series(store, study_uid):
            instance_ids = list(store.client.series.get_instances_ids(series_id))
            if len(instance_ids) >= slices:
                return series_id, instance_ids
        time.sleep(1.0)
    raise QaFailed(f"no sCT series of {slices} slices in Orthanc {timeout:.0f} s after the QA MR was sent "
                   "(is the node's worker running? GET /jobs says what became of the series)")


def score(sct: np.ndarray, truth: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """MAE and mean error (sCT - CT) in HU inside the body, and per tissue."""
    from training import phantoms
    from training.pairs import body_mask

    body = body_mask(truth)
    error = sct - truth
    by_tissue, bias_by_tissue = {}, {}
    for index, name in enumerate(phantoms.TISSUE_NAMES):
        inside = body & (labels == index)
        if inside.sum() >= 20:
            by_tissue[name] = round(float(np.abs(error[inside]).mean()), 2)
            bias_by_tissue[name] = round(float(error[inside].mean()), 2)
    return {"mae_hu": round(float(np.abs(error[body]).mean()), 2), "bias_hu": round(float(error[body].mean()), 2),
            "mae_by_tissue": by_tissue, "bias_by_tissue": bias_by_tissue, "body_pixels": int(body.sum())}


def _sct_volume(store: OrthancStore, instance_ids: list[str], positions: list[np.ndarray], normal: np.ndarray, spacing: float) -> np.ndarray:
    """The sCT's slices in HU, in the QA MR's slice order (each matched by its position)."""
    found: dict[int, np.ndarray] = {}
    offsets = [float(np.dot(p, normal)) for p in positions]
    for instance_id in instance_ids:
        ds = pydicom.dcmread(BytesIO(store.instance_file(instance_id)))
        offset = float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
        nearest = int(np.argmin([abs(offset - o) for o in offsets]))
        if abs(offset - offsets[nearest]) > spacing / 2:
            raise QaFailed("the sCT's slices do not lie on the QA MR's (ct_plane = axial re-grids a tilted series; the QA phantom is "
                           "axial, so this should not happen)")
        found[nearest] = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    missing = [i for i in range(len(positions)) if i not in found]
    if missing:
        raise QaFailed(f"the sCT has no slice for {len(missing)} of the QA MR's {len(positions)} slices")
    return np.stack([found[i] for i in range(len(positions))])


# An interlock series is of a contrast the node must leave unsynthesized: the first of these its
# select_acquisition_contrasts does not take
INTERLOCK_CONTRASTS = ("FLUID_ATTENUATED", "T2", "PROTON_DENSITY")
# the QA result's keys of the interlocks (``interlocks``), in the order they are reported
INTERLOCK_KEYS = ("contrast_interlock", "contrast_agent_interlock", "fat_suppression_interlock")


def interlock_contrast(rules: SelectionRules) -> tuple[str, str, str, str, str | None] | None:
    """(contrast, and its textbook timing) of the interlock series the QA sends beside the T1 one;
    None when the node takes every contrast (nothing to check)."""
    from synthesis.contrast import EXAMPLE_TIMINGS

    selected = rules.contrasts
    chosen = next((c for c in INTERLOCK_CONTRASTS if selected and c not in selected), None)
    return (chosen, *EXAMPLE_TIMINGS[chosen]) if chosen else None


@dataclass(frozen=True)
class Interlock:
    """A series the node must leave unsynthesized: the code of the node's reason when it holds
    (dicom_node.ingest.REASON_CODES), what it is, and the header that says so."""

    code: str
    what: str
    timing: tuple[str, str, str, str | None]
    contrast_agent: str | None = None
    fat_suppressed: bool = False

    @property
    def key(self) -> str:
        """Its key in the QA's result (INTERLOCK_KEYS)."""
        return f"{self.code}_interlock"


def interlocks(rules: SelectionRules) -> tuple[list[Interlock], dict[str, str]]:
    """The interlock series the QA sends beside the T1 one, by what the node's selection rules keep
    out (``registry.node_selection``: its settings', or its running model's card's), and the
    interlocks not checked, with why (a node that takes every contrast, or the agent or fat
    suppression too, has nothing of it to hold)."""
    from synthesis.contrast import CHOICES, EXAMPLE_TIMINGS, WITH

    sent: list[Interlock] = []
    unchecked: dict[str, str] = {}
    told = interlock_contrast(rules)
    if told:
        sent.append(Interlock("contrast", told[0], told[1:]))
    else:
        unchecked["contrast_interlock"] = f"not checked: {rules.said_by('select_acquisition_contrasts')} takes every contrast"
    for code, what, header in (("contrast_agent", "post-contrast T1", {"contrast_agent": "GADOBUTROL"}),
                               ("fat_suppression", "fat-saturated T1", {"fat_suppressed": True})):
        chosen = getattr(rules, code)
        if WITH in CHOICES[chosen]:
            unchecked[f"{code}_interlock"] = f"not checked: {rules.said_by(f'select_{code}')} is {chosen!r}"
        else:
            sent.append(Interlock(code, what, EXAMPLE_TIMINGS["T1"], **header))
    return sent, unchecked


def _write_interlock(folder: Path, interlock: Interlock, seed: int) -> Any:
    """Four small slices of the phantom head whose header says what ``interlock`` is, in a study of
    their own (an sCT the node wrongly made of them is never taken for the QA's)."""
    from training.phantom_dicom import write_mr_series

    return write_mr_series(folder, seed=seed, slices=4, size=64, pixel_spacing=4.0, slice_spacing=8.0, patient_name=QA_PATIENT_NAME,
                           patient_id=QA_PATIENT_ID, series_description=f"mr2ct QA interlock {interlock.what}",
                           uid_key=f"-qa-interlock-{interlock.key}-{time.time_ns()}", mr_timing=interlock.timing,
                           contrast_agent=interlock.contrast_agent, fat_suppressed=interlock.fat_suppressed)


def check_interlock(sessions: Any, series_uid: str, interlock: Interlock, timeout: float) -> dict[str, Any]:
    """Whether the node left the interlock series unsynthesized for what it is (the series
    recorded ignored with that reason, no job made of it), waiting up to ``timeout`` s for it to be
    complete."""
    from sqlalchemy import select

    from dicom_node.models import Job, Series

    deadline = time.monotonic() + timeout
    while True:  # until the node decided; a job wrongly made is waited for too, so that its sCT is in Orthanc to delete
        with sessions() as session:
            row = session.get(Series, series_uid)
            states = dict(session.execute(select(Job.id, Job.state).where(Job.series_instance_uid == series_uid)).all())
        jobs = sorted(states)
        running = any(state in ("queued", "running") for state in states.values())
        if (row is not None and row.state != "receiving" and not running) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    refused = row is not None and row.state == "ignored" and not jobs and row.reason_code == interlock.code
    what = ("never recorded" if row is None else f"{row.state}, job {jobs[0]}" if jobs else f"{row.state}: {row.reason or ''}")
    said = {"contrast": interlock.what} if interlock.code == "contrast" else {}
    return {"series": interlock.what, **said, "series_uid": series_uid, "refused": refused, "node_said": what[:300]}


def run_qa(settings: Settings, node: str, calling_ae: str, *, seed: int = 424_242, slices: int = 16, size: int = 256,
           pixel_spacing: float = 1.0, slice_spacing: float = 4.0, timeout: float = 900.0, keep: bool = False,
           max_mae_hu: float | None = None, tls: bool = False, say: Callable[[str], None] = lambda _: None,
           sessions: Any = None) -> dict[str, Any]:
    """One QA run (see the module's doc); the figures, with ``passed`` against ``max_mae_hu``. With
    the node's database (``sessions``), the contrast interlock too: a small series of a contrast the
    node does not select goes in the same association, and the run passes only if the node left it
    unsynthesized (``contrast_interlock``; as a linac's interlocks are checked each morning)."""
    from dicom_node.registry import node_selection
    from training.phantom_dicom import write_mr_series

    password = settings.orthanc_password.get_secret_value() if settings.orthanc_password else None
    store = OrthancStore(settings.orthanc_url, settings.orthanc_username, password, settings.orthanc_timeout_seconds)
    store.check_reachable()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mr2ct-qa-") as folder:
        phantom = write_mr_series(Path(folder), seed=seed, slices=slices, size=size, pixel_spacing=pixel_spacing,
                                  slice_spacing=slice_spacing, patient_name=QA_PATIENT_NAME, patient_id=QA_PATIENT_ID,
                                  series_description=QA_DESCRIPTION, uid_key=f"-qa-{time.time_ns()}")
        first = pydicom.dcmread(phantom.files[0], stop_before_pixels=True)
        row, column = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
        normal = np.cross(row, column)
        positions = [np.asarray(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient, float) for p in phantom.files]
        checks, unchecked = interlocks(node_selection(settings, sessions)()) if sessions is not None else ([], {})
        written = [(check, _write_interlock(Path(folder) / check.key, check, seed)) for check in checks]
        files = phantom.files + [f for _check, series in written for f in series.files]
        say(f"sending the QA phantom ({slices} slices, {size}x{size} at {pixel_spacing:g} mm)"
            + (f" and interlock series ({', '.join(check.what for check in checks)})" if checks else "") + f" to {node} as {calling_ae}")
        if tls:
            from dicom_node.service import client_tls_context

            send(files, node, calling_ae, ssl_context=client_tls_context(settings))
        else:
            send(files, node, calling_ae)
    say("waiting for its sCT in Orthanc")
    series_id, instance_ids = wait_for_sct(store, phantom.study_uid, slices, timeout)
    sct = _sct_volume(store, instance_ids, positions, normal, slice_spacing)
    result = score(sct, phantom.ct_hu, phantom.labels)
    ct_uid = str(store.client.get(f"series/{series_id}").json().get("MainDicomTags", {}).get("SeriesInstanceUID", ""))
    for check, series in written:
        result[check.key] = check_interlock(sessions, series.series_uid, check, settings.stable_seconds * 3 + 60)
    result.update({key: {"refused": None, "node_said": why} for key, why in unchecked.items()})
    interlock_held = all(result[key].get("refused") is not False for key in INTERLOCK_KEYS if key in result)
    result.update(seconds=round(time.perf_counter() - started, 1), slices=slices, study_uid=phantom.study_uid, ct_series_uid=ct_uid,
                  node=node, max_mae_hu=max_mae_hu, passed=(max_mae_hu is None or result["mae_hu"] <= max_mae_hu) and interlock_held)
    if not keep:  # the QA study, and the interlock's where anything of it reached Orthanc (routed, or wrongly synthesized)
        for study_uid in [phantom.study_uid] + [series.study_uid for _check, series in written]:
            study_id = store.study_id(study_uid)
            if study_id is not None:
                store.client.delete(f"studies/{study_id}")
    return result
