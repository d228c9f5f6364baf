"""One error vocabulary for the whole project.

The SCP maps these to DICOM statuses, the API to HTTP codes; every message says
what was wrong and what to do about it.
"""


class Mr2ctError(Exception):
    """Base class of every error mr2ct raises on purpose."""


class InvalidInstance(Mr2ctError):
    """A received DICOM instance cannot be accepted."""


class SeriesNotUsable(Mr2ctError):
    """A series cannot be assembled into a volume (mixed sizes, orientations...)."""


class ModelMismatch(Mr2ctError):
    """A model file and its card disagree, or the card is unusable."""


class PacsUnavailable(Mr2ctError):
    """Orthanc (or another PACS) cannot be reached or refused the request."""


class StorageIncomplete(Mr2ctError):
    """Orthanc does not hold every instance that was stored into it."""


class Stopped(Mr2ctError):
    """Work stopped on request: a job cancelled while it ran (or no longer this worker's)."""
