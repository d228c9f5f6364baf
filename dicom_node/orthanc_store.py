"""Client code for Orthanc (kept out of any module named ``orthanc``, which Orthanc's plugin owns)."""

from __future__ import annotations

import logging
from io import BytesIO

from orthanc_api_client import OrthancApiClient
from orthanc_api_client.exceptions import HttpError
from pydicom.dataset import Dataset

from synthesis.errors import PacsUnavailable, StorageIncomplete

log = logging.getLogger(__name__)


def encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class OrthancStore:
    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        self.url = url
        self.client = OrthancApiClient(url, user=username, pwd=password)

    def check_reachable(self) -> None:
        try:
            self.client.get_system()
        except HttpError as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} answered HTTP {exc.http_status_code}; check orthanc_url and credentials") from exc
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc

    def store(self, datasets: list[Dataset]) -> list[str]:
        """Upload every data set; returns Orthanc instance ids. Re-storing the same UIDs replaces, never duplicates."""
        ids = []
        for ds in datasets:
            try:
                ids.extend(self.client.upload(encode(ds)))
            except HttpError as exc:
                raise PacsUnavailable(f"Orthanc at {self.url} refused instance upload: HTTP {exc.http_status_code}") from exc
            except Exception as exc:
                raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc
        return ids

    def series_instance_count(self, series_uid: str) -> int:
        try:
            found = self.client.lookup(series_uid, filter="Series")
            if not found:
                return 0
            return len(self.client.series.get_instances_ids(found[0]))
        except Exception as exc:
            raise PacsUnavailable(f"Orthanc at {self.url} is not reachable: {exc}") from exc

    def verify(self, series_uid: str, expected: int) -> None:
        held = self.series_instance_count(series_uid)
        if held != expected:
            raise StorageIncomplete(f"Orthanc holds {held} of {expected} instances of series {series_uid}")

    def study_id(self, study_uid: str) -> str | None:
        found = self.client.lookup(study_uid, filter="Study")
        return found[0] if found else None
