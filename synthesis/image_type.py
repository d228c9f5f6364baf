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
"""

from __future__ import annotations

from collections.abc import Iterable

LOCALIZER, MOSAIC, PHASE = "localizer", "mosaic", "phase"

# what is left out, by kind, and the ImageType values that tell it
KINDS: dict[str, tuple[str, ...]] = {
    LOCALIZER: ("LOCALIZER",),
    MOSAIC: ("MOSAIC",),
    PHASE: ("P", "PHASE MAP", "VELOCITY MAP", "PHASE SUBTRACT"),
}
# The node's default select_image_type_exclude (a site may widen it, or empty it).
NOT_ANATOMY: tuple[str, ...] = tuple(value for values in KINDS.values() for value in values)
WHAT = {LOCALIZER: "a localizer", MOSAIC: "a mosaic", PHASE: "phase images"}  # what the series is, in a reason


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
