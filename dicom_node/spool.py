"""The durable spool: every instance is on disk, fsynced, before the sender hears Success.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
UIDs are checked (digits and dots, at most 64 characters) before they become
path components, so nothing from the wire can steer a write outside the spool.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

from synthesis import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from synthesis.errors import InvalidInstance, Mr2ctError
from synthesis.uids import is_valid_uid


class SpoolFull(Mr2ctError):
    """The spool's disk has no room for the instance."""


def require_uid(value: object, name: str) -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidInstance(f"{name} {shown} is not a valid UID (digits and dots, at most 64 characters)")
    return str(value)


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (OB with the long length form)."""
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1) for a data set received with
    these UIDs: what pynetdicom's ``encode_file_meta(event.file_meta)`` gives, without building
    and encoding a pydicom data set for every instance. The UIDs must be valid (checked first)."""
    elements = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x00020003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x00020010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _element(0x00020012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x00020013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(elements))) + elements


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PURGE_SUFFIX = ".purge"  # spool retention renames a file to ".<name>.purge" before deleting it (dicom_node/retention.py)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        # Series folders known to exist and to be durable (their creation fsynced up to the root):
        # the hot path then makes no stat or mkdir call per instance.
        self._durable_folders: set[Path] = set()
        self._folders_lock = threading.Lock()

    def check_space(self, needed: int) -> None:
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        if free - needed < self.min_free_bytes:
            raise SpoolFull(f"spool {self.root} has {free // 2**20} MiB free, keeps at least {self.min_free_bytes // 2**20} MiB (spool_min_free_mb)")

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The spool path of an instance. Each UID must pass ``require_uid`` first: digits and dots
        only, never a leading dot, so no component can be ``..``, hold a separator or name a
        temporary file; that is what keeps every path inside the spool."""
        parts = [require_uid(study_uid, "StudyInstanceUID"), require_uid(series_uid, "SeriesInstanceUID"), require_uid(sop_uid, "SOPInstanceUID")]
        path = self.root.joinpath(parts[0], parts[1], parts[2] + ".dcm")
        # Belt and braces, in string arithmetic only (no system call on the hot path): exactly
        # three levels below the root, nothing for the OS to resolve.
        if path.parent.parent.parent != self.root or os.path.normpath(path) != str(path):
            raise InvalidInstance(f"refusing to write outside the spool: {sop_uid!r}")
        return path

    def _ensure_folder(self, folder: Path) -> None:
        """Create the study/series folders once and make their entries durable."""
        if folder in self._durable_folders:
            return
        with self._folders_lock:
            if folder in self._durable_folders:
                return
            study = folder.parent
            study_created = not study.exists()
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            if created:
                fsync_dir(study)
            if study_created:
                fsync_dir(self.root)
            if len(self._durable_folders) >= 100_000:  # a bound on memory over months of series
                self._durable_folders.clear()
            self._durable_folders.add(folder)

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | Sequence[bytes]) -> Path:
        """Write to a temporary name, sync, rename into place, fsync the folder. Returns the final path.

        ``data`` may come in pieces (a file meta header and the data set as received): they go down
        in one ``writev`` on a file opened with O_DSYNC, so the write and its sync are one call.
        A re-sent instance replaces the earlier file atomically.
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        self.check_space(sum(len(chunk) for chunk in chunks))
        folder = final.parent
        self._ensure_folder(folder)
        tmp = folder / f".{sop_uid}.{secrets.token_hex(4)}.tmp"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC, 0o640)
            except FileNotFoundError:  # the folder was removed behind our back: make it again
                self._durable_folders.discard(folder)
                self._ensure_folder(folder)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DSYNC, 0o640)
            try:
                _write_all(fd, chunks)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool {self.root} is full: {exc.strerror}") from exc
            raise
        return final

    def stray_temporaries(self) -> list[Path]:
        """Half-written files a crash left behind (never acknowledged, safe to delete)."""
        return [p for p in self.root.glob("*/*/.*.tmp") if p.is_file()]

    def interrupted_purges(self) -> list[Path]:
        """Files spool retention renamed aside and had not deleted when the process died."""
        return [p for p in self.root.glob(f"*/*/.*.dcm{PURGE_SUFFIX}") if p.is_file()]

    def instances(self) -> list[Path]:
        return [p for p in self.root.glob("*/*/*.dcm") if p.is_file()]
