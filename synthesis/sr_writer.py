"""The provenance SR (Comprehensive 3D SR, built with highdicom) and its reader.

The report names mr2ct as the observing device, identifies the algorithm
(name, version, model SHA-256, architecture, training run, normalisation, N4),
references every source MR instance and every derived CT instance, and records
when, how long and on which device the sCT was made. ``read_provenance`` parses
it back into the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pydicom.valuerep import DT

import synthesis
from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from synthesis.ct_writer import (
    MANUFACTURER, TYPE2_KEYWORDS, UID_SCHEME, SyntheticCTSeries, contributing_equipment, copy_patient_and_study, copy_timezone, date_time, local_now,
)
from synthesis.contrast import parts_named, series_body_part, series_headers
from synthesis.infer import GUIDE_EPS, GUIDE_RADIUS
from synthesis.uids import derived_uid

# Standard DCM concepts only (no private coding scheme for validators to flag).
DERIVED_IMAGE = codes.DCM.Derivation  # 121401: an IMAGE item naming each derived CT instance
DERIVED_SERIES = codes.DCM.SeriesInstanceUID  # 112002: the derived CT series
PROCESSING_SECONDS = codes.DCM.DurationOfTimePeriod  # 130532
COMPUTE_DEVICE = codes.DCM.DeviceDescription  # 120999
ALGORITHM_NAME = "mr2ct CycleGAN MR-to-CT generator"


@dataclass(frozen=True)
class Provenance:
    """The facts an SR records; what ``read_provenance`` returns."""

    algorithm_name: str
    algorithm_version: str
    parameters: dict[str, str]
    source_series_uid: str
    source_instance_uids: list[str]
    derived_series_uid: str
    derived_instance_uids: list[str]
    processing_seconds: float
    compute_device: str
    processed_at: str
    observer_uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def model_parameters(card: dict[str, Any]) -> dict[str, str]:
    training = card.get("training", {})
    norm = card.get("normalization", {})
    return {
        "model_sha256": str(card["sha256"]),
        "architecture": str(card["architecture"]),
        "architecture_parameters": ",".join(f"{k}={v}" for k, v in sorted(card.get("parameters", {}).items())),
        "training_run": str(card.get("name", "")),
        "training_command": str(training.get("command", ""))[:200],
        "normalization": f"{norm.get('method', '?')}:{norm.get('low', '?')}-{norm.get('high', '?')}",
        "n4_bias_correction": "on" if card.get("n4_bias_correction") else "off",
        "test_time_augmentation": str(card.get("test_time_augmentation", "none")),
        "hu_range": ",".join(str(v) for v in card.get("hu_range", [])),
        "model_mr_contrasts": ",".join(card.get("mr_contrasts") or []) or "not stated by its card",
        "model_mr_contrast_agents": ",".join(card.get("mr_contrast_agents") or []) or "not stated by its card",
        "model_mr_fat_suppression": ",".join(card.get("mr_fat_suppression") or []) or "not stated by its card",
        "model_mr_body_parts": ",".join(card.get("mr_body_parts") or []) or "not stated by its card",
        "model_grid_mm": str(card.get("pixel_spacing_mm", "")),
        "back_to_mr_matrix": f"guided upsampling (radius {GUIDE_RADIUS}, eps {GUIDE_EPS}) from a coarser grid, else bilinear",
    }


def build_provenance_sr(
    *, ct: SyntheticCTSeries, mr_headers: list[Dataset], uid_root: str, processing_seconds: float, device_label: str
) -> Dataset:
    """Build the SR for one synthesized series; raises ValueError/TypeError on bad arguments."""
    if not isinstance(ct, SyntheticCTSeries):
        raise TypeError(f"ct must be a SyntheticCTSeries, got {type(ct).__name__}")
    if not mr_headers:
        raise ValueError("mr_headers must name at least one source MR instance")
    if processing_seconds < 0:
        raise ValueError(f"processing_seconds must be >= 0, got {processing_seconds}")
    model = ct.model
    src_series = ct.source.series_instance_uid
    observer_uid = derived_uid(uid_root, "mr2ct-device", synthesis.__version__)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=observer_uid, name="mr2ct", manufacturer_name=MANUFACTURER, model_name=f"mr2ct {synthesis.__version__}",
        ),
    )
    said = series_headers(mr_headers)  # every instance's header, as the node judged the series
    (told, why), (agent, agent_why), (fat, fat_why) = said["contrast"], said["contrast_agent"], said["fat_suppression"]
    # what a physicist checks against model_mr_contrasts, model_mr_contrast_agents and model_mr_fat_suppression
    params = {**model_parameters(model.card), "slice_plane": ct.plane, "source_mr_contrast": f"{told} ({why})",
              "source_mr_contrast_agent": f"{agent} ({agent_why})", "source_mr_fat_suppression": f"{fat} ({fat_why})",
              "source_mr_body_part": ",".join(parts_named(series_body_part(mr_headers)))}  # and model_mr_body_parts
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=synthesis.__version__, parameters=[f"{k}={v}" for k, v in params.items()]
    )
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImageProcessing, template_id=None)
    items: list[Any] = []
    items.extend(observer)
    for item in algorithm:
        item.RelationshipType = "HAS CONCEPT MOD"
        items.append(item)
    processed = local_now(mr_headers[0]).replace(microsecond=0)  # with its offset from UTC
    items.append(hd.sr.DateTimeContentItem(name=codes.DCM.DatetimeOfProcessing, value=DT(date_time(processed)), relationship_type="CONTAINS"))
    items.append(hd.sr.TextContentItem(name=COMPUTE_DEVICE, value=device_label[:64], relationship_type="CONTAINS"))
    items.append(
        hd.sr.NumContentItem(
            name=PROCESSING_SECONDS, value=round(float(processing_seconds), 3), unit=hd.sr.CodedConcept("s", "UCUM", "second"),
            relationship_type="CONTAINS",
        )
    )
    items.append(hd.sr.UIDRefContentItem(name=codes.DCM.SourceSeriesForImageProcessingOperation, value=src_series, relationship_type="CONTAINS"))
    seen: set[str] = set()
    for mr in mr_headers:  # a multi-frame instance is referenced once, for the whole instance
        if mr.SOPInstanceUID in seen:
            continue
        seen.add(mr.SOPInstanceUID)
        items.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.SourceImageForImageProcessingOperation, referenced_sop_class_uid=mr.SOPClassUID,
                referenced_sop_instance_uid=mr.SOPInstanceUID, relationship_type="CONTAINS",
            )
        )
    items.append(hd.sr.UIDRefContentItem(name=DERIVED_SERIES, value=ct.series_instance_uid, relationship_type="CONTAINS"))
    for sop_uid in ct.sop_instance_uids:
        items.append(
            hd.sr.ImageContentItem(
                name=DERIVED_IMAGE, referenced_sop_class_uid=CTImageStorage, referenced_sop_instance_uid=sop_uid,
                relationship_type="CONTAINS",
            )
        )
    root.ContentSequence = hd.sr.ContentSequence(items, is_root=False)

    first = mr_headers[0]
    unique_mr = list({mr.SOPInstanceUID: mr for mr in mr_headers}.values())
    sr = hd.sr.Comprehensive3DSR(
        evidence=[_evidence_highdicom_takes(unique_mr[0]), *unique_mr[1:], *ct.evidence()],
        content=root,
        series_instance_uid=derived_uid(uid_root, src_series, model.output_key, "sr-series", UID_SCHEME),
        series_number=int(first.get("SeriesNumber", 0) or 0) + 2000,
        sop_instance_uid=derived_uid(uid_root, src_series, model.output_key, "sr", UID_SCHEME),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        series_description=f"sCT provenance (mr2ct {synthesis.__version__}, model {model.short_digest})",
        software_versions=synthesis.__version__,
        manufacturer_model_name="mr2ct",
        # the MR's own, copied below with the patient: highdicom refuses terms the standard
        # defines (a first value left empty before code extensions, "\\ISO 2022 IR 87" as Japanese
        # sites send it; Korean's ISO 2022 IR 149), and the job failed on every such series
        specific_character_set=None,
    )
    copy_patient_and_study(first, sr)
    # highdicom writes this host's local time; the MR's zone when it names one, like the CT's
    date, time = processed.strftime("%Y%m%d"), processed.strftime("%H%M%S")
    sr.InstanceCreationDate, sr.InstanceCreationTime, sr.ContentDate, sr.ContentTime = date, time, date, time
    sr.SeriesDate, sr.SeriesTime = date, time
    copy_timezone(first, sr)
    sr.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID  # mr2ct wrote it (highdicom puts its own)
    sr.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    sr.ContributingEquipmentSequence = contributing_equipment(f"Provenance of synthetic CT series {ct.series_instance_uid}", date_time(processed))
    return sr


# What highdicom parses or checks of the first evidence's patient and study: a value it does not
# take (a birth date written 1970-02-03, a study time 09:00:00, a sex "Female") failed the
# job with the sCT already made, and it logs a patient name without a caret, name and all
READ_BY_HIGHDICOM = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")


def _evidence_highdicom_takes(mr: Dataset) -> Dataset:
    """The MR highdicom takes the patient and study from: its type 2 attributes all present (highdicom
    reads them all, and failed the job with an AttributeError on an MR without, say, a PatientID,
    absent from some exported and research data), and those it parses or checks empty. The SR's
    patient and study are then copied from the MR as received (``copy_patient_and_study``), as the
    CT's are: the derived objects say what the MR says, even where it breaks a VR's rules."""
    completed = Dataset()  # a new data set holding the same elements: the MR's header stays as received
    completed.update(mr)  # (copy.copy would share its element dict)
    for keyword in TYPE2_KEYWORDS:  # READ_BY_HIGHDICOM among them
        if keyword not in mr or keyword in READ_BY_HIGHDICOM:
            if keyword in completed:  # its element is the MR's own object (update shares them): a new one, the MR's unchanged
                del completed[keyword]
            setattr(completed, keyword, None)
    return completed


def warm_up() -> None:
    """Build a throw-away SR so that highdicom loads its tables of the standard (~0.4 s, once per
    process) now rather than in the first job."""
    evidence = Dataset()
    evidence.StudyInstanceUID, evidence.SeriesInstanceUID = generate_uid(), generate_uid()
    evidence.SOPClassUID, evidence.SOPInstanceUID = MRImageStorage, generate_uid()
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName"):
        setattr(evidence, keyword, "")
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImageProcessing, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=COMPUTE_DEVICE, value="warm-up", relationship_type="CONTAINS")], is_root=False
    )
    hd.sr.Comprehensive3DSR(
        evidence=[evidence], content=root,
        series_instance_uid=generate_uid(), series_number=1, sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
    )


def _name(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(code.CodingSchemeDesignator), str(value)


def read_provenance(ds: Dataset) -> Provenance:
    """Parse an SR written by ``build_provenance_sr`` back into its facts."""
    facts: dict[str, Any] = {"source_instance_uids": [], "derived_instance_uids": [], "parameters": {}}
    for item in ds.ContentSequence:
        key = _name(item)
        vt = item.ValueType
        if key == ("DCM", "111001"):
            facts["algorithm_name"] = item.TextValue
        elif key == ("DCM", "111003"):
            facts["algorithm_version"] = item.TextValue
        elif key == ("DCM", "111002"):
            name, _, value = str(item.TextValue).partition("=")
            facts["parameters"][name] = value
        elif key == ("DCM", "121012"):
            facts["observer_uid"] = item.UID
        elif key == ("DCM", "111702"):
            facts["processed_at"] = str(item.DateTime)[:14]
        elif key == ("DCM", COMPUTE_DEVICE.value):
            facts["compute_device"] = item.TextValue
        elif key == ("DCM", PROCESSING_SECONDS.value):
            facts["processing_seconds"] = float(item.MeasuredValueSequence[0].NumericValue)
        elif key == ("DCM", "121323"):
            facts["source_series_uid"] = item.UID
        elif key == ("DCM", DERIVED_SERIES.value):
            facts["derived_series_uid"] = item.UID
        elif vt == "IMAGE" and key == ("DCM", "121322"):
            facts["source_instance_uids"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif vt == "IMAGE" and key == ("DCM", DERIVED_IMAGE.value):
            facts["derived_instance_uids"].append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return Provenance(**facts)
