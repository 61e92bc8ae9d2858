"""Status data sets as every DIMSE service returns them: a code and, for failures, why."""

from __future__ import annotations

from pydicom.dataset import Dataset

_MAX_COMMENT = 64  # Error Comment is LO


def status_dataset(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment.replace("\\", "/")[:_MAX_COMMENT]
    return status
