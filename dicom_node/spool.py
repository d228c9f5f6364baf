"""The durable spool: every instance is on disk, fsynced, before the sender hears Success.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
UIDs are checked (digits and dots, at most 64 characters) before they become
path components, so nothing from the wire can steer a write outside the spool.
"""

from __future__ import annotations

import errno
import os
import shutil
import re
import secrets
from pathlib import Path

from synthesis.errors import InvalidInstance, Mr2ctError

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class SpoolFull(Mr2ctError):
    """The spool's disk has no room for the instance."""


def is_valid_uid(value: object) -> bool:
    """A UI value as DICOM PS3.5 defines it: dotted numeric components, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


def require_uid(value: object, name: str) -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidInstance(f"{name} {shown} is not a valid UID (digits and dots, at most 64 characters)")
    return str(value)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise SpoolFull(f"spool {self.root} has {free // 2**20} MiB free, keeps at least {self.min_free_bytes // 2**20} MiB (spool_min_free_mb)")

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        parts = [require_uid(study_uid, "StudyInstanceUID"), require_uid(series_uid, "SeriesInstanceUID"), require_uid(sop_uid, "SOPInstanceUID")]
        path = self.root.joinpath(parts[0], parts[1], parts[2] + ".dcm")
        if self.root not in path.resolve().parents:  # belt and braces: the regex already forbids it
            raise InvalidInstance(f"refusing to write outside the spool: {sop_uid!r}")
        return path

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write to a temporary name, fsync, rename into place, fsync the folder. Returns the final path."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        self.check_space(len(data))
        folder = final.parent
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{sop_uid}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(folder)
            if created:
                _fsync_dir(folder.parent)
                _fsync_dir(self.root)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool {self.root} is full: {exc.strerror}") from exc
            raise
        return final

    def stray_temporaries(self) -> list[Path]:
        """Half-written files a crash left behind (never acknowledged, safe to delete)."""
        return [p for p in self.root.glob("*/*/.*.tmp") if p.is_file()]

    def instances(self) -> list[Path]:
        return [p for p in self.root.glob("*/*/*.dcm") if p.is_file()]
