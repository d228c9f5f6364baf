"""What happens to a received instance: validate, spool durably, record. No networking here."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage
from sqlalchemy import delete, distinct, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import notify_job_queued
from dicom_node.models import Instance, Job, RefusedInstance, Series, utcnow
from dicom_node.recorder import Recorder, SpooledInstance, record_batch
from dicom_node.spool import Spool, SpoolFull, require_uid
from synthesis.card import selection_learned
from synthesis.contrast import (CHOICES, DEFAULT_BODY_PARTS, DEFAULT_CHOICE, DEFAULT_SELECTED, UNKNOWN, WITH, parts_named,
                                series_body_part, series_headers)
from synthesis.errors import InvalidInstance, SeriesNotUsable
from synthesis.image_type import NOT_ANATOMY, NOT_ANATOMY_COMPONENTS, WHAT, component, component_kind, not_anatomy, values
from synthesis.volume import frame_geometry, orientation_label

log = logging.getLogger(__name__)

SUPPORTED_SOP_CLASSES = {
    MRImageStorage: "MR Image Storage",
    EnhancedMRImageStorage: "Enhanced MR Image Storage",
    LegacyConvertedEnhancedMRImageStorage: "Legacy Converted Enhanced MR Image Storage",
}


class DatasetMismatch(InvalidInstance):
    """The data set does not match its SOP class (DICOM status 0xA900)."""


@dataclass(frozen=True)
class ReceivedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str = ""
    orientation: str = ""
    patient_id: str = ""
    image_type: str = ""  # ImageType as sent, values joined by backslashes, upper case
    position: str = ""  # a single-frame image's ImagePositionPatient to 0.01 mm, '' for multi-frame
    frames: int = 1  # a multi-frame one's frames, and the positions they lie at
    frame_positions: int = 1
    frame_set: str | None = None  # a digest of those positions (multi-frame only)
    component: str = ""  # the pixels' complex component where the instance says (synthesis.image_type.component)
    component_source: str = ""  # what said it
    contrast: str = ""  # an MR image's contrast (synthesis.contrast: T1, T2, FLUID_ATTENUATED...), and what told it
    contrast_source: str = ""
    body_part: str = ""  # BodyPartExamined as sent, upper case ('' when absent)
    contrast_agent: str = ""  # WITH or WITHOUT (synthesis.contrast.contrast_agent), and what told it
    contrast_agent_source: str = ""
    fat_suppression: str = ""  # WITH or WITHOUT (synthesis.contrast.fat_suppression), and what told it
    fat_suppression_source: str = ""


# Why a series was not synthesized, as a code beside the reason's words (Series.reason_code; GET /series?reason_code=,
# /metrics mr2ct_series_ignored_by_reason): the settings' rules in the order they are tried, then the node's own
REASON_CODES: dict[str, str] = {
    "modality": "select_modalities",
    "planes": "its slices lie in several planes (a localizer)",
    "positions": "several images at one position (diffusion, echoes, time points)",
    "image_type": "select_image_type_exclude (phase, maps, derived, Dixon, ...)",
    "component": "select_complex_component_exclude",
    "contrast": "select_acquisition_contrasts",
    "contrast_agent": "select_contrast_agent",
    "fat_suppression": "select_fat_suppression",
    "body_part": "select_body_parts",
    "description": "select_description_include / select_description_exclude",
    "min_slices": "select_min_slices",
    "orientation": "select_orientations",
    "refused_instances": "an instance of it was refused (a gap in the sCT)",
    "synthesize_refused": "POST /synthesize refused part way",
}


# The codes of the rules a site may change (the settings', or a followed model's card): a series one
# of them kept out may be judged again (``rejudge``); what no rule change alters (several planes or
# images at one position), a series waiting for refused instances, and part of one a POST /synthesize
# spooled before it was refused are not.
REJUDGED: tuple[str, ...] = tuple(code for code in REASON_CODES
                                  if code not in ("planes", "positions", "refused_instances", "synthesize_refused"))


class Skip(NamedTuple):
    """A rule a series fails: its code (``REASON_CODES``) and the reason, in words."""

    code: str
    reason: str


@dataclass(frozen=True)
class SelectionRules:
    """Which complete series are synthesized; the first rule that fails is the recorded reason."""

    modalities: tuple[str, ...] = ("MR",)
    description_include: str | None = None
    description_exclude: str | None = None
    min_slices: int = 1
    orientations: tuple[str, ...] = ("axial", "sagittal", "coronal", "oblique")
    image_types_excluded: tuple[str, ...] = NOT_ANATOMY
    components_excluded: tuple[str, ...] = NOT_ANATOMY_COMPONENTS
    contrasts: tuple[str, ...] = DEFAULT_SELECTED  # empty: any contrast
    body_parts: tuple[str, ...] = DEFAULT_BODY_PARTS  # BodyPartExamined values; UNKNOWN: none given; empty: any
    contrast_agent: str = DEFAULT_CHOICE  # a key of synthesis.contrast.CHOICES: without, with or any
    fat_suppression: str = DEFAULT_CHOICE  # the same
    follows: str = ""  # the model whose card the rules of ``followed`` were taken from (select_follow_model), in words
    followed: frozenset[str] = frozenset()  # those settings' names

    @classmethod
    def from_settings(cls, s: Any) -> SelectionRules:
        """The rules of a node's settings (``dicom_node.settings.Settings``' select_*)."""
        return cls(
            modalities=tuple(s.select_modalities), description_include=s.select_description_include,
            description_exclude=s.select_description_exclude, min_slices=s.select_min_slices, orientations=tuple(s.select_orientations),
            image_types_excluded=tuple(s.select_image_type_exclude), components_excluded=tuple(s.select_complex_component_exclude),
            contrasts=tuple(s.select_acquisition_contrasts), body_parts=tuple(s.select_body_parts),
            contrast_agent=s.select_contrast_agent, fat_suppression=s.select_fat_suppression,
        )

    def following(self, card: dict[str, Any], model: str) -> SelectionRules:
        """These rules with those the card of ``model`` (in words, for the reasons) speaks of taken
        from it (``synthesis.card.selection_learned``): its MR contrasts, contrast agent, fat
        suppression and body parts. UNKNOWN stays as these rules have it (listed, or any)."""
        taken = {k: v for k, v in selection_learned(card).items() if v is not None}
        changes: dict[str, Any] = {}
        if "select_acquisition_contrasts" in taken:
            vouched = (UNKNOWN,) if not self.contrasts or UNKNOWN in self.contrasts else ()
            changes["contrasts"] = (*taken["select_acquisition_contrasts"], *vouched)
        if "select_body_parts" in taken:
            vouched = (UNKNOWN,) if not self.body_parts or UNKNOWN in self.body_parts else ()
            changes["body_parts"] = (*taken["select_body_parts"], *vouched)
        for setting in ("select_contrast_agent", "select_fat_suppression"):
            if setting in taken:
                changes[setting.removeprefix("select_")] = taken[setting]
        return replace(self, **changes, follows=model, followed=frozenset(taken))

    def said_by(self, setting: str, what: str = "") -> str:
        """Who set the rule of ``setting``, in words: the setting, or the followed model's card (with
        ``what``, as what that model learned, for a series' reason)."""
        if setting not in self.followed:
            return setting
        return f"the {what} {self.follows} learned (select_follow_model)" if what else f"the card of {self.follows} (select_follow_model)"

    def reason_to_skip(self, series: Series, planes: Sequence[str] = (), positions: tuple[int, int] = (0, 0)) -> str | None:
        """Why ``series`` is not synthesized (the first rule it fails, see ``skip``), None when it passes."""
        found = self.skip(series, planes, positions)
        return found.reason if found is not None else None

    def skip(self, series: Series, planes: Sequence[str] = (), positions: tuple[int, int] = (0, 0)) -> Skip | None:
        """The first rule ``series`` fails, with its code (``REASON_CODES``), None when it passes.
        ``planes``: those its instances lie in; ``positions``: how many images (single frames, and the
        frames of multi-frame instances) it has, at how many positions."""
        if series.modality not in self.modalities:
            return Skip("modality", f"modality {series.modality!r} is not one of {list(self.modalities)}")
        if len(planes) > 1:
            return Skip("planes", f"its slices lie in {len(planes)} planes ({', '.join(sorted(planes))}): a multi-plane localizer, "
                        "or stacks of several planes in one series; no one volume to synthesize")
        images, at = positions
        if images > at:
            return Skip("positions", f"its {images} images lie at {at} position{'s' * (at != 1)}: several at one position (diffusion "
                        "b-values, echoes, time points or repeats in one series); no one volume to synthesize")
        excluded = [v for v in values(series.image_type) if v in self.image_types_excluded]
        if excluded:
            told = not_anatomy([excluded[0]])
            return Skip("image_type", f"ImageType {series.image_type!r} holds {excluded[0]}, excluded by select_image_type_exclude"
                        + (f" ({WHAT[told[0]]})" if told else ""))
        if series.component and series.component in self.components_excluded:
            told = component_kind((series.component, series.component_source))
            return Skip("component", f"{series.component_source or 'its complex component'} says {series.component}, excluded by "
                        "select_complex_component_exclude" + (f" ({WHAT[told[0]]})" if told else ""))
        if self.contrasts and series.contrast and series.contrast not in self.contrasts:
            hint = " (list UNKNOWN in select_acquisition_contrasts to synthesize series whose header does not tell)" if series.contrast == UNKNOWN else ""
            return Skip("contrast", f"its MR contrast is {series.contrast} ({series.contrast_source}), not one of "
                        f"{self.said_by('select_acquisition_contrasts', 'MR contrasts')} {list(self.contrasts)}{hint}")
        for code, told, source, chosen, said in (
                ("contrast_agent", series.contrast_agent, series.contrast_agent_source, self.contrast_agent,
                 ("a contrast agent was given", "no contrast agent was given")),
                ("fat_suppression", series.fat_suppression, series.fat_suppression_source, self.fat_suppression,
                 ("fat was suppressed", "fat was not suppressed"))):
            if told and told not in CHOICES[chosen]:  # '' : recorded before it was read (migrations 0025, 0026)
                by = f"select_{code} is {chosen!r}" if f"select_{code}" not in self.followed else \
                    f"{self.follows} learned {' and '.join(a.lower() for a in CHOICES[chosen])} only (select_follow_model)"
                return Skip(code, f"its header says {said[0] if told == WITH else said[1]} ({source}), and {by}")
        parts = parts_named(series.body_part or "")  # every instance's, recorder.heed
        outside = [p for p in parts if p not in self.body_parts]
        if self.body_parts and outside:
            said_by = f"{self.said_by('select_body_parts', 'body parts')} {list(self.body_parts)}"
            if len(parts) == 1:
                return Skip("body_part", f"BodyPartExamined {'is not given' if parts == (UNKNOWN,) else repr(parts[0])}, not one of {said_by}")
            return Skip("body_part", f"its instances name BodyPartExamined {' and '.join(map(repr, parts))}; "
                        f"{' and '.join(map(repr, outside))} not one of {said_by}")
        description = series.series_description or ""
        if self.description_include and not re.search(self.description_include, description, re.IGNORECASE):
            return Skip("description", f"series description {description!r} does not match {self.description_include!r}")
        if self.description_exclude and re.search(self.description_exclude, description, re.IGNORECASE):
            return Skip("description", f"series description {description!r} matches the exclusion {self.description_exclude!r}")
        if series.instance_count < self.min_slices:
            return Skip("min_slices", f"{series.instance_count} instances, fewer than the {self.min_slices} required")
        if series.orientation and series.orientation not in self.orientations:
            return Skip("orientation", f"orientation {series.orientation} is not one of {list(self.orientations)}")
        return None


MAX_SEQUENCE_DEPTH = 16
MAX_GEOMETRY_VALUE = 1e6  # mm for positions: a kilometre; no spacing, cosine or rescale value comes near it either


def check_nesting(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> None:
    """Refuse sequences nested deeper than any real MR needs (a cheap denial-of-service guard).

    Only sequences are decoded: other elements stay raw, so the check costs little per instance.
    An element is a sequence when its explicit VR says so, when the dictionary says so (implicit
    VR), or when it has an undefined length (how pydicom reads an unknown sequence).
    """
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for raw in list(current.values()):  # raw elements, not converted
            tag, vr = raw.tag, raw.VR
            if vr is None:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = "UN"
            if vr != "SQ" and not (getattr(raw, "length", 0) == 0xFFFFFFFF and tag != 0x7FE00010):
                continue
            element = current[tag]
            if element.VR != "SQ":
                continue
            if depth + 1 > limit:
                raise DatasetMismatch(f"sequences nested deeper than {limit} levels")
            stack.extend((item, depth + 1) for item in element.value)


class _Values:
    """The few values validation needs, read straight from the raw elements.

    pydicom converts an element in about 10 µs; validation reads some twenty of them for every
    C-STORE, so on the hot path the text (UI, CS, DS, IS) and US values are decoded here.
    Elements pydicom already converted (data sets built in memory) are taken as they are.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.little_endian = ds.original_encoding[1] is not False

    def text(self, tag: int) -> str | None:
        if tag not in self.ds:
            return None
        element = self.ds.get_item(tag)
        value = element.value
        if isinstance(element, RawDataElement):
            return None if value is None else value.decode("latin-1").strip(" \x00")
        if value is None:
            return None
        return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)

    def numbers(self, tag: int, count: int, name: str) -> tuple[float, ...]:
        text = self.text(tag)
        try:
            numbers = tuple(float(part) for part in text.split("\\")) if text else ()
        except ValueError:
            numbers = ()
        if len(numbers) != count:
            raise DatasetMismatch(f"geometry missing or unusable: no usable {name} (needs {count} numbers)")
        # NaN, infinity or a kilometre: no image lies there. Until 2026-12-07 taken (and on PostgreSQL a
        # position too long for its column held back the rows of every instance received after it).
        if not all(math.isfinite(v) and abs(v) < MAX_GEOMETRY_VALUE for v in numbers):
            raise DatasetMismatch(f"geometry missing or unusable: {name} {text[:80]!r} holds a value that is not finite or beyond "
                                  f"{MAX_GEOMETRY_VALUE:g}")
        return numbers

    def unsigned(self, tag: int, name: str) -> int:
        if tag in self.ds:
            element = self.ds.get_item(tag)
            value = element.value
            if isinstance(element, RawDataElement) and isinstance(value, bytes) and len(value) == 2:
                return int.from_bytes(value, "little" if self.little_endian else "big")
            if isinstance(value, int):
                return value
        raise DatasetMismatch(f"{name} is missing; the node needs it to build a volume")


def validate(
    ds: Dataset, affected_sop_class: str, affected_sop_instance: str, forward_only: frozenset[str] = frozenset(),
    transfer_syntax: str | None = None,
) -> ReceivedInstance:
    """Check what must hold before an instance is accepted; raise ``InvalidInstance`` saying why not.

    ``forward_only``: other SOP classes accepted only to be routed to Orthanc (never synthesized);
    they need well-formed UIDs, not MR geometry. ``transfer_syntax``: how the data set was
    encoded (default: its file meta's).
    """
    sop_class = require_uid(affected_sop_class, "Affected SOP Class UID")
    sop_uid = require_uid(affected_sop_instance, "Affected SOP Instance UID")
    if sop_class not in SUPPORTED_SOP_CLASSES and sop_class not in forward_only:
        raise DatasetMismatch(f"SOP class {sop_class} is not accepted by this node")
    values = _Values(ds)
    if values.text(0x00080016) != sop_class:
        raise DatasetMismatch(f"SOPClassUID in the data set ({values.text(0x00080016)!r}) differs from the request ({sop_class})")
    if values.text(0x00080018) != sop_uid:
        raise DatasetMismatch("SOPInstanceUID in the data set differs from the C-STORE request")
    study_uid = require_uid(values.text(0x0020000D), "StudyInstanceUID")
    series_uid = require_uid(values.text(0x0020000E), "SeriesInstanceUID")
    modality = (values.text(0x00080060) or "")[:16]  # CS: at most 16 characters (the column's size)
    # Free text may use another character set: pydicom decodes these two.
    description = str(ds.get("SeriesDescription", "") or "")[:64]
    patient_id = str(ds.get("PatientID", "") or "")[:64]
    if sop_class not in SUPPORTED_SOP_CLASSES:
        check_nesting(ds)
        return ReceivedInstance(sop_class, sop_uid, study_uid, series_uid, modality, description, "", patient_id)
    image_type = (values.text(0x00080008) or "").upper()[:64]
    if 0x7FE00010 not in ds:
        raise DatasetMismatch("the instance has no Pixel Data")
    rows, cols = values.unsigned(0x00280010, "Rows"), values.unsigned(0x00280011, "Columns")
    bits = values.unsigned(0x00280100, "BitsAllocated")
    try:
        frames = int(values.text(0x00280008) or 1)
    except ValueError:
        raise DatasetMismatch(f"NumberOfFrames {values.text(0x00280008)!r} is not a number") from None
    position, frame_positions, frame_set = "", 1, None  # a multi-frame instance's frames: counted, with the positions they lie at
    if frames != 1 or 0x52009230 in ds:  # enhanced multi-frame: per-frame functional groups
        try:
            geometry = frame_geometry(ds)
        except (SeriesNotUsable, ValueError) as exc:  # ValueError: a functional group's value that is not a number
            raise DatasetMismatch(f"geometry missing or unusable: {exc}") from None
        for index, frame in enumerate(geometry):  # as for a single frame's (numbers): no image lies at NaN or a kilometre away
            if not all(math.isfinite(v) and abs(v) < MAX_GEOMETRY_VALUE for v in (*frame.position, *frame.orientation,
                                                                                   *frame.pixel_spacing, *frame.rescale)):
                raise DatasetMismatch(f"geometry missing or unusable: frame {index + 1}'s position, orientation, pixel spacing or "
                                      f"rescale holds a value that is not finite or beyond {MAX_GEOMETRY_VALUE:g}")
        orientation = geometry[0].orientation
        at = sorted({"\\".join(f"{v:.2f}" for v in g.position) for g in geometry})
        frame_positions, frame_set = len(at), hashlib.sha256("|".join(at).encode()).hexdigest()[:16]
    else:
        position = "\\".join(f"{v:.2f}" for v in values.numbers(0x00200032, 3, "ImagePositionPatient"))
        values.numbers(0x00280030, 2, "PixelSpacing")
        orientation = values.numbers(0x00200037, 6, "ImageOrientationPatient")  # type: ignore[assignment]
        for tag, name in ((0x00281053, "RescaleSlope"), (0x00281052, "RescaleIntercept")):
            if values.text(tag):
                values.numbers(tag, 1, name)
    if not (0 < rows <= 8192 and 0 < cols <= 8192) or bits not in (8, 16, 32):
        raise DatasetMismatch(f"implausible image size {rows}x{cols} with {bits} bits allocated")
    pixel_element = ds.get_item(0x7FE00010)
    declared = getattr(pixel_element, "length", None)
    value = getattr(pixel_element, "value", None)
    if declared is not None and declared != 0xFFFFFFFF and value is not None and len(value) != declared:
        raise DatasetMismatch(f"Pixel Data declares {declared} bytes but the data set holds {len(value)}")
    if not UID(transfer_syntax or ds.file_meta.TransferSyntaxUID).is_compressed:
        samples = values.unsigned(0x00280002, "SamplesPerPixel") if 0x00280002 in ds else 1
        expected = rows * cols * frames * samples * bits // 8
        actual = len(value) if isinstance(value, bytes) else len(ds.PixelData)
        if actual < expected:
            raise DatasetMismatch(f"Pixel Data holds {actual} bytes, {rows}x{cols}x{frames} at {bits} bits needs {expected}")
    check_nesting(ds)  # after the Pixel Data checks, which need the raw (unconverted) element
    told = component(ds) or ("", "")
    return ReceivedInstance(sop_class, sop_uid, study_uid, series_uid, modality, description, orientation_label(orientation), patient_id,
                            image_type, position, frames, frame_positions, frame_set, told[0], told[1][:80], **header_facts([ds]))


def header_facts(headers: Sequence[Dataset]) -> dict[str, str]:
    """What headers say that the selection judges a series by, as ``ReceivedInstance`` and ``Series``
    hold it: the MR contrast, contrast agent and fat suppression, each with what told it, and the
    BodyPartExamined ('' when none is given). One instance's as received (``recorder.heed`` folds them
    as its series' instances arrive), or a series' read again (``synthesis.contrast.series_headers``
    and ``series_body_part``, the same fold)."""
    part = series_body_part(headers)
    facts = {"body_part": "" if part == UNKNOWN else part}
    for field, (told, source) in series_headers(headers).items():
        facts[field], facts[f"{field}_source"] = told, source[:160]
    return facts


def refresh_headers(sessions: sessionmaker[Session], series_uid: str) -> bool:
    """Read again what a series' instances' headers say (``synthesis.contrast.series_headers`` and
    ``series_body_part``, the fold ``recorder.heed`` makes as they arrive, over them in the order
    they were received) where an instance was sent again or moved away since
    (``Series.headers_stale``): a series whose later slices named NECK, sent again with HEAD in them,
    is a head again, and one whose agent was entered by mistake unenhanced. Until 2026-12-06 such a
    series stayed as first told. Read outside any transaction, from the spooled files; kept as
    folded (and logged) where a file cannot be read or retention deleted one, and dropped where an
    instance arrived meanwhile (it is read at the next completion). True when the series' answers
    were read again."""
    with sessions() as session:
        series = session.get(Series, series_uid)
        if series is None or not series.headers_stale:
            return False
        received = series.last_received_at
        rows = session.execute(select(Instance.path, Instance.purged_at).where(
            Instance.series_instance_uid == series_uid, Instance.set_aside.is_(None)).order_by(
            Instance.received_at, Instance.sop_instance_uid)).all()
    if any(row.purged_at is not None for row in rows):
        log.info("series=%s: its headers not read again: spool retention deleted some of its originals", series_uid)
        return False
    try:
        headers = [dcmread(row.path, stop_before_pixels=True) for row in rows]
    except Exception as exc:  # noqa: BLE001 (unreadable now: judged as folded when received)
        log.warning("series=%s: its headers not read again (%s: %s)", series_uid, type(exc).__name__, str(exc)[:200])
        return False
    said = header_facts(headers) if headers else {}  # none left (all moved away): nothing to say
    with sessions.begin() as session:
        return bool(session.execute(update(Series).where(
            Series.series_instance_uid == series_uid, Series.last_received_at == received, Series.headers_stale.is_(True)).values(
            headers_stale=False, **said)).rowcount)


class Ingest:
    """Spools and records instances; shared by all SCP association threads.

    With a ``Recorder`` the database rows are group-committed behind the spool; without one
    (the API's one-off imports) each instance is recorded before ``store`` returns.
    """

    def __init__(self, spool: Spool, sessions: sessionmaker[Session], recorder: Recorder | None = None) -> None:
        self.spool = spool
        self.sessions = sessions
        self.recorder = recorder

    def store(
        self, info: ReceivedInstance, data: bytes | Sequence[bytes], transfer_syntax: str, calling_ae: str, association_id: int | None,
    ) -> Path:
        """Spool a validated instance durably, then record it: group-committed behind the spool
        with a recorder, at once without."""
        if self.recorder is not None and self.recorder.backlog >= self.recorder.max_backlog:
            raise SpoolFull(f"the database is {self.recorder.backlog} rows behind the spool; refusing until it catches up")
        path = self.spool.write(info.study_uid, info.series_uid, info.sop_instance_uid, data)
        size = len(data) if isinstance(data, bytes) else sum(len(chunk) for chunk in data)
        item = SpooledInstance(info, path, size, transfer_syntax, calling_ae, association_id, utcnow())
        if self.recorder is not None:
            self.recorder.submit(item)
        else:
            record_batch(self.sessions, [item])
        return path

    def flush(self, timeout: float = 120.0) -> bool:
        return self.recorder.flush(timeout) if self.recorder is not None else True


def stable_series(sessions: sessionmaker[Session], stable_seconds: float) -> list[str]:
    """Series that received nothing for ``stable_seconds``."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    with sessions() as session:
        rows = session.scalars(
            select(Series.series_instance_uid).where(Series.state == "receiving", Series.last_received_at < cutoff)
        ).all()
    return list(rows)


def record_refusal(session: Session, sop_uid: str, series_uid: str, status: int, reason: str, at: datetime | None = None) -> None:
    """Keep an instance the SCP refused until the same SOP Instance UID is stored (its series is
    held meanwhile, see mark_stable); in the transaction of the refusal's audit row, so that no
    crash leaves a refusal audited and its series synthesized with the gap. ``at``: when it was
    refused (now, unless written later from the journal, ``dicom_node.deferred``)."""
    session.merge(RefusedInstance(sop_instance_uid=sop_uid, series_instance_uid=series_uid, status=f"0x{status:04X}",
                                  reason=reason[:500], refused_at=at or utcnow()))


def set_aside_all_but(sessions: sessionmaker[Session], series_uid: str, held: set[str], reason: str) -> int:
    """Set aside the instances of a series the node holds that are not among ``held`` (what Orthanc
    holds of it, when an administrator asked for the series as Orthanc holds it): they are no part
    of its sCT until they are sent again. How many."""
    with sessions.begin() as session:
        series = session.get(Series, series_uid, with_for_update=True)
        if series is None:
            return 0
        rows = session.scalars(select(Instance).where(Instance.series_instance_uid == series_uid, Instance.set_aside.is_(None))).all()
        extra = [row for row in rows if row.sop_instance_uid not in held]
        for row in extra:
            row.set_aside = reason[:500]
        series.instance_count = max(0, series.instance_count - len(extra))
        return len(extra)


def lift_refusals(sessions: sessionmaker[Session], series_uid: str) -> int:
    """Forget the refusals a series waits for (someone asked for it as it is); how many there were."""
    with sessions.begin() as session:
        return session.execute(delete(RefusedInstance).where(RefusedInstance.series_instance_uid == series_uid)).rowcount or 0


def _refusals(session: Session, series: Series) -> str | None:
    """Why a series is not synthesized from what arrived: instances of it refused and not stored since."""
    refused = session.scalars(select(RefusedInstance).where(RefusedInstance.series_instance_uid == series.series_instance_uid)
                              .order_by(RefusedInstance.refused_at)).all()
    if not refused:
        return None
    first = refused[0]
    return (f"{len(refused)} instance(s) of the series refused ({first.status}: {first.reason[:200]}); not synthesized from the "
            f"{series.instance_count} stored, which would leave a gap in the sCT: send the refused instances, or the series, again "
            f"once mended, or ask for the series as Orthanc holds it (POST /synthesize)")


def judge(session: Session, series: Series, rules: SelectionRules) -> Skip | None:
    """The first rule ``series`` fails as it stands in the database (its instances' planes and
    positions counted, refused instances awaited), None when a job would be made of it."""
    counted = (Instance.series_instance_uid == series.series_instance_uid, Instance.set_aside.is_(None))
    planes = session.scalars(select(Instance.orientation).distinct().where(*counted, Instance.orientation != "")).all()
    # images: every frame (a single-frame row counts 1); positions: the single frames' distinct
    # ones, and those of each distinct set of positions of multi-frame instances (position ''):
    # two instances at the same positions (an echo each) count their positions once
    frame_sets = select(func.coalesce(Instance.frame_set, Instance.sop_instance_uid).label("key"),
                        Instance.frame_positions).distinct().where(*counted, Instance.position == "").subquery()
    images, positions, frame_positions = session.execute(select(
        func.coalesce(func.sum(Instance.frames), 0), func.count(distinct(func.nullif(Instance.position, ""))),
        select(func.coalesce(func.sum(frame_sets.c.frame_positions), 0)).scalar_subquery()).where(*counted)).one()
    skip = rules.skip(series, planes, (images, positions + frame_positions))
    if skip is None:
        waits = _refusals(session, series)
        skip = Skip("refused_instances", waits) if waits is not None else None
    return skip


def mark_stable(
    sessions: sessionmaker[Session], series_uid: str, stable_seconds: float, rules: SelectionRules | None = None,
    from_state: str = "receiving",
) -> tuple[str, int | None]:
    """Turn a quiet series into a job or mark it ignored with the reason. Returns (state, job id);
    ``from_state`` when it was not in that state (taken meanwhile, or receiving again).

    ``stable_seconds=0`` completes the series now (complete_on_release). ``from_state="ignored"``
    judges a series set aside again (``rejudge``).
    """
    rules = rules or SelectionRules()
    refresh_headers(sessions, series_uid)  # an instance sent again since its headers were read: read them again
    conditions = [Series.series_instance_uid == series_uid, Series.state == from_state]
    if stable_seconds > 0:
        conditions.append(Series.last_received_at < utcnow() - timedelta(seconds=stable_seconds))
    with sessions.begin() as session:
        claimed = session.execute(update(Series).where(*conditions).values(state="stable", reason=None, reason_code="")).rowcount
        if not claimed:
            return from_state, None
        series = session.get(Series, series_uid)
        assert series is not None
        skip = judge(session, series, rules)
        if skip is not None:
            series.state, series.reason, series.reason_code, series.outcome_due = "ignored", skip.reason, skip.code, True
            return "ignored", None
        series.outcome_due = True  # its note in Orthanc: queued (dicom_node.outcomes)
        job = Job(series_instance_uid=series_uid, state="queued", instance_count=series.instance_count)
        session.add(job)
        session.flush()
        notify_job_queued(session)
        return "stable", job.id
