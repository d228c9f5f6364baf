"""Which series are no image of anatomy to synthesize from or train on, told by their ImageType
(0008,0008): one rule for the node's default selection, the training pull and the evaluation pairs.

- ``localizer``: LOCALIZER, a scout (an MR's few coarse slices, a CT's topogram: a projection, not
  slices in HU).
- ``mosaic``: MOSAIC, a Siemens fMRI, diffusion or perfusion series: each image a volume's slices
  tiled into one.
- ``phase``: phase images, whose pixels are angles (a field map's phase difference, susceptibility
  and phase-contrast flow series), not tissue contrast: Siemens writes P as the third value, Philips
  as the fourth (its magnitude images say M); DICOM's defined terms for an MR image's third value
  add PHASE MAP, VELOCITY MAP and PHASE SUBTRACT. Until 2026-12-05 they were synthesized (a field
  map's phase series came out as an sCT) and pulled into the MR training pool.
- ``complex``: real or imaginary images (R or I where Siemens and Philips write P for phase, or
  REAL, IMAGINARY): one part of the complex signal, signed, not the magnitude a T1 model was
  trained on (a phase-sensitive inversion recovery's real images among them).
- ``dixon``: the water, fat and opposed-phase images of a Dixon acquisition (WATER, FAT, OPP_PHASE as
  Siemens writes them, OUT_PHASE and OPPOSED_PHASE): a site's MR simulator sends all four of a
  Dixon T1 as series of their own, each with the same T1 timing; only the in-phase image
  (IN_PHASE) has the contrast a T1 model learned. The water image shows no fat, the fat image
  nothing else, and the opposed-phase image a dark line wherever fat meets water; until 2026-12-05
  each made an sCT of its own beside the in-phase one's.

ImageType is not the only place a scanner says so. The complex component of the pixels
(``component``) is told by DICOM's Complex Image Component (0008,9208) (an enhanced MR image's,
at its top level or in its shared MR Image Frame Type), and by GE in a private element: ImageType
ORIGINAL\\PRIMARY\\OTHER for all four, and in the block of creator GEMS_PARM_01 of group 0043,
element xx2F (SS): 0 magnitude, 1 phase, 2 real, 3 imaginary. Until 2026-12-05 neither was read,
so a GE field map's phase series was synthesized and pulled.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, MutableSequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not imported at run time: the settings read this module's constants, and a CLI command that
    from pydicom.dataset import Dataset  # never touches a DICOM file should not pay ~0.5 s for pydicom

LOCALIZER, MOSAIC, PHASE, COMPLEX, DIXON = "localizer", "mosaic", "phase", "complex", "dixon"

# what is left out, by kind, and the ImageType values that tell it
KINDS: dict[str, tuple[str, ...]] = {
    LOCALIZER: ("LOCALIZER",),
    MOSAIC: ("MOSAIC",),
    PHASE: ("P", "PHASE MAP", "VELOCITY MAP", "PHASE SUBTRACT"),
    COMPLEX: ("R", "I", "REAL", "IMAGINARY"),
    DIXON: ("WATER", "FAT", "OPP_PHASE", "OUT_PHASE", "OPPOSED_PHASE"),
}
# The node's default select_image_type_exclude (a site may widen it, or empty it).
NOT_ANATOMY: tuple[str, ...] = tuple(value for values in KINDS.values() for value in values)
WHAT = {LOCALIZER: "a localizer", MOSAIC: "a mosaic", PHASE: "phase images", COMPLEX: "real or imaginary images",  # in a reason
        DIXON: "a Dixon water, fat or opposed-phase image: its in-phase image is the T1 one"}

# Complex Image Component (0008,9208): its defined terms, the kind each is, and the node's default
# select_complex_component_exclude. MIXED (an enhanced image whose frames differ) is not excluded:
# its frames lie at the same positions, which the node's own rule refuses.
COMPONENTS: tuple[str, ...] = ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED")
COMPONENT_KIND = {"PHASE": PHASE, "REAL": COMPLEX, "IMAGINARY": COMPLEX}
NOT_ANATOMY_COMPONENTS: tuple[str, ...] = tuple(COMPONENT_KIND)
GE_CREATOR = "GEMS_PARM_01"
GE_ELEMENT = 0x2F  # its element in the creator's block: (0043,xx2F)
GE_COMPONENTS = {0: "MAGNITUDE", 1: "PHASE", 2: "REAL", 3: "IMAGINARY"}
COMPLEX_IMAGE_COMPONENT = 0x00089208
SHARED_GROUPS, MR_FRAME_TYPE = 0x52009229, 0x00189226


def values(image_type: Iterable[object] | str | None) -> list[str]:
    """ImageType's values, upper case, from a pydicom value, a list, or the backslash-joined text."""
    if image_type is None:
        return []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return [str(v).strip().upper() for v in image_type if str(v).strip()]


def not_anatomy(image_type: Iterable[object] | str | None) -> tuple[str, str] | None:
    """(kind, the value that tells it) when ImageType says the series is no image of anatomy, else None."""
    held = values(image_type)
    for kind, told_by in KINDS.items():
        for value in held:
            if value in told_by:
                return kind, value
    return None


def _text(element: Any) -> str:
    """A code or long string's value, from a raw element (as received) or a converted one."""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00").upper()
    if isinstance(value, MutableSequence):
        value = value[0] if len(value) else ""
    return str(value or "").strip().upper()


def _signed_short(element: Any, little_endian: bool) -> int | None:
    """An SS value, from a raw element (VR SS, or UN when received in implicit VR without the
    creator's dictionary) or a converted one; None when it is no such value."""
    value = element.value
    if isinstance(value, bytes):
        return int.from_bytes(value[:2], "little" if little_endian else "big", signed=True) if len(value) >= 2 else None
    if isinstance(value, MutableSequence):
        value = value[0] if len(value) else None
    return value if isinstance(value, int) else None


def _decide(top: str, shared: Callable[[], str], ge_code: Callable[[], int | None]) -> tuple[str, str] | None:
    """The rule, whatever the representation: the top-level Complex Image Component unless MIXED,
    then the shared MR Image Frame Type's, then MIXED, then GE's private code. ``shared`` and
    ``ge_code`` are asked only when needed (the node asks for every C-STORE)."""
    if top and top != "MIXED":
        return top[:16], "Complex Image Component (0008,9208)"
    told = shared()
    if told:
        return told[:16], "Complex Image Component (0008,9208) of the shared MR Image Frame Type"
    if top:
        return "MIXED", "Complex Image Component (0008,9208)"
    code = ge_code()
    if code in GE_COMPONENTS:
        return GE_COMPONENTS[code], f"GE's private image type (0043,xx2F) {code}"
    return None


def component(ds: Dataset) -> tuple[str, str] | None:
    """(the complex component, what told it) from Complex Image Component (0008,9208), at the top
    level or in the shared MR Image Frame Type, else from GE's private element; None when neither
    says. Reads raw elements without converting them (the node calls it for every C-STORE)."""
    keys = ds.keys()  # int membership in the keys is ~10x cheaper than in the data set (no Tag conversion)

    def shared() -> str:
        if SHARED_GROUPS not in keys:
            return ""
        try:
            return _text(ds[SHARED_GROUPS].value[0][MR_FRAME_TYPE].value[0][COMPLEX_IMAGE_COMPONENT])
        except (KeyError, IndexError, TypeError, AttributeError):
            return ""

    def ge_code() -> int | None:
        tag = private_tag(ds, 0x0043, GE_CREATOR, GE_ELEMENT)
        return None if tag is None else _signed_short(ds.get_item(tag), ds.original_encoding[1] is not False)

    top = _text(ds.get_item(COMPLEX_IMAGE_COMPONENT)) if COMPLEX_IMAGE_COMPONENT in keys else ""
    return _decide(top, shared, ge_code)


def private_tag(ds: Dataset, group: int, creator: str, element: int) -> int | None:
    """The tag of element ``element`` (its low byte) in the block that private creator ``creator``
    (upper case) reserved in ``group`` of a data set as received (raw elements, VR UN where it came
    in implicit VR) or built; None when it has no such block, or the block no such element."""
    keys = ds.keys()
    # the group's private creator slots looked up one by one (2 us where the block is the first;
    # a pass over every key, as until 2026-12-06, took ~50 us on a GE header of 400 elements)
    for block in range(0x10, 0x100):
        tag = (group << 16) | block
        if tag in keys and _text(ds.get_item(tag)) == creator:
            found = (group << 16) | (block << 8) | element
            return found if found in keys else None
    return None


def private_json(metadata: Mapping[str, Any], group: int, creator: str, element: int) -> Any:
    """``private_tag``'s element in an instance's DICOMweb metadata: its first value (InlineBinary,
    as a PACS sends a private element it does not know, as bytes); None when absent."""
    for block in range(0x10, 0x100):
        said = _json_value(metadata, f"{group:04X}00{block:02X}")
        if isinstance(said, bytes):
            said = said.decode("latin-1")
        if str(said or "").strip(" \x00").upper() == creator:
            return _json_value(metadata, f"{group:04X}{block:02X}{element:02X}")
    return None


def _json_value(attrs: Mapping[str, Any], key: str) -> Any:
    """The first value of a DICOM JSON attribute (PS3.18 F.2), InlineBinary as bytes; None when absent."""
    found = attrs.get(key) or {}
    if "Value" in found and found["Value"]:
        return found["Value"][0]
    if "InlineBinary" in found:
        try:
            return base64.b64decode(found["InlineBinary"])
        except ValueError:
            return None
    return None


def component_json(metadata: Mapping[str, Any]) -> tuple[str, str] | None:
    """``component`` of an instance's DICOMweb metadata (WADO-RS JSON): the same rule, read where a
    PACS's JSON puts the same elements (an unknown private element may come as UN, InlineBinary)."""

    def shared() -> str:
        groups = _json_value(metadata, "52009229")
        frame_type = _json_value(groups, "00189226") if isinstance(groups, Mapping) else None
        return str(_json_value(frame_type, "00089208") or "").strip().upper() if isinstance(frame_type, Mapping) else ""

    def ge_code() -> int | None:
        code = private_json(metadata, 0x0043, GE_CREATOR, GE_ELEMENT)
        if isinstance(code, bytes):
            return int.from_bytes(code[:2], "little", signed=True) if len(code) >= 2 else None
        return code if isinstance(code, int) else None

    return _decide(str(_json_value(metadata, "00089208") or "").strip().upper(), shared, ge_code)


def component_kind(told: tuple[str, str] | None) -> tuple[str, str] | None:
    """(kind, what told it) when a ``component`` is no image of anatomy (phase, real, imaginary), else None."""
    if told is None or told[0] not in COMPONENT_KIND:
        return None
    return COMPONENT_KIND[told[0]], f"{told[1]}: {told[0]}"
