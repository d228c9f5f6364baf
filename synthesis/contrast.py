"""What an MR series' contrast is (T1, T2, proton density, FLAIR...), told by its header: one rule
for the node's selection (``select_acquisition_contrasts``) and the training pull's MR pool.

A generator trained on T1-weighted heads turns a T2-weighted or FLAIR series into an image that
looks like a CT and is wrong everywhere: in T2 the CSF is bright and fat dim, so the sCT reads the
ventricles as bone. Until 2026-12-05 the node synthesized whatever MR series passed the other
selection rules. A scanner routing everything to the node sends T2, FLAIR, diffusion and T2*
series too; the contrast keeps them out by a rule a physicist can read, not by a guess from pixels.

The rule, first answer wins:

1. Acquisition Contrast (0008,9209), where an enhanced MR image says it (at its top level, or in
   its shared MR Image Frame Type): DICOM's defined terms, taken as they are (MIXED and UNKNOWN
   go on to 2).
2. Angio Flag (0018,0025) Y (the MR Image module's "angiographic images"): TOF. A time-of-flight
   angiogram's source images are short-TR gradient echoes, which the timing below reads as T1,
   and its sCT makes bone of every bright vessel; head protocols hold one almost always. (A
   phase-contrast angiogram's magnitude images read TOF too: not T1 either way; its phase images
   are told by their component.) Since 2026-12-06.
3. An enhanced MR's pulse sequence (the MR Pulse Sequence module, at its top level), where its
   Acquisition Contrast said MIXED or UNKNOWN: Time of Flight Contrast (0018,9015) YES is TOF, Phase
   Contrast (0018,9014) YES is FLOW_ENCODED, and Steady State Pulse Sequence (0018,9017)
   FREE_PRECESSION (a balanced SSFP: TrueFISP, FIESTA, balanced FFE), TRANSVERSE (an unspoiled
   one: FISP, GRASS) or TIME_REVERSED (PSIF, T2-FFE) is MIXED, as is a single-frame header's
   SequenceVariant (0018,0021) TRSS (time-reversed steady state), a Siemens SequenceName (0018,0024)
   whose stem names one (``*tfi`` TrueFISP, ``*ci`` CISS, ``*fi`` FISP, ``*ps``/``*psif`` PSIF,
   ``*de`` DESS, followed by 2d or 3d; ``*tfl``, turboFLASH, and ``*fl``, FLASH, are spoiled and go on)
   and, where the Manufacturer says Philips, its Scanning Technique Description (2001,xx20, creator
   "Philips Imaging DD 001") B-FFE, B-TFE or T2-FFE (vendor names read since 2026-12-06, later the
   same day), and, where it says GE, a Pulse Sequence Name or Internal Pulse Sequence Name
   (0019,xx9C/xx9E, creator "GEMS_ACQU_01") holding FIESTA (FIESTA-C, 3D FIESTA) or SSFP (since
   2026-12-06, evening). A steady-state free precession image is bright where T2/T1 is high (CSF,
   fat, blood); its TR and TE are a few milliseconds, which the timing below reads as T1, and a T1
   model's sCT reads its bright CSF as bone.
   Scanners write MIXED as the Acquisition Contrast of such a sequence, which went on to the
   timing and read T1 until this step was added (2026-12-06). (SequenceVariant SS alone is not
   read: a spoiled gradient echo is a steady state too, and not every vendor writes SP, spoiled.)
4. Otherwise the textbook reading of the sequence's timing (milliseconds; 1.5-3 T), from
   RepetitionTime, EchoTime, InversionTime and ScanningSequence (or, in an enhanced image, the
   shared MR Timing and Related Parameters, MR Echo and MR Modifier items and EchoPulseSequence;
   in a legacy converted one, its Unassigned Shared Converted Attributes, where converters such as
   highdicom's put the single-frame timing):

   - inversion recovery (IR in ScanningSequence, Inversion Recovery YES, or an inversion time):
     TI < 300 ms is STIR; 300-1,500 ms with TE < 30 ms is T1 (MPRAGE, IR-prepared spoiled
     gradient echo, T1-FLAIR); TI >= 1,500 ms with TE >= 60 ms is FLUID_ATTENUATED (FLAIR);
     anything else UNKNOWN;
   - gradient echo with TE >= 15 ms is T2_STAR;
   - TE >= 60 ms is T2 (a diffusion series not labelled so reads T2 here: it is T2-weighted);
   - TE < 30 ms: TR < 1,000 ms is T1 (spin echo, spoiled gradient echo; a balanced one whose
     header does not say so by 3), TR >= 2,000 ms is PROTON_DENSITY;
   - anything else (TE 30-60 ms; TR 1,000-2,000 ms with short TE; TR or TE not given) UNKNOWN.

What the rule does not see: fat suppression (a separate answer below), a steady-state free
precession or time-of-flight series whose single-frame header says neither (no Angio Flag, no
TRSS, no Siemens, Philips or GE name above: read as T1; GE's names are read where its headers
dumped in public put them, not checked against a real FIESTA series), and anything but the
instance it is given (the node and the pull combine every instance's answer:
``with_other_contrast``). ``UNKNOWN`` says the header did not tell; the node refuses such a
series unless a site lists UNKNOWN.

Whether a contrast agent was given is a second answer (``contrast_agent``; the node's
``select_contrast_agent``): a post-gadolinium T1 is still T1 by its timing, but its vessels, dura,
choroid plexus and any enhancing lesion are bright where the unenhanced T1 a model learned is not,
and the sCT reads them as another tissue. The rule, first answer wins:

1. an enhanced image's Contrast/Bolus Usage functional group (0018,9341), shared or in any frame:
   WITH when an item says Contrast/Bolus Agent Administered (0018,9342) YES, else WITHOUT (a
   dynamic series whose later frames are enhanced is WITH);
2. Contrast/Bolus Agent (0018,0010) naming an agent, an item in Contrast/Bolus Agent Sequence
   (0018,0012), or a Contrast/Bolus Ingredient (0018,1048): WITH (the agent and the ingredient at
   the top level or among a legacy converted image's unassigned converted attributes, the sequence
   at the top level). A value that says none ("NONE", "NO", "N/A", "-", "0", "NO CONTRAST"...) is
   WITHOUT;
3. otherwise WITHOUT: the Contrast/Bolus module is required "if contrast media was used", so its
   absence, or an empty agent (how scanners write it when nothing was entered), says none was.

A header is believed: a post-contrast series whose technologist entered no agent reads WITHOUT.

Whether fat was suppressed is a third (``fat_suppression``; ``select_fat_suppression``): in a
fat-saturated T1 the scalp's fat and the marrow of the skull's diploe are dark where the T1 a model
learned has them bright, and its sCT misreads the tissue around the skull. First answer wins:

1. Spectrally Selected Suppression (0018,9025), where an enhanced MR's pulse sequence says it (at
   its top level, or among a legacy converted image's unassigned converted attributes): FAT or
   FAT_AND_WATER is WITH, any other value (NONE, WATER, SILICON_GEL) WITHOUT;
2. ScanOptions (0018,0022) holding FS, DICOM's defined term for fat saturation (as GE and Siemens
   write it among their own options): WITH;
3. otherwise WITHOUT. An inversion-recovery fat suppression is a STIR by the contrast rule above, and
   a Dixon's water image is told by its ImageType (synthesis.image_type); a vendor that says fat
   saturation only in a private element reads WITHOUT.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # see synthesis.image_type: the settings import this module
    from pydicom.dataset import Dataset

from synthesis.image_type import private_json, private_tag

T1, T2, T2_STAR, PD, FLAIR, STIR, UNKNOWN = "T1", "T2", "T2_STAR", "PROTON_DENSITY", "FLUID_ATTENUATED", "STIR", "UNKNOWN"
# Acquisition Contrast (0008,9209)'s defined terms (PS3.3 C.8.13.1), all of which a site may select
CONTRASTS: tuple[str, ...] = ("T1", "T2", "T2_STAR", "PROTON_DENSITY", "FLUID_ATTENUATED", "STIR", "DIFFUSION", "PERFUSION",
                              "FLOW_ENCODED", "TAGGING", "TOF", "MIXED", "UNKNOWN")
# what the shipped model, and every model trained on the phantom cohort, was trained on
DEFAULT_SELECTED: tuple[str, ...] = (T1,)
# (ScanningSequence, RepetitionTime, EchoTime, InversionTime or None) of a textbook protocol of each
# contrast the rule tells by timing: what `mr2ct sample-mr --contrast` and the QA's interlock write
EXAMPLE_TIMINGS: dict[str, tuple[str, str, str, str | None]] = {
    T1: ("GR", "500", "10", None), T2: ("SE", "4000", "100", None), FLAIR: ("SE\\IR", "9000", "90", "2500"),
    PD: ("SE", "3000", "15", None), STIR: ("SE\\IR", "6000", "70", "150"), T2_STAR: ("GR", "28", "20", None),
}
# BodyPartExamined (0018,0015) values of a head, the only anatomy the phantom cohort has (UNKNOWN:
# the instance does not say, which many scanners' head exams do not): an MR-only prostate
# series sent to a head model makes an sCT of a pelvis read as a skull
HEAD_PARTS: tuple[str, ...] = ("HEAD", "BRAIN", "SKULL")  # one anatomy by three names, as scanners write it
DEFAULT_BODY_PARTS: tuple[str, ...] = (*HEAD_PARTS, UNKNOWN)
BODY_PART = 0x00180015

ACQUISITION_CONTRAST = 0x00089209
ANGIO_FLAG = 0x00180025
TOF, FLOW_ENCODED, MIXED = "TOF", "FLOW_ENCODED", "MIXED"
# the MR Pulse Sequence module's (an enhanced MR's top level) and the MR Image module's words for a sequence
PHASE_CONTRAST, TIME_OF_FLIGHT, STEADY_STATE, SEQUENCE_VARIANT = 0x00189014, 0x00189015, 0x00189017, 0x00180021
# Steady State Pulse Sequence (0018,9017) values of an unspoiled steady-state free precession (LONGITUDINAL
# is a spoiled one, whose contrast the timing reads; NONE is none)
FREE_PRECESSION = ("FREE_PRECESSION", "TRANSVERSE", "TIME_REVERSED")
# SequenceName (0018,0024, the MR Image module's): Siemens names its sequences by a stem, the
# dimension and a number (*tfi2d1_12, *ci3d1, *fl3d1); the stems of an unspoiled steady-state free
# precession (its syngo pulse sequence brochure's legend), anchored so that *tfl3d1 (turboFLASH,
# MPRAGE) and *fl2d1 (FLASH, spoiled) are none of them
SEQUENCE_NAME, MANUFACTURER = 0x00180024, 0x00080070
SIEMENS_SSFP_STEMS = {"TFI": "TrueFISP, a balanced SSFP", "CI": "CISS, a balanced SSFP", "FI": "FISP, an unspoiled SSFP",
                      "PSIF": "PSIF, a time-reversed SSFP", "PS": "PSIF, a time-reversed SSFP", "DE": "DESS, a double-echo SSFP"}
_SIEMENS_SSFP = re.compile(r"\*?(TFI|CI|FI|PSIF|PS|DE)[23]D\d")
# Philips' Scanning Technique Description (2001,xx20) in the block of creator "Philips Imaging DD 001":
# its values for a balanced fast field echo (B-FFE, B-TFE) and a time-reversed one (T2-FFE)
PHILIPS_CREATOR, PHILIPS_GROUP, PHILIPS_TECHNIQUE = "PHILIPS IMAGING DD 001", 0x2001, 0x20
PHILIPS_SSFP = {"B-FFE": "a balanced fast field echo", "B-TFE": "a balanced turbo field echo", "BFFE": "a balanced fast field echo",
                "BTFE": "a balanced turbo field echo", "T2FFE": "a time-reversed fast field echo", "T2-FFE": "a time-reversed fast field echo"}
# GE's Pulse Sequence Name (0019,xx9C, its product name, lower case: 'fse-xl', 'efgre3d') and Internal
# Pulse Sequence Name (0019,xx9E, 'FSE-XL') in the block of creator "GEMS_ACQU_01" (pydicom's private
# dictionary; a GE header's dump): the words of GE's balanced SSFP (FIESTA, FIESTA-C, 3D FIESTA) and
# of its time-reversed one (SSFP, GE's PSIF), looked for within the name
GE_ACQUISITION_CREATOR, GE_ACQUISITION_GROUP = "GEMS_ACQU_01", 0x0019
GE_SEQUENCE_NAMES = ((0x9C, "Pulse Sequence Name"), (0x9E, "Internal Pulse Sequence Name"))
GE_SSFP = {"FIESTA": "FIESTA, a balanced SSFP", "SSFP": "SSFP, a time-reversed SSFP"}
SHARED_GROUPS, PER_FRAME_GROUPS = 0x52009229, 0x52009230
MR_FRAME_TYPE, MR_TIMING, MR_ECHO, MR_MODIFIER = 0x00189226, 0x00189112, 0x00189114, 0x00189115
# where a Legacy Converted Enhanced MR image keeps the single-frame attributes no functional group holds
# (ScanningSequence, RepetitionTime, EchoTime, InversionTime among them): shared, then per frame
UNASSIGNED_SHARED, UNASSIGNED_PER_FRAME = 0x00209170, 0x00209171
REPETITION_TIME, ECHO_TIME, INVERSION_TIME, SCANNING_SEQUENCE = 0x00180080, 0x00180081, 0x00180082, 0x00180020
EFFECTIVE_ECHO_TIME, INVERSION_TIMES, INVERSION_RECOVERY, ECHO_PULSE_SEQUENCE = 0x00189082, 0x00189079, 0x00189009, 0x00189008

# (tag at the top level, functional group item, tag in it) for each timing value
_WHERE: dict[str, tuple[int, int, int]] = {
    "tr": (REPETITION_TIME, MR_TIMING, REPETITION_TIME),
    "te": (ECHO_TIME, MR_ECHO, EFFECTIVE_ECHO_TIME),
    "ti": (INVERSION_TIME, MR_MODIFIER, INVERSION_TIMES),
    "ir": (INVERSION_RECOVERY, MR_MODIFIER, INVERSION_RECOVERY),
}

# ``look(tag, group)``: a value's text, upper case ('' when absent): at the top level when group
# is None (or, in a legacy converted image, among its unassigned converted attributes), else in the
# first item of functional group ``group`` (shared, then the first frame's)
Look = Callable[[int, "int | None"], str]
# ``private(group, creator, element)``: the text of element ``element`` of the block that private
# creator ``creator`` (upper case) reserved in ``group``, upper case ('' when absent)
Private = Callable[[int, str, int], str]


def _number(text: str) -> float | None:
    try:
        return float(text.split("\\")[0]) if text else None
    except ValueError:
        return None


def decide(look: Look, private: Private | None = None) -> tuple[str, str]:
    """(contrast, what told it) by the module's rule, whatever the representation."""
    told = look(ACQUISITION_CONTRAST, None)
    if told and told not in (MIXED, UNKNOWN):
        return told[:24], "Acquisition Contrast (0008,9209)"
    framed = look(ACQUISITION_CONTRAST, MR_FRAME_TYPE)
    if framed and framed not in (MIXED, UNKNOWN):
        return framed[:24], "Acquisition Contrast (0008,9209) of the shared MR Image Frame Type"
    if look(ANGIO_FLAG, None) == "Y":
        return TOF, "Angio Flag (0018,0025) Y: an angiogram's images (time-of-flight, or a phase contrast's magnitude)"
    if look(TIME_OF_FLIGHT, None) == "YES":
        return TOF, "Time of Flight Contrast (0018,9015) YES"
    if look(PHASE_CONTRAST, None) == "YES":
        return FLOW_ENCODED, "Phase Contrast (0018,9014) YES"
    steady = look(STEADY_STATE, None)
    if steady in FREE_PRECESSION:
        return MIXED, f"Steady State Pulse Sequence (0018,9017) {steady}: steady-state free precession, T2/T1 contrast"
    if "TRSS" in look(SEQUENCE_VARIANT, None).split("\\"):
        return MIXED, "SequenceVariant (0018,0021) TRSS: time-reversed steady state, T2/T1 contrast"
    name = look(SEQUENCE_NAME, None)
    stem = _SIEMENS_SSFP.match(name)
    if stem:
        return MIXED, f"SequenceName (0018,0024) {name[:24]!r}: Siemens {SIEMENS_SSFP_STEMS[stem.group(1)]}, T2/T1 contrast"
    # a vendor's private block is looked for in its own images alone (every C-STORE comes here)
    maker = look(MANUFACTURER, None) if private else ""
    technique = private(PHILIPS_GROUP, PHILIPS_CREATOR, PHILIPS_TECHNIQUE) if private and "PHILIPS" in maker else ""
    if technique in PHILIPS_SSFP:
        return MIXED, f"Philips' Scanning Technique (2001,xx20) {technique}: {PHILIPS_SSFP[technique]}, T2/T1 contrast"
    if private and maker.startswith("GE"):  # GE MEDICAL SYSTEMS, GE HEALTHCARE
        for element, label in GE_SEQUENCE_NAMES:
            ge_name = private(GE_ACQUISITION_GROUP, GE_ACQUISITION_CREATOR, element)
            word = next((word for word in GE_SSFP if word in ge_name.replace(" ", "")), None)
            if word:
                return MIXED, f"GE's {label} (0019,xx{element:02X}) {ge_name[:24]!r}: {GE_SSFP[word]}, T2/T1 contrast"

    def timing(name: str) -> str:
        top, group, tag = _WHERE[name]
        return look(top, None) or look(tag, group)

    tr, te, ti = (_number(timing(name)) for name in ("tr", "te", "ti"))
    ti = ti if ti is not None and ti > 0 else None  # an InversionTime of 0: a scanner's way of saying none
    scanning = look(SCANNING_SEQUENCE, None).split("\\")
    pulse = look(ECHO_PULSE_SEQUENCE, None)
    inversion = "IR" in scanning or timing("ir") == "YES" or ti is not None
    gradient = "GR" in scanning or pulse == "GRADIENT"
    said = ", ".join(part for part in (
        f"ScanningSequence {'/'.join(s for s in scanning if s)}" if any(scanning) else (f"EchoPulseSequence {pulse}" if pulse else ""),
        f"TR {tr:g} ms" if tr is not None else "no TR", f"TE {te:g} ms" if te is not None else "no TE",
        f"TI {ti:g} ms" if ti is not None else "") if part)
    if inversion:
        if ti is None or te is None:
            return UNKNOWN, f"inversion recovery without {'an inversion time' if ti is None else 'an echo time'} ({said})"
        if ti < 300:
            return STIR, f"{said}: short inversion time"
        if ti < 1500 and te < 30:
            return T1, f"{said}: inversion recovery with a T1 inversion time and a short TE"
        if ti >= 1500 and te >= 60:
            return FLAIR, f"{said}: long inversion time and long TE"
        return UNKNOWN, f"{said}: an inversion recovery of no textbook contrast"
    if te is None or tr is None:
        return UNKNOWN, f"{said}: the header does not give the timing"
    if gradient and te >= 15:
        return T2_STAR, f"{said}: gradient echo with a long TE"
    if te >= 60:
        return T2, f"{said}: long TE"
    if te < 30 and tr < 1000:
        return T1, f"{said}: short TR and TE"
    if te < 30 and tr >= 2000:
        return PD, f"{said}: long TR and short TE"
    return UNKNOWN, f"{said}: between the textbook contrasts"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, (tuple, MutableSequence)):
        return "\\".join(_text(v) for v in value)
    return "" if value is None else str(value).strip(" \x00").upper()


def _dataset_look(ds: Dataset) -> Look:
    """``Look`` into a data set as received (raw elements) or built in memory. Only an enhanced
    image's functional groups are decoded (the node calls this for every C-STORE)."""
    keys = ds.keys()

    def look(tag: int, group: int | None) -> str:
        if group is None:
            if tag in keys:
                return _text(ds.get_item(tag).value)
            if SHARED_GROUPS not in keys:  # a single-frame image (the node's every C-STORE but enhanced ones) ends here
                return ""
            return grouped(tag, UNASSIGNED_SHARED, (SHARED_GROUPS,)) or grouped(tag, UNASSIGNED_PER_FRAME, (PER_FRAME_GROUPS,))
        return grouped(tag, group, (SHARED_GROUPS, PER_FRAME_GROUPS))

    def grouped(tag: int, group: int, holders: tuple[int, ...]) -> str:
        for holder in holders:
            if holder not in keys:
                continue
            try:
                item = ds[holder].value[0][group].value[0]
                return _text(item[tag].value) if tag in item else ""
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
        return ""

    return look


def _dataset_private(ds: Dataset) -> Private:
    """``Private`` of a data set as received (raw elements, VR UN where it came in implicit VR) or built in memory."""

    def private(group: int, creator: str, element: int) -> str:
        tag = private_tag(ds, group, creator, element)
        return "" if tag is None else _text(ds.get_item(tag).value)

    return private


def contrast(ds: Dataset) -> tuple[str, str]:
    """``decide`` on a data set as received (raw elements) or built in memory."""
    return decide(_dataset_look(ds), _dataset_private(ds))


def _json_look(metadata: Mapping[str, Any]) -> Look:
    """``Look`` into an instance's DICOMweb metadata (WADO-RS JSON, PS3.18 F.2)."""

    def first_item(attrs: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
        values = (attrs.get(key) or {}).get("Value") or []
        return values[0] if values and isinstance(values[0], Mapping) else None

    def look(tag: int, group: int | None) -> str:
        if group is None:
            return (_text((metadata.get(f"{tag:08X}") or {}).get("Value")) or grouped(tag, UNASSIGNED_SHARED, (SHARED_GROUPS,))
                    or grouped(tag, UNASSIGNED_PER_FRAME, (PER_FRAME_GROUPS,)))
        return grouped(tag, group, (SHARED_GROUPS, PER_FRAME_GROUPS))

    def grouped(tag: int, group: int, holders: tuple[int, ...]) -> str:
        for holder in holders:
            outer = first_item(metadata, f"{holder:08X}")
            inner = first_item(outer, f"{group:08X}") if outer else None
            if inner:
                return _text((inner.get(f"{tag:08X}") or {}).get("Value"))
        return ""

    return look


def _json_private(metadata: Mapping[str, Any]) -> Private:
    """``Private`` of an instance's DICOMweb metadata (a private element the PACS does not know may
    come as UN, its value as InlineBinary)."""
    return lambda group, creator, element: _text(private_json(metadata, group, creator, element))


def contrast_json(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """``contrast`` of an instance's DICOMweb metadata (WADO-RS JSON, PS3.18 F.2)."""
    return decide(_json_look(metadata), _json_private(metadata))


WITH, WITHOUT = "WITH", "WITHOUT"
# the node's select_contrast_agent and select_fat_suppression, and `mr2ct pull --mr-contrast-agent` and
# `--mr-fat-suppression`: which of WITH and WITHOUT they take
CHOICES: dict[str, tuple[str, ...]] = {"without": (WITHOUT,), "with": (WITH,), "any": (WITH, WITHOUT)}
# what the shipped model, and every model trained on the phantom cohort, was trained on: unenhanced heads, fat not suppressed
DEFAULT_CHOICE = "without"
CONTRAST_AGENT, AGENT_SEQUENCE, AGENT_INGREDIENT = 0x00180010, 0x00180012, 0x00181048
USAGE_GROUP, AGENT_ADMINISTERED, YES_SAID = 0x00189341, 0x00189342, "YES"
# how scanners and technologists write "none given" into Contrast/Bolus Agent
_NONE_SAID = re.compile(r"(NONE|NO|N/?A|NIL|NULL|FALSE|WITHOUT|0|-+|\.+|NO[ _]CONTRAST.*|NOT (USED|GIVEN|APPLICABLE|ADMINISTERED).*|NON[ -]?CONTRAST.*)")


def decide_agent(agent: str, agent_items: int, ingredient: str, administered: list[str]) -> tuple[str, str]:
    """(WITH or WITHOUT, what told it) by the module's rule from what a header holds: Contrast/Bolus
    Agent's text, how many items Contrast/Bolus Agent Sequence holds, Contrast/Bolus Ingredient, and
    the Contrast/Bolus Agent Administered values of an enhanced image's usage groups (every frame's)."""
    if administered:
        if YES_SAID in administered:
            return WITH, "Contrast/Bolus Agent Administered (0018,9342) YES in the Contrast/Bolus Usage functional group"
        return WITHOUT, "Contrast/Bolus Agent Administered (0018,9342) NO in every Contrast/Bolus Usage functional group"
    said = agent[:64]
    if said and not _NONE_SAID.fullmatch(said):
        return WITH, f"Contrast/Bolus Agent (0018,0010) {said!r}"
    if agent_items:
        return WITH, "Contrast/Bolus Agent Sequence (0018,0012) names an agent"
    if ingredient and not _NONE_SAID.fullmatch(ingredient):
        return WITH, f"Contrast/Bolus Ingredient (0018,1048) {ingredient[:16]!r}"
    if said:
        return WITHOUT, f"Contrast/Bolus Agent (0018,0010) {said!r} says none"
    return WITHOUT, "no contrast agent in the header (Contrast/Bolus Agent (0018,0010) empty or absent)"


def contrast_agent(ds: Dataset) -> tuple[str, str]:
    """``decide_agent`` on a data set as received (raw elements) or built in memory; only an
    enhanced image's functional groups are decoded (every frame's usage group)."""
    keys, look = ds.keys(), _dataset_look(ds)
    administered: list[str] = []
    for holder in (SHARED_GROUPS, PER_FRAME_GROUPS):
        try:
            frames = ds[holder].value if holder in keys else ()
        except (KeyError, TypeError, ValueError):
            continue
        for frame in frames:
            usage = frame.get(USAGE_GROUP)
            administered += [_text(item[AGENT_ADMINISTERED].value) for item in (usage.value if usage is not None else None) or ()
                             if AGENT_ADMINISTERED in item]
    items = len(ds[AGENT_SEQUENCE].value or ()) if AGENT_SEQUENCE in keys else 0
    return decide_agent(look(CONTRAST_AGENT, None), items, look(AGENT_INGREDIENT, None), administered)


def contrast_agent_json(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """``contrast_agent`` of an instance's DICOMweb metadata (WADO-RS JSON, PS3.18 F.2)."""

    def values(attrs: Mapping[str, Any], tag: int) -> list[Any]:
        return list((attrs.get(f"{tag:08X}") or {}).get("Value") or [])

    look = _json_look(metadata)
    administered = [_text(v) for holder in (SHARED_GROUPS, PER_FRAME_GROUPS) for frame in values(metadata, holder)
                    if isinstance(frame, Mapping) for item in values(frame, USAGE_GROUP) if isinstance(item, Mapping)
                    for v in values(item, AGENT_ADMINISTERED)[:1]]
    return decide_agent(look(CONTRAST_AGENT, None), len(values(metadata, AGENT_SEQUENCE)), look(AGENT_INGREDIENT, None), administered)


SCAN_OPTIONS, SPECTRAL_SUPPRESSION = 0x00180022, 0x00189025


def decide_fat(scan_options: str, suppression: str) -> tuple[str, str]:
    """(WITH or WITHOUT, what told it) by the module's fat-suppression rule, from ScanOptions'
    values and Spectrally Selected Suppression, as text (upper case, values joined by backslashes)."""
    if suppression:
        if suppression in ("FAT", "FAT_AND_WATER"):
            return WITH, f"Spectrally Selected Suppression (0018,9025) {suppression}"
        return WITHOUT, f"Spectrally Selected Suppression (0018,9025) {suppression[:16]}"
    if "FS" in scan_options.split("\\"):
        return WITH, f"ScanOptions (0018,0022) {scan_options[:64]} holds FS (fat saturation)"
    return WITHOUT, "no fat suppression in the header (no FS in ScanOptions (0018,0022), no Spectrally Selected Suppression)"


def fat_suppression(ds: Dataset) -> tuple[str, str]:
    """``decide_fat`` on a data set as received (raw elements) or built in memory."""
    look = _dataset_look(ds)
    return decide_fat(look(SCAN_OPTIONS, None), look(SPECTRAL_SUPPRESSION, None))


def fat_suppression_json(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """``fat_suppression`` of an instance's DICOMweb metadata (WADO-RS JSON, PS3.18 F.2)."""
    look = _json_look(metadata)
    return decide_fat(look(SCAN_OPTIONS, None), look(SPECTRAL_SUPPRESSION, None))


def body_part(ds: Dataset) -> str:
    """BodyPartExamined (0018,0015) as the instance says it (upper case; in a legacy converted image
    among its unassigned converted attributes too), UNKNOWN when it does not."""
    return _dataset_look(ds)(BODY_PART, None)[:16] or UNKNOWN


def body_part_json(metadata: Mapping[str, Any]) -> str:
    """``body_part`` of an instance's DICOMweb metadata (WADO-RS JSON, PS3.18 F.2)."""
    return _json_look(metadata)(BODY_PART, None)[:16] or UNKNOWN


def with_other_part(told: str, other: str) -> str:
    """A series' BodyPartExamined once another of its instances says ``other``: every part its
    instances name, backslash-separated in the order first named (``HEAD\\NECK``: a head-and-neck
    series whose lower slices say NECK, which a head model has not seen). A header that does not say
    (UNKNOWN, or '' as the node records it) adds nothing. Until 2026-12-06 the first instance's alone
    was read."""
    if not other or other == UNKNOWN:
        return told
    named = [p for p in told.split("\\") if p and p != UNKNOWN]
    return told if other in named else "\\".join([*named, other])[:64]


def parts_named(told: str) -> tuple[str, ...]:
    """The BodyPartExamined values in a series' ``with_other_part`` answer; (UNKNOWN,) when none was given."""
    return tuple(p for p in told.split("\\") if p and p != UNKNOWN) or (UNKNOWN,)


def series_body_part(headers: Sequence[Dataset]) -> str:
    """``body_part`` of a series, every instance's header read (``with_other_part``): UNKNOWN when none says."""
    told = ""
    for ds in headers:
        told = with_other_part(told, body_part(ds))
    return told or UNKNOWN


def learned_parts(parts: list[str]) -> set[str]:
    """The BodyPartExamined values a model that learned ``parts`` (its card's ``mr_body_parts``) has
    seen the anatomy of: a head by any of its names stands for all of them."""
    return set(parts) | (set(HEAD_PARTS) if set(parts) & set(HEAD_PARTS) else set())


def with_other_contrast(told: tuple[str, str], other: tuple[str, str]) -> tuple[str, str]:
    """A series' MR contrast (and what told it) once another of its instances reads ``other``:
    MIXED where the two are different contrasts (no one contrast a model learned), else as told.
    UNKNOWN, a header that does not tell, differs from none; a series already MIXED stays so."""
    if other[0] and other[0] != UNKNOWN and told[0] not in ("", UNKNOWN, MIXED, other[0]):
        return MIXED, f"instances read {told[0]} ({told[1]}) and {other[0]} ({other[1]})"[:160]
    return told


def with_other_choice(told: tuple[str, str], other: tuple[str, str]) -> tuple[str, str]:
    """A series' contrast agent or fat suppression (WITH or WITHOUT, and what told it) once another
    of its instances says ``other``: WITH where any instance says so (a series whose later slices
    alone name an agent is post-contrast there)."""
    if other[0] == WITH and told[0] != WITH:
        return WITH, f"another instance than the first: {other[1]}"[:160]
    return told


def series_headers(headers: Sequence[Dataset]) -> dict[str, tuple[str, str]]:
    """What a series' headers say together (``with_other_contrast``, ``with_other_choice``): its MR
    contrast, contrast agent and fat suppression, each with what told it, as the node judged the
    series when it was received (the SR's source_mr_* parameters)."""
    said = {"contrast": contrast(headers[0]), "contrast_agent": contrast_agent(headers[0]), "fat_suppression": fat_suppression(headers[0])}
    for ds in headers[1:]:
        said["contrast"] = with_other_contrast(said["contrast"], contrast(ds))
        said["contrast_agent"] = with_other_choice(said["contrast_agent"], contrast_agent(ds))
        said["fat_suppression"] = with_other_choice(said["fat_suppression"], fat_suppression(ds))
    return said
