"""Pull unpaired MR and CT series from any DICOMweb PACS into a local dataset cache.

QIDO-RS finds series (modality, body part, series description pattern, study date range,
limit); WADO-RS retrieves them; each series becomes one ``.npz`` shard of 2D slices
(MR normalised to [-1, 1], CT in HU as int16) plus a line in ``manifest.jsonl`` with its
geometry and a salted hash of the patient — no names or IDs in the cache. A second run
fetches only what is missing. Patients are split into train/validation by their hash, so no
patient is in both.

``pull_pairs`` is the other way to the PACS: the DICOM files of the patients that have both an
MR and a CT (and their spatial registrations), as they are, for `mr2ct evaluate --pairs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from synthesis.contrast import contrast_agent_json, contrast_json, fat_suppression_json, series_body_part, series_headers
from synthesis.errors import Mr2ctError, PacsUnavailable
from synthesis.image_type import KINDS, component_json, component_kind, not_anatomy
from synthesis.normalize import mr_to_unit
from synthesis.progress import progress_bar
from synthesis.uids import is_valid_uid
from synthesis.volume import assemble, axial_reslice, slices_closest_to_axial

log = logging.getLogger(__name__)

# WADO-RS asks for the instances as the PACS stores them (PS3.18 transfer-syntax=*): the PACS does not
# transcode, compressed data stays compressed on the wire and on disk, decoded here only when read.
STORED_SYNTAX = (("application/dicom", "*"),)
SYNTHETIC = "synthetic"  # the reason a series says Synthetic Data YES is left out of a training cache
# ... and one whose ImageType says it is no image of anatomy (synthesis.image_type): LOCALIZER (until
# 2026-12-05 a CT topogram was cached as a slice), MOSAIC (Siemens: a volume's slices tiled in one
# image), phase (P and the like: pixels that are angles; pulled into the MR pool until 2026-12-05)


@dataclass(frozen=True)
class PullFilter:
    modality: str
    body_part: str | None = None
    description: str | None = None  # regex, case-insensitive, applied to SeriesDescription
    study_date_from: str | None = None  # YYYYMMDD
    study_date_to: str | None = None
    limit: int | None = None
    contrasts: tuple[str, ...] = ()  # MR only: the contrasts taken (synthesis.contrast); empty: any
    contrast_agents: tuple[str, ...] = ()  # MR only: WITH and/or WITHOUT a contrast agent (synthesis.contrast.contrast_agent); empty: any
    fat_suppression: tuple[str, ...] = ()  # MR only: WITH and/or WITHOUT fat suppression (synthesis.contrast.fat_suppression); empty: any


def _value(attrs: dict[str, Any], tag: str) -> str:
    item = attrs.get(tag, {})
    values = item.get("Value") or [""]
    value = values[0]
    if isinstance(value, dict):  # PN
        value = value.get("Alphabetic", "")
    return str(value)


DEFAULT_ATTEMPTS = 5


def _client(url: str, username: str | None, password: str | None, timeout: float, attempts: int) -> DICOMwebClient:
    """``attempts``: tries per request on a connection error or a 408/429/503/504 answer, with
    dicomweb-client's exponential back-off (2, 4, 8, 16 s between them: 5 attempts ride out ~30 s
    of a PACS restarting); 1 fails at the first."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    session = requests.Session()
    if username is not None:
        session.auth = (username, password or "")
    # instances as stored: a PACS that gzips its answers (Orthanc up to 1.12.1 does so for DICOM too) spends far more
    # time compressing than a hospital network saves (dicom_node.orthanc_store)
    session.headers["Accept-Encoding"] = "identity"
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=attempts > 1, max_attempts=attempts)
    return client


def _pacs_error(url: str, exc: Exception) -> PacsUnavailable:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return PacsUnavailable(f"DICOMweb server {url} answered {status}: check the username and password")
    if status is not None:
        return PacsUnavailable(f"DICOMweb server {url} answered HTTP {status}")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, OSError)):
        return PacsUnavailable(f"DICOMweb server {url} is not reachable: {type(exc).__name__} (check the URL, or --attempts to wait longer for it)")
    return PacsUnavailable(f"DICOMweb server {url}: the request failed: {type(exc).__name__}: {str(exc)[:200]}")


def _series_uids(attrs: dict[str, Any]) -> tuple[str, str] | None:
    """A QIDO series result's study and series UIDs, or None when either is not a valid DICOM UID
    (the series is then left out: a pull-pairs folder is named after the series UID)."""
    study_uid, series_uid = _value(attrs, "0020000D"), _value(attrs, "0020000E")
    return (study_uid, series_uid) if is_valid_uid(study_uid) and is_valid_uid(series_uid) else None


def _instances(client: DICOMwebClient, study_uid: str, series_uid: str) -> Iterator[Dataset]:
    """A series' instances, one at a time, in the syntax the PACS stores them; a PACS that answers
    406 Not Acceptable to transfer-syntax=* is asked again for its default (explicit VR little
    endian, transcoded there)."""
    try:  # (dicomweb-client sends the request when iter_series is called, not at the first item)
        instances = client.iter_series(study_uid, series_uid, media_types=STORED_SYNTAX)
        first = next(instances, None)
    except requests.HTTPError as exc:
        if getattr(exc.response, "status_code", None) != 406:
            raise
        log.warning("the PACS does not serve stored transfer syntaxes (406 to transfer-syntax=*): asking for explicit VR little endian")
        instances = client.iter_series(study_uid, series_uid)
        first = next(instances, None)
    if first is not None:
        yield first
        yield from instances


def _search_series(client: DICOMwebClient, url: str, search: dict[str, Any]) -> list[dict[str, Any]]:
    """QIDO-RS: every series matching ``search`` (all pages), with what the pulls read of them."""
    try:
        return client.search_for_series(
            search_filters=search, limit=None, get_remaining=True,
            fields=["SeriesDescription", "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    "NumberOfSeriesRelatedInstances"],
        )
    except Exception as exc:
        raise _pacs_error(url, exc) from exc


def _pacs_instances(attrs: dict[str, Any]) -> int | None:
    """How many instances the PACS holds of a series (Number of Series Related Instances, which
    PS3.18 has a series search answer; Orthanc's does); None where its answer does not say."""
    value = (attrs.get("00201209") or {}).get("Value") or []
    try:
        return int(value[0]) if value else None
    except (TypeError, ValueError):
        return None


def _series_query(modality: str, flt: "PullFilter | PairsFilter") -> dict[str, Any]:
    """The QIDO-RS query of a modality under a filter's body part and study date range."""
    search: dict[str, Any] = {"Modality": modality}
    if flt.body_part:
        search["BodyPartExamined"] = flt.body_part
    if flt.study_date_from or flt.study_date_to:
        search["StudyDate"] = f"{flt.study_date_from or ''}-{flt.study_date_to or ''}"
    return search


def patient_key(patient_id: str, issuer: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}\x00{issuer}\x00{patient_id}".encode()).hexdigest()[:20]


def split_of(key: str, validation_fraction: float) -> str:
    """Deterministic per patient: the same patient always lands in the same split."""
    bucket = int(key[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"


def folder_salt(path: Path) -> str:
    """The salt kept in ``path`` (made, readable by its owner only, on first use): patient hashes
    made with it cannot be joined with another folder's."""
    if not path.exists():
        path.write_text(secrets.token_hex(16))
        path.chmod(0o600)
    return path.read_text().strip()


def cache_id(folder: Path) -> str | None:
    """What names a dataset cache of `mr2ct pull` (or a folder of `pull-pairs`) wherever it is moved
    or copied: a digest of the salt it keeps (made once, with the folder). The pull's audit rows
    and the training runs and model cards that learned from the folder record it, so that
    ``GET /audit/lineage`` follows a patient's images into a cache that has since moved. The salt
    itself never leaves the folder (it would let anyone rehash patient IDs into the cache's keys).
    None for a folder that holds no salt (not a pull's)."""
    for name in ("salt", ".salt"):
        salt = Path(folder) / name
        if salt.is_file():
            return hashlib.sha256(b"mr2ct dataset folder\x00" + salt.read_bytes().strip()).hexdigest()[:24]
    return None


def _withdrawn_keys(path: Path) -> set[str]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {json.loads(line)["patient_key"] for line in lines if line.strip()}


def _withdraw_key(path: Path, key: str, reason: str) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"patient_key": key, "reason": reason}, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def withdraw_patient(folder: Path, patient_id: str, issuers: Iterable[str], reason: str) -> list[str]:
    """One patient out of a folder `mr2ct pull` (a dataset cache) or `pull-pairs` made, for good:
    their series deleted (a cache's shards, with manifest lines saying why; a pairs folder's
    patient folder) and their salted key recorded so that no later pull into the folder takes them
    again. The key is the folder's own hash of the patient ID with each of ``issuers`` (the Issuer
    of Patient ID the PACS gave; "" where it gave none). Returns the series UIDs removed."""
    folder = Path(folder)
    if (folder / "salt").is_file():
        cache = DatasetCache.existing(folder)
        return [uid for issuer in dict.fromkeys(issuers) for uid in cache.withdraw(patient_key(patient_id, issuer, cache.salt), reason)]
    if not (folder / ".salt").is_file():
        raise FileNotFoundError(f"{folder} is neither a dataset cache of `mr2ct pull` nor a folder of `mr2ct pull-pairs` (no salt)")
    salt, removed = folder_salt(folder / ".salt"), []
    staging = _pairs_staging(folder)
    for issuer in dict.fromkeys(issuers):
        key = patient_key(patient_id, issuer, salt)
        _withdraw_key(folder / ".withdrawn.jsonl", key, reason)  # hidden: evaluate --pairs reads every other file as DICOM
        theirs = folder / key
        if theirs.is_dir():
            removed += sorted(f.name for f in theirs.iterdir() if f.is_dir() and is_valid_uid(f.name))
            _delete_by_staging(theirs, staging)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return removed


def _pairs_staging(out_dir: Path) -> Path:
    """Where `pull-pairs` stages what enters or leaves ``out_dir``: beside it, so that evaluate never
    sees half a series."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _delete_by_staging(path: Path, staging: Path) -> None:
    """``path`` out of its folder at once (renamed into ``staging``), then deleted there; what a
    stopped run left there the next pull-pairs deletes."""
    staging.mkdir(parents=True, exist_ok=True)
    gone = staging / f"{path.name}.replaced"
    path.rename(gone)
    shutil.rmtree(gone)


def acquired_before_planes(entry: dict[str, Any]) -> bool:
    """A cache entry written before pulls took the node's slice plane (2026-12-03: no ``plane``)
    for slices that are not axial: a 3D sagittal or coronal series held as acquired, where the node
    would show the generator its axial slices."""
    return "plane" not in entry and not slices_closest_to_axial(entry["orientation"])


class DatasetCache:
    @classmethod
    def existing(cls, root: Path) -> "DatasetCache":
        """A cache `mr2ct pull` made, opened only to read: nothing is created where there is none."""
        root = Path(root)
        if not (root / "manifest.jsonl").is_file() or not (root / "salt").is_file():
            raise FileNotFoundError(f"{root} is not a dataset cache of `mr2ct pull` (no manifest.jsonl and salt)")
        return cls(root)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = self.root / "manifest.jsonl"
        self.salt = folder_salt(self.root / "salt")  # one salt per cache: hashes cannot be joined across caches

    def _latest(self) -> dict[str, dict[str, Any]]:
        """The manifest's last line of each series, removed ones included."""
        latest: dict[str, dict[str, Any]] = {}
        if self.manifest.exists():
            for line in self.manifest.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    latest[entry["series_uid"]] = entry
        return latest

    def entries(self) -> list[dict[str, Any]]:
        """One entry per series: a later line of the manifest replaces an earlier one of the same
        series (a series cached again, see ``outdated``), and a series left out since it was cached
        (fetched again to be resliced, it no longer made a volume) or removed since (``remove``) has none."""
        left_out = self.left_out()
        return [entry for uid, entry in self._latest().items() if uid not in left_out and "removed" not in entry]

    def patients(self) -> dict[str, str]:
        """The split of every patient the cache has held a series of, removed series included: a
        model trained before a removal may have learnt from them (``training.pairs.leave_out_trained``)."""
        return {entry["patient_key"]: entry["split"] for entry in self._latest().values() if "patient_key" in entry}

    def remove(self, entry: dict[str, Any], reason: str) -> None:
        """A series out of the cache: its shard deleted, a last manifest line saying why (the patient
        key and split kept, see ``patients``). Pulled again, should it come back, it is cached anew."""
        (self.root / entry["shard"]).unlink(missing_ok=True)
        with open(self.manifest, "a") as fh:
            fh.write(json.dumps({**entry, "removed": reason}, sort_keys=True) + "\n")

    def withdrawn(self) -> set[str]:
        """The salted keys of the patients withdrawn from the cache (``withdraw``): a pull never takes
        a series of theirs again, whatever the PACS holds."""
        return _withdrawn_keys(self.root / "withdrawn.jsonl")

    def withdraw(self, key: str, reason: str) -> list[str]:
        """A patient out of the cache for good (consent to research use withdrawn): their key
        recorded first (so that no pull takes them again), then each of their series removed
        (``remove``). Returns the series UIDs removed."""
        _withdraw_key(self.root / "withdrawn.jsonl", key, reason)
        theirs = [entry for entry in self.entries() if entry.get("patient_key") == key]
        for entry in theirs:
            self.remove(entry, reason)
        return [entry["series_uid"] for entry in theirs]

    def known(self) -> set[str]:
        return {e["series_uid"] for e in self.entries()}

    def outdated(self) -> set[str]:
        """Series cached before pulls took the node's slice plane whose slices are not axial (see
        ``acquired_before_planes``). A pull fetches them again."""
        return {e["series_uid"] for e in self.entries() if acquired_before_planes(e)}

    def left_out(self) -> dict[str, str]:
        """Series a pull looked at and will not take (synthetic ones, ones that make no volume), with
        the reason: not asked about or fetched again (delete ``left_out.jsonl`` to look again)."""
        path = self.root / "left_out.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return {entry["series_uid"]: entry["reason"] for entry in (json.loads(line) for line in lines if line.strip())}

    def leave_out(self, series_uid: str, reason: str) -> None:
        with open(self.root / "left_out.jsonl", "a") as fh:
            fh.write(json.dumps({"series_uid": series_uid, "reason": reason}, sort_keys=True) + "\n")

    def headers_read(self) -> dict[str, dict[str, str]]:
        """MR series fetched and not cached because their instances' headers together said what the
        pull's filter did not take (MIXED, a late agent): what they said (contrast, contrast_agent,
        fat_suppression) and of how many instances (since 2026-12-06), so that a later pull with such
        a filter does not fetch them again while the PACS holds as many, and one that takes it does
        (delete ``headers_read.jsonl`` to read them again)."""
        path = self.root / "headers_read.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return {entry.pop("series_uid"): entry for entry in (json.loads(line) for line in lines if line.strip())}

    def read_headers(self, series_uid: str, said: dict[str, str]) -> None:
        with open(self.root / "headers_read.jsonl", "a") as fh:
            fh.write(json.dumps({"series_uid": series_uid, **said}, sort_keys=True) + "\n")

    def add(self, entry: dict[str, Any], slices: np.ndarray, replaces: str | None = None) -> None:
        """Cache a series, or cache it again: the line replaces the series' earlier one, whose shard
        (``replaces``) is deleted once the new line is written when it had another name."""
        shard = self.root / entry["shard"]
        tmp = shard.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, slices=slices)
        tmp.replace(shard)
        with open(self.manifest, "a") as fh:  # the manifest line is written last: a crash re-fetches
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        if replaces is not None and replaces != entry["shard"]:
            (self.root / replaces).unlink(missing_ok=True)

    def pool(self, modality: str, split: str | None = None) -> list[tuple[dict[str, Any], np.ndarray]]:
        out = []
        for entry in self.entries():
            if entry["modality"] == modality and (split is None or entry["split"] == split):
                out.append((entry, np.load(self.root / entry["shard"])["slices"]))
        return out


def pull(
    url: str, cache_dir: Path, filters: list[PullFilter], *, username: str | None = None, password: str | None = None,
    validation_fraction: float = 0.2, timeout: float = 30.0, progress: bool | None = None, attempts: int = DEFAULT_ATTEMPTS,
    prune: bool = False, fetched: list[dict[str, Any]] | None = None, removed: list[str] | None = None,
) -> dict[str, int]:
    """Fetch what matches and is not yet cached. A series that says it is synthetic (Synthetic Data
    YES: the sCTs mr2ct itself stores in the PACS, and other tools' synthetic images) or whose
    ImageType says LOCALIZER (the topogram every CT study holds), MOSAIC (Siemens tiles), a Dixon's water, fat or
    opposed-phase image, phase, real or imaginary (or whose complex component says one of the last three, as GE's private element does) is never
    training data: asked of each series before it is fetched (its first instance's metadata), and remembered in the cache
    so that a second run does not ask again. Returns counts (found, fetched, skipped: cached
    already, synthetic, localizer, mosaic, phase, complex and dixon: left out, unusable: fetched and left out, as they
    make no volume, such as a localizer of three planes, with the reason in the log and the cache;
    refreshed: fetched again, as the cache held them in another plane than the node's, see
    ``DatasetCache.outdated``; changed: fetched again, as the PACS holds another number of
    instances of them than the cache was made of (a series pulled while it was still arriving, a
    slice added or deleted since: a manifest line records the instances its shard was made of,
    since 2026-12-06; lines written before say nothing and are not compared); contrast: MR series of a contrast the filter's ``contrasts`` does not
    take, told by the same first instance's metadata, ``synthesis.contrast``: a T1 model's MR pool
    with T2 and FLAIR heads in it learns a mix of both; a fetched MR series' manifest line records
    its contrast); contrast_agent: MR series the filter's ``contrast_agents`` does not take by whether
    their header says a contrast agent was given (a manifest line records that too); fat_suppression:
    likewise by whether it says fat was suppressed. Once fetched, every instance's header is read as
    the node reads a series (``synthesis.contrast.series_headers``, since 2026-12-06): a series whose
    later instances read another contrast (MIXED) or name an agent is not cached either (counted as
    above; what its headers said is remembered in ``headers_read.jsonl``, so that a later pull
    whose filter does not take it does not fetch it again), and the manifest's body part names
    every part its instances name (``series_body_part``).
    A filter's ``limit`` counts the series the cache holds (fetched or cached already): the series
    left out do not count, so that many are taken while the PACS has that many.
    ``prune``: series the PACS no longer holds (deleted there: a patient who withdrew consent to
    research use, a study moved out) leave the cache (``DatasetCache.remove``), counted ``removed``;
    asked of each cached series this pull's searches did not find, one QIDO-RS request each, so a
    series outside the filters is kept while the PACS holds it. ``fetched``, when given, gets one
    item per series fetched (study, series, patient_id, instances), as it is cached: what `mr2ct
    pull` writes into the audit trail, the part fetched before a PACS error included; ``removed``,
    the series UIDs ``prune`` took out."""
    cache = DatasetCache(cache_dir)
    client = _client(url, username, password, timeout, attempts)
    entries, left_out, headers_read = cache.entries(), cache.left_out(), cache.headers_read()  # the manifest read once
    withdrawn = cache.withdrawn()
    cached = {e["series_uid"]: e for e in entries}
    known = set(cached)
    outdated = {e["series_uid"]: e["shard"] for e in entries if acquired_before_planes(e)}  # and the shard each refresh replaces
    changed: set[str] = set()  # cached series fetched again because the PACS holds another number of their instances
    plans: list[tuple[PullFilter, list[dict[str, Any]]]] = []
    in_pacs: set[str] = set()  # every series the searches found, whatever the filters then make of it
    for flt in filters:
        found = _search_series(client, url, _series_query(flt.modality, flt))
        in_pacs.update(_value(a, "0020000E") for a in found)
        plans.append((flt, [a for a in found if not flt.description or re.search(flt.description, _value(a, "0008103E"), re.IGNORECASE)]))

    def dropped(series_uid: str, outcome: str) -> str:
        """A series left out: one cached as acquired before (and fetched again to be resliced), or
        fetched again as the PACS holds another number of its instances, goes from the cache too;
        its line no longer counts (``DatasetCache.entries``), its shard is deleted."""
        shard = outdated.pop(series_uid, None)
        if shard is not None:
            (cache.root / shard).unlink(missing_ok=True)
            log.warning("dropped series=%s from the cache: %s, now left out", series_uid,
                        "its instances in the PACS changed" if series_uid in changed else "cached as acquired before")
        return outcome

    def take(flt: PullFilter, attrs: dict[str, Any]) -> str:
        """One series into the cache: what became of it (a key of the counts)."""
        uids = _series_uids(attrs)
        if uids is None:
            log.warning("skipping a series with a malformed UID")
            return "malformed"
        study_uid, series_uid = uids
        if withdrawn and patient_key(_value(attrs, "00100020"), _value(attrs, "00100021"), cache.salt) in withdrawn:
            return "withdrawn"  # consent withdrawn (`mr2ct forget`): never taken again, whatever the PACS holds
        if series_uid in known and series_uid not in outdated:
            held, now = cached[series_uid].get("instances"), _pacs_instances(attrs)
            if held is None or now is None or held == now:
                return "skipped"
            log.info("fetching again series=%s: the PACS holds %d instances of it, the cache was made of %d", series_uid, now, held)
            outdated[series_uid] = cached[series_uid]["shard"]  # replaced like a refresh, or dropped if it is left out now
            changed.add(series_uid)

        def not_taken(said: dict[str, str]) -> str | None:
            """The key of the filter that does not take what a series' headers ``said``, if one does not."""
            for key, taken in (("contrast", flt.contrasts), ("contrast_agent", flt.contrast_agents), ("fat_suppression", flt.fat_suppression)):
                if taken and said.get(key) and said[key] not in taken:
                    return key
            return None

        if flt.modality == "MR" and series_uid in headers_read:  # fetched before, every header read: not fetched again for nothing
            key = not_taken(headers_read[series_uid])
            held, now = headers_read[series_uid].get("instances"), _pacs_instances(attrs)
            if key is not None and (held is None or now is None or held == now):  # unless the PACS holds another number of them now
                log.info("not pulled series=%s: %s %s, as its headers said when fetched before", series_uid, key, headers_read[series_uid][key])
                return key
        metadata = None
        if series_uid not in left_out:
            metadata = _first_metadata(client, url, attrs)
            reason = _left_out_reason(metadata)
            if reason is not None:
                left_out[series_uid] = reason
                cache.leave_out(series_uid, reason)
        if series_uid in left_out:
            reason = left_out[series_uid]
            return dropped(series_uid, reason if reason in (SYNTHETIC, *KINDS) else "unusable")
        if flt.modality == "MR" and flt.contrasts and metadata is not None:
            # this pull's choice, not the series' nature: not remembered in left_out.jsonl, asked again by the next pull
            told, why = contrast_json(metadata)
            if told not in flt.contrasts:
                log.info("not pulled series=%s: its MR contrast is %s (%s), not one of %s", series_uid, told, why, list(flt.contrasts))
                return "contrast"  # one cached before (in its acquired plane) stays as it is
        for key, taken, rule, what in (("contrast_agent", flt.contrast_agents, contrast_agent_json, "a contrast agent"),
                                       ("fat_suppression", flt.fat_suppression, fat_suppression_json, "fat suppression")):
            if flt.modality != "MR" or not taken or metadata is None:
                continue
            given, why = rule(metadata)
            if given not in taken:
                log.info("not pulled series=%s: %s %s (%s), not %s", series_uid, given.lower(), what, why,
                         " or ".join(a.lower() for a in taken))
                return key
        try:
            datasets = list(_instances(client, study_uid, series_uid))
        except Exception as exc:
            raise _pacs_error(url, exc) from exc
        try:
            source = assemble(datasets)
        except (Mr2ctError, NotImplementedError, RuntimeError, ValueError) as exc:  # its geometry, or pixels no plugin here decodes
            left_out[series_uid] = f"makes no volume: {type(exc).__name__}: {str(exc)[:300]}"
            cache.leave_out(series_uid, left_out[series_uid])
            log.warning("left out series=%s: %s", series_uid, left_out[series_uid])
            return dropped(series_uid, "unusable")
        first = source.headers[0]
        told = given = fat = None
        if flt.modality == "MR":  # every instance's header, as the node reads a series it receives (recorder.heed)
            said = series_headers(source.headers)
            (told, _), (given, _), (fat, _) = said["contrast"], said["contrast_agent"], said["fat_suppression"]
            answers = {"contrast": told, "contrast_agent": given, "fat_suppression": fat}
            key = not_taken(answers)
            if key is not None:  # the first instance passed; another says otherwise: remembered (headers_read.jsonl)
                log.info("not pulled series=%s: %s %s (%s)", series_uid, key, said[key][0], said[key][1])
                headers_read[series_uid] = {**answers, "instances": len(datasets)}
                cache.read_headers(series_uid, headers_read[series_uid])
                return key
        part = series_body_part(source.headers)  # the card's mr_body_parts, which the node's config check holds select_body_parts to
        key = patient_key(str(first.get("PatientID", "")), str(first.get("IssuerOfPatientID", "")), cache.salt)
        # the slices the node would show the generator: a 3D sagittal or coronal series as axial ones
        volume = source.volume
        reslice, plane = axial_reslice(volume)
        if reslice is None:
            voxels, pixel_spacing, slice_spacing = volume.voxels, volume.pixel_spacing, volume.slice_spacing
        else:
            voxels, pixel_spacing, slice_spacing = reslice.forward(volume.voxels), reslice.pixel_spacing, reslice.slice_spacing
        if flt.modality == "MR":
            slices = mr_to_unit(voxels).astype(np.float16)
        else:
            slices = np.clip(np.rint(voxels), -1024, 3071).astype(np.int16)
        # a resliced series' shard has its own name, as has one fetched again for its instances: the shard the
        # manifest's line names stays whole until the new line is written
        shard = (hashlib.sha256(series_uid.encode()).hexdigest()[:24] + ("" if reslice is None else "-axial")
                 + (f"-{len(datasets)}" if series_uid in changed else "") + ".npz")
        cache.add(
            {
                "series_uid": series_uid, "modality": flt.modality, "patient_key": key, "split": split_of(key, validation_fraction),
                "shard": shard, "slices": int(slices.shape[0]), "rows": int(slices.shape[1]), "columns": int(slices.shape[2]),
                "pixel_spacing": list(pixel_spacing), "slice_spacing": round(abs(slice_spacing), 4),
                "orientation": [round(v, 6) for v in volume.orientation], "plane": plane,
                **({"contrast": told} if told else {}), **({"contrast_agent": given, "fat_suppression": fat} if given else {}),
                "body_part": part, "instances": len(datasets),
            },
            slices,
            replaces=outdated.get(series_uid),
        )
        known.add(series_uid)
        if fetched is not None:
            fetched.append({"study": study_uid, "series": series_uid, "patient_id": _value(attrs, "00100020"),
                            "issuer": _value(attrs, "00100021"), "instances": len(datasets)})
        if outdated.pop(series_uid, None) is not None:
            if series_uid in changed:
                log.info("cached again series=%s: %d instances", series_uid, len(datasets))
                return "changed"
            log.info("cached again series=%s: %s (was as acquired)", series_uid, plane)
            return "refreshed"
        return "fetched"

    counts = {"found": 0, "fetched": 0, "skipped": 0, SYNTHETIC: 0, **dict.fromkeys(KINDS, 0), "unusable": 0, "refreshed": 0, "changed": 0,
              "contrast": 0, "contrast_agent": 0, "fat_suppression": 0, "withdrawn": 0, "removed": 0}
    wanted = [len(matched) if flt.limit is None else min(flt.limit, len(matched)) for flt, matched in plans]
    bar = progress_bar(total=sum(wanted), desc="pull", unit="series", show=progress)
    with bar:
        for (flt, matched), want in zip(plans, wanted):
            taken = 0
            for looked, attrs in enumerate(matched, 1):
                if taken == want:
                    break
                outcome = take(flt, attrs)
                if outcome in ("fetched", "skipped", "refreshed", "changed"):
                    taken += 1
                elif looked + want - taken <= len(matched):  # left out, and the limit takes one more in its place
                    bar.total += 1
                if outcome != "malformed":
                    counts["found"] += 1
                    counts[outcome] += 1
                bar.update(1)
    if prune:
        unseen = [entry for entry in cache.entries() if entry["series_uid"] not in in_pacs]
        for entry in progress_bar(unseen, desc="prune", unit="series", show=progress):
            if not _search_series(client, url, {"SeriesInstanceUID": entry["series_uid"]}):
                cache.remove(entry, f"the PACS no longer held it (mr2ct pull --prune, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)")
                log.info("removed series=%s from the cache: the PACS no longer holds it", entry["series_uid"])
                counts["removed"] += 1
                if removed is not None:
                    removed.append(entry["series_uid"])
    return counts


# What `mr2ct pull-pairs` fetches besides the MR and CT: the registrations that relate their frames.
SPATIAL_REGISTRATION_MODALITY = "REG"


@dataclass(frozen=True)
class PairsFilter:
    """Which studies `pull_pairs` looks at: the MR and CT series of the same patients."""

    body_part: str | None = None
    mr_description: str | None = None  # regex, case-insensitive, on the MR's SeriesDescription
    ct_description: str | None = None  # the same on the CT's (e.g. a planning CT's protocol)
    study_date_from: str | None = None  # YYYYMMDD
    study_date_to: str | None = None
    limit: int | None = None  # at most this many patients


def _first_metadata(client: DICOMwebClient, url: str, attrs: dict[str, Any]) -> dict[str, Any] | None:
    """A series' first instance's metadata (WADO-RS, no pixels: QIDO carries none of what
    ``_left_out_reason`` and the contrast need); None when it has none, or a malformed UID."""
    uids = _series_uids(attrs)
    if uids is None:
        return None  # refused later, with the reason
    study_uid, series_uid = uids
    try:
        first = client.search_for_instances(study_uid, series_uid, limit=1, fields=["SOPInstanceUID"])
        if not first:
            return None
        return client.retrieve_instance_metadata(study_uid, series_uid, _value(first[0], "00080018"))
    except Exception as exc:
        raise _pacs_error(url, exc) from exc


def _left_out_reason(metadata: dict[str, Any] | None) -> str | None:
    """Why a series is no training data, read from its first instance's metadata before its pixels
    are fetched: ``SYNTHETIC`` when it says Synthetic Data YES; ``localizer``, ``mosaic``, ``phase``
    or ``complex`` when its ImageType, or its complex component (Complex Image Component, GE's
    private image type), says so (``synthesis.image_type``: a CT's topogram is a projection, not a
    slice in HU; a Siemens mosaic was fetched whole until 2026-12-05, hundreds of volumes, to be
    left out or, one volume, cached as slices); None when it is none of these."""
    if metadata is None:
        return None
    if _value(metadata, "0008001C").upper() == "YES":
        return SYNTHETIC
    told = not_anatomy(metadata.get("00080008", {}).get("Value") or []) or component_kind(component_json(metadata))
    return told[0] if told else None


def _left_out_unless_fetched(client: DICOMwebClient, url: str, attrs: dict[str, Any], patient_dir: Path) -> bool:
    """Whether ``_left_out_reason`` leaves the series out, asked only of a CT series not in
    the folder already: one that is was asked about by the run that fetched it (a synthetic CT or
    a topogram is never fetched), so a second run costs no metadata request per CT it has."""
    uids = _series_uids(attrs)
    if uids is not None and (patient_dir / uids[1]).is_dir():
        return False
    return _left_out_reason(_first_metadata(client, url, attrs)) is not None


def pull_pairs(
    url: str, out_dir: Path, flt: PairsFilter, *, username: str | None = None, password: str | None = None,
    timeout: float = 30.0, progress: bool | None = None, attempts: int = DEFAULT_ATTEMPTS, prune: bool = False,
    fetched: list[dict[str, Any]] | None = None, removed: list[str] | None = None,
) -> dict[str, int]:
    """The DICOM files of every patient that has both an MR and a CT series matching ``flt`` (and
    of the spatial registrations filed for them), fetched into ``out_dir`` as `mr2ct evaluate
    --pairs` reads them: ``<salted patient hash>/<series UID>/<n>.dcm``. No patient identifier
    names a folder (the files themselves are the patient's DICOM, in the syntax the PACS stores
    them: keep the folder where such data may be). A series lands whole
    or not at all (fetched beside the folder, then moved in), so a second run fetches only the
    series missing. ``limit`` takes that many patients in the order of their salted hash (a
    fixed, arbitrary draw for a folder). Whether a CT is synthetic costs two requests (QIDO does
    not carry it): asked only of the CTs of the patients taken, and not of those already in the
    folder. A series in the folder of which the PACS holds another number of instances than the
    folder does (fetched while it was still arriving, a slice added or deleted since) is fetched
    again whole and replaces it. ``prune``: a series folder the PACS no longer holds is deleted (as
    ``pull``'s ``prune`` asks: one request for each the searches did not find). Returns counts
    (patients, found, fetched, skipped, changed: fetched again so, removed, withdrawn: patients with a pair not
    taken as `mr2ct forget` withdrew them from the folder); ``fetched`` gets an
    item per series fetched, ``removed`` the series UIDs pruned, as ``pull``'s."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = _pairs_staging(out_dir)
    for replaced in staging.glob("*.replaced"):  # a series fetched again, its old files not deleted when the run stopped
        shutil.rmtree(replaced)
    salt = folder_salt(out_dir / ".salt")  # hidden: evaluate --pairs reads every other file as DICOM
    client = _client(url, username, password, timeout, attempts)
    by_patient: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    in_pacs: set[str] = set()  # every series the searches found
    for modality, pattern in (("MR", flt.mr_description), ("CT", flt.ct_description)):
        for attrs in _search_series(client, url, _series_query(modality, flt)):
            in_pacs.add(_value(attrs, "0020000E"))
            if pattern and not re.search(pattern, _value(attrs, "0008103E"), re.IGNORECASE):
                continue
            patient = (_value(attrs, "00100020"), _value(attrs, "00100021"))
            by_patient.setdefault(patient, {"MR": [], "CT": []})[modality].append(attrs)
    withdrawn = _withdrawn_keys(out_dir / ".withdrawn.jsonl")  # consent withdrawn (`mr2ct forget`): never taken again
    paired = [(patient_key(pid, issuer, salt), (pid, issuer), found) for (pid, issuer), found in by_patient.items()
              if found["MR"] and found["CT"] and pid]
    candidates = sorted(c for c in paired if c[0] not in withdrawn)
    keyed = []
    for key, patient, found in candidates:  # in the order ``limit`` draws them, until it has enough
        if flt.limit is not None and len(keyed) >= flt.limit:
            break  # the CTs of the patients not taken are never asked about
        found["CT"] = [a for a in found["CT"] if not _left_out_unless_fetched(client, url, a, out_dir / key)]
        if found["CT"]:  # an MR whose only CT is an sCT (mr2ct's own) or a topogram has no ground truth: not a pair
            keyed.append((key, patient, found))
    todo: list[tuple[str, dict[str, Any]]] = []
    for key, (pid, issuer), found in keyed:
        registrations = _search_series(client, url, {"Modality": SPATIAL_REGISTRATION_MODALITY, "PatientID": pid})
        registrations = [a for a in registrations if _value(a, "00100021") == issuer]
        in_pacs.update(_value(a, "0020000E") for a in registrations)
        todo.extend((key, attrs) for attrs in [*found["MR"], *found["CT"], *registrations])
    counts = {"patients": len(keyed), "found": len(todo), "fetched": 0, "skipped": 0, "changed": 0, "removed": 0,
              "withdrawn": len(paired) - len(candidates)}
    bar = progress_bar(todo, desc="pull pairs", unit="series", show=progress)
    for key, attrs in bar:
        uids = _series_uids(attrs)
        if uids is None:
            log.warning("skipping a series with a malformed UID")
            counts["found"] -= 1
            continue
        study_uid, series_uid = uids
        target = out_dir / key / series_uid
        if target.is_dir():
            held, now = sum(1 for _ in target.glob("*.dcm")), _pacs_instances(attrs)
            if now is None or now == held:
                counts["skipped"] += 1
                continue
            log.info("fetching again series=%s: the PACS holds %d instances of it, the folder %d", series_uid, now, held)
        partial = staging / series_uid
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:  # instance by instance to disk: a long CT series is never held in memory whole
            for n, ds in enumerate(_instances(client, study_uid, series_uid)):
                ds.save_as(partial / f"{n:05d}.dcm", enforce_file_format=True)
        except requests.RequestException as exc:
            raise _pacs_error(url, exc) from exc
        if fetched is not None:
            fetched.append({"study": study_uid, "series": series_uid, "patient_id": _value(attrs, "00100020"),
                            "issuer": _value(attrs, "00100021"), "instances": sum(1 for _ in partial.iterdir())})
        target.parent.mkdir(exist_ok=True)
        if target.is_dir():  # the series as the PACS holds it now takes the place of the one fetched before
            replaced = staging / f"{series_uid}.replaced"
            target.rename(replaced)
            partial.rename(target)
            shutil.rmtree(replaced)
            counts["changed"] += 1
            continue
        partial.rename(target)
        counts["fetched"] += 1
    if prune:
        # a series' folder as this function names it (<salted patient hash>/<series UID>), nothing else put there
        ours = (f for f in out_dir.glob("*/*") if f.is_dir() and is_valid_uid(f.name) and re.fullmatch(r"[0-9a-f]{20}", f.parent.name))
        for folder in sorted(ours):
            if folder.name not in in_pacs and not _search_series(client, url, {"SeriesInstanceUID": folder.name}):
                _delete_by_staging(folder, staging)
                if not any(folder.parent.iterdir()):
                    folder.parent.rmdir()
                log.info("removed series=%s from %s: the PACS no longer holds it", folder.name, out_dir)
                counts["removed"] += 1
                if removed is not None:
                    removed.append(folder.name)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return counts
