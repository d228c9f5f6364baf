"""Client code for Orthanc (kept out of any module named ``orthanc``, which Orthanc's plugin owns)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from io import BytesIO
from typing import Any

from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import HttpError
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.digest import instance_digest
from synthesis.errors import PacsUnavailable, StorageIncomplete

log = logging.getLogger(__name__)

# The routing plugin's per-series state in Orthanc (orthanc/plugin.py; a user metadata the
# plugin's Orthanc configuration declares), and the one the node writes on a series it routed
# there itself: the plugin sends no series that has a state.
ROUTED_FLAG = "Mr2ctRouted"
ROUTED_BY_NODE = "received by mr2ct directly, which routed the originals here: not sent back"
# Where a series stands in the node, written on it by the node (dicom_node.outcomes); declared with or without the plugin.
OUTCOME_FLAG = "Mr2ctOutcome"
DEFAULT_TIMEOUT_SECONDS = 60.0  # orthanc_timeout_seconds


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class OrthancStore:
    def __init__(self, url: str, username: str | None = None, password: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.url, self.timeout = url, timeout
        self.client = OrthancApiClient(url, user=username, pwd=password)
        # orthanc-api-client passes no timeout to requests, which then waits for ever: an Orthanc
        # that hangs, or a pooled connection a firewall dropped silently, held the worker's job (its
        # lease renewed all the while) until the node restarted. Every request it makes goes through
        # its session's request(); give each one a timeout unless it brings its own.
        session = self.client._http_session
        request = session.request

        def request_with_timeout(method: str, url: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            return request(method, url, **kwargs)

        session.request = request_with_timeout  # type: ignore[method-assign]
        # Orthanc up to 1.12.1 gzips every answer a client accepts gzip for, DICOM files included: on a LAN or loopback
        # that costs ~15x (a 256x256 MR instance 16.5 ms instead of 1.1 ms, bench/originals.py); ask for it as stored
        session.headers["Accept-Encoding"] = "identity"

    def check_reachable(self) -> None:
        try:
            self.client.get_system()
        except HttpError as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} answered HTTP {exc.http_status_code}; check orthanc_url and credentials") from exc
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable (or did not answer within {self.timeout:g} s): {exc}") from exc

    def store(self, instances: Iterable[Dataset | bytes]) -> list[str]:
        """Upload every instance (a data set, or one already encoded in DICOM file format); returns
        Orthanc instance ids. Re-storing the same UIDs replaces, never duplicates (see upload)."""
        ids = []
        for instance in instances:
            try:
                ids.append(str(self.upload(instance if isinstance(instance, bytes) else encode(instance))["ID"]))
            except HttpError as exc:
                raise PacsUnavailable(f"Orthanc at {self.url} refused instance upload: HTTP {exc.http_status_code}") from exc
            except StorageIncomplete:
                raise
            except Exception as exc:
                raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
        return ids

    def upload(self, data: bytes) -> dict[str, Any]:
        """POST one DICOM file to Orthanc; its answer (ID, Status, ParentSeries ...).

        An instance Orthanc already holds with other content is replaced. With Orthanc's default
        (OverwriteInstances false) it keeps its first copy and answers AlreadyStored: an sCT made
        again (after a late MR slice, with another normalisation) kept its old slices, and a
        corrected original sent again stayed uncorrected, both unseen (the instance count was
        right) until 2026-12-05. The copy Orthanc holds is compared by MD5 first, so an identical
        re-send deletes nothing, then by what it says (``dicom_node.digest``): a copy Orthanc took
        from the scanner itself, in another transfer syntax or behind its own File Meta header, is
        the same instance and stays (until 2026-12-06 it was deleted and stored again, a change
        Orthanc's plugins and its stable-series events saw for every original routed)."""
        answer = self.client.post("instances", data=data).json()
        if not isinstance(answer, dict) or answer.get("Status") != "AlreadyStored":
            return answer
        held = self._stored_md5(str(answer["ID"]))
        if held == hashlib.md5(data).hexdigest() or self._says_the_same(str(answer["ID"]), data):
            return answer
        self.client.delete(f"instances/{answer['ID']}")
        answer = self.client.post("instances", data=data).json()
        if answer.get("Status") == "AlreadyStored":  # stored again by someone else in between
            raise StorageIncomplete(f"Orthanc at {self.url} kept another copy of instance {answer.get('ID')} after it was replaced")
        log.info("replaced an instance Orthanc held with other content id=%s", answer.get("ID"))
        return answer

    def _says_the_same(self, instance_id: str, data: bytes) -> bool:
        """Whether the copy Orthanc holds says what ``data`` says (False when either cannot be read)."""
        try:
            held = self.instance_file(instance_id)
            return instance_digest(dcmread(BytesIO(held))) == instance_digest(dcmread(BytesIO(data)))
        except Exception:  # noqa: BLE001 (unreadable, or gone meanwhile: replaced as any other copy)
            return False

    def _stored_md5(self, instance_id: str) -> str | None:
        """The MD5 of the file Orthanc holds (None when it keeps none: StoreMD5ForAttachments off)."""
        try:
            return self.client.get(f"instances/{instance_id}/attachments/dicom/md5").text.strip()
        except HttpError:
            return None

    def series_id(self, series_uid: str) -> str | None:
        """Orthanc's id of a series, None when Orthanc does not hold it."""
        try:
            found = self.client.lookup(series_uid, filter="Series")
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
        return found[0] if found else None

    def series_instance_ids(self, series_uid: str) -> list[str]:
        """Orthanc's instance ids of a series (empty when Orthanc does not hold it)."""
        series_id = self.series_id(series_uid)
        if series_id is None:
            return []
        try:
            return list(self.client.series.get_instances_ids(series_id))
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc

    def remove_others(self, series_uid: str, keep: Iterable[str]) -> tuple[int, int]:
        """Delete the instances of a series that are not among ``keep`` (Orthanc instance ids); how
        many it deleted, and how many of ``keep`` Orthanc holds (for ``verify``, without listing the
        series again). An sCT made again replaces the series: slices an earlier run wrote and this
        one did not (of MR slices that have since left the series) must not stay in it, where a
        planning system would take them for part of it."""
        kept, removed, held = set(keep), 0, 0
        for instance_id in self.series_instance_ids(series_uid):
            if instance_id in kept:
                held += 1
                continue
            try:
                self.client.delete(f"instances/{instance_id}")
            except HttpError as exc:
                if exc.http_status_code == 404:  # gone already
                    continue
                raise PacsUnavailable(f"Orthanc at {self.url} refused to delete a stale instance: HTTP {exc.http_status_code}") from exc
            except Exception as exc:
                raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
            removed += 1
        return removed, held

    def series_files(self, series_uid: str, sop_uids: Iterable[str]) -> dict[str, bytes]:
        """The files of the series' instances ``sop_uids`` that Orthanc holds, by SOP Instance UID
        (one listing of the series, then one download per instance)."""
        wanted = set(sop_uids)
        series_id = self.series_id(series_uid)
        if series_id is None or not wanted:
            return {}
        try:
            listed = self.client.get_json(f"series/{series_id}/instances")
        except HttpError as exc:
            if exc.http_status_code == 404:  # deleted meanwhile
                return {}
            raise PacsUnavailable(f"Orthanc at {self.url} did not list series {series_uid}: HTTP {exc.http_status_code}") from exc
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
        ids = {str(item.get("MainDicomTags", {}).get("SOPInstanceUID", "")): item["ID"] for item in listed}
        return {uid: self.instance_file(ids[uid]) for uid in wanted if uid in ids}

    def instance_file(self, instance_id: str) -> bytes:
        try:
            return self.client.instances.get_file(instance_id)
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc

    def series_instance_count(self, series_uid: str) -> int:
        return len(self.series_instance_ids(series_uid))

    def verify(self, series_uid: str, expected: int, held: int | None = None) -> None:
        """Raise unless Orthanc holds ``expected`` instances of the series (``held``: counted already)."""
        held = self.series_instance_count(series_uid) if held is None else held
        if held != expected:
            raise StorageIncomplete(f"Orthanc holds {held} of {expected} instances of series {series_uid}")

    def study_id(self, study_uid: str) -> str | None:
        try:
            found = self.client.lookup(study_uid, filter="Study")
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
        return found[0] if found else None
