"""Deterministic UIDs for what mr2ct writes (pydicom's generate_uid with entropy sources)."""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """A UI value as DICOM PS3.5 defines it: dotted numeric components, no leading zeros, at most 64
    chars. What comes from the wire or a PACS passes this before it names a file or a folder."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


def derived_uid(uid_root: str, source_series_uid: str, model_sha256: str, *parts: object) -> str:
    """Same (root, source series, model, parts) -> same UID; re-running a job rewrites, never duplicates."""
    return str(generate_uid(prefix=uid_root, entropy_srcs=[source_series_uid, model_sha256, *[str(p) for p in parts]]))
