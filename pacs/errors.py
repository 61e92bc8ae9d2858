"""One exception tree for the archive, each class carrying its protocol mappings.

::

    PacsError                       0x0110 processing failure / 500
    ├── InvalidInstance             0xC000 cannot understand   / 400
    │   ├── InvalidUID              0xC000                     / 400
    │   ├── StudyMismatch           0xA900 not of the study named / 409
    │   └── IdentityConflict        0xA900 study/series of another patient/study / 409
    │       ├── PatientConflict
    │       └── SeriesConflict
    ├── SOPClassMismatch            0xA900 does not match SOP class / 400
    ├── InvalidQuery                0xA900 identifier does not match / 400
    │   └── QueryTooLarge           0xA700 out of resources    / 400
    ├── DuplicateRejected           0x0111 duplicate SOP instance   / 409
    ├── InstanceTooLarge            0xA700 out of resources    / 413
    ├── StorageFailure              0xA700 out of resources    / 507
    ├── IndexFailure                0xA700 out of resources    / 503
    ├── NotFound                    0xC000 unable to process   / 404
    │   ├── NoSuchFrame             0xC000                     / 404
    │   └── SourceGone              0xC000 a report's images were deleted / 404
    ├── NotAcceptable               0x0110 (HTTP only in practice) / 406
    │   └── UndecodablePixels       0x0110 no decoder or corrupt pixels / 406
    ├── MalformedRequest            0xC000 cannot understand   / 400
    ├── RequestTooLarge             0xA700 out of resources    / 413
    ├── RequestTimedOut             0xA700 out of resources    / 408
    ├── AnswerTimedOut              0xA700 out of resources    / 503
    ├── TooBusy                     0xA700 out of resources    / 503
    ├── UnsupportedMediaType        0xC000 cannot understand   / 415
    ├── ArchiveInUse                (at start: another server holds the archive)
    ├── Unauthenticated             0x0124 not authorized      / 401
    └── Forbidden                   0x0124 not authorized      / 403

The DIMSE adapters answer ``exc.dimse_status``; the HTTP layer answers
``exc.http_status`` with ``str(exc)`` as the reason. Nothing else maps errors.
"""

from __future__ import annotations

from typing import ClassVar

from pacs.status import StoreStatus


class PacsError(Exception):
    """Root of every error the archive reports to a peer."""

    dimse_status: ClassVar[int] = StoreStatus.PROCESSING_FAILURE
    http_status: ClassVar[int] = 500


class InvalidInstance(PacsError):
    """The bytes are not a DICOM data set we can index (unparseable, missing keys)."""

    dimse_status = StoreStatus.CANNOT_UNDERSTAND
    http_status = 400


class InvalidUID(InvalidInstance):
    """A UID is missing or not a valid UID (PS3.5 9.1: digits and dots, at most 64)."""


class StudyMismatch(InvalidInstance):
    """STOW-RS to ``/studies/{study}`` with an instance of another study."""

    dimse_status = StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    http_status = 409


class IdentityConflict(InvalidInstance):
    """The instance names a study or series that the archive holds for someone else."""

    dimse_status = StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    http_status = 409


class PatientConflict(IdentityConflict):
    """The study it names is another patient's (PatientID, or both name and birth date)."""


class SeriesConflict(IdentityConflict):
    """The series it names belongs to another study."""


class SOPClassMismatch(PacsError):
    """The data set's SOP Class UID differs from the one the peer announced."""

    dimse_status = StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    http_status = 400


class InvalidQuery(PacsError):
    """A query key or level the matching rules cannot accept (C-FIND, QIDO-RS)."""

    dimse_status = StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    http_status = 400


class QueryTooLarge(InvalidQuery):
    """A query asking for more attributes, or an answer larger, than the server gives."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 400


class DuplicateRejected(PacsError):
    """Same SOP Instance UID, different bytes, and the policy keeps the first copy."""

    dimse_status = StoreStatus.DUPLICATE_SOP_INSTANCE
    http_status = 409


class InstanceTooLarge(PacsError):
    """A data set beyond max_instance_bytes (after inflation, for a deflated one)."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 413


class StorageFailure(PacsError):
    """The blob could not be written durably (disk full, I/O error)."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 507


class IndexFailure(PacsError):
    """The index could not commit the instance (database unavailable or locked too long)."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 503


class NotFound(PacsError):
    """The study, series, instance or value a request names is not in the archive."""

    dimse_status = StoreStatus.CANNOT_UNDERSTAND
    http_status = 404


class SourceGone(NotFound):
    """A derived object (a report) whose source instances were deleted meanwhile."""


class NoSuchFrame(NotFound):
    """A frame number outside 1..NumberOfFrames, or an instance without pixel data."""


class NotAcceptable(PacsError):
    """Nothing the requester accepts can be produced for the resource."""

    http_status = 406


class UndecodablePixels(NotAcceptable):
    """The stored pixel data cannot be decoded here (no decoder for it, or corrupt)."""


class MalformedRequest(PacsError):
    """A request that cannot be parsed: a broken multipart body, a bad parameter value."""

    dimse_status = StoreStatus.CANNOT_UNDERSTAND
    http_status = 400


class RequestTooLarge(PacsError):
    """A request body beyond the configured maximum; refused before it is read."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 413


class RequestTimedOut(PacsError):
    """The request body did not arrive within the request time limit."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 408


class TooBusy(PacsError):
    """More requests of a kind at once than the server takes; the client may retry."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 503


class AnswerTimedOut(PacsError):
    """The answer could not begin within the request time limit."""

    dimse_status = StoreStatus.OUT_OF_RESOURCES
    http_status = 503


class UnsupportedMediaType(PacsError):
    """A request body of a media type the service does not take."""

    dimse_status = StoreStatus.CANNOT_UNDERSTAND
    http_status = 415


class ArchiveInUse(PacsError):
    """Another server process holds the archive (its data folder or its index)."""


class Unauthenticated(PacsError):
    """No credentials, or credentials that are not valid."""

    dimse_status = StoreStatus.NOT_AUTHORIZED
    http_status = 401


class Forbidden(PacsError):
    """Valid credentials without the scope the action needs; ``who`` they name."""

    dimse_status = StoreStatus.NOT_AUTHORIZED
    http_status = 403

    def __init__(self, message: str, who: str = "") -> None:
        super().__init__(message)
        self.who = who
