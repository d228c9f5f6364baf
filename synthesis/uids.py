"""Deterministic UIDs for what mr2ct writes (pydicom's generate_uid with entropy sources)."""

from __future__ import annotations

from pydicom.uid import generate_uid


def derived_uid(uid_root: str, source_series_uid: str, model_sha256: str, *parts: object) -> str:
    """Same (root, source series, model, parts) -> same UID; re-running a job rewrites, never duplicates."""
    return str(generate_uid(prefix=uid_root, entropy_srcs=[source_series_uid, model_sha256, *[str(p) for p in parts]]))
