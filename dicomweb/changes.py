"""``GET /changes``: the archive's change log for outside systems (a RIS, a data lake).

As Orthanc's ``/changes``: ``since`` is the last ``seq`` the caller has seen, ``limit``
how many changes it wants at most; the answer holds the changes in order, the ``last``
``seq`` it reached (the caller's next ``since``) and ``done``, true when nothing newer
was there. A caller that keeps its own ``last`` durably sees every change once, in the
order the archive committed them, whatever restarts on either side. Needs the ``read``
scope when the API takes tokens, like every DICOMweb route.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pacs.changes import ChangeLog
from pacs.errors import InvalidQuery
from pacs.index import Index

CHANGES_PATH = "/changes"
MAX_LIMIT = 10_000


def changes_router(index: Index) -> APIRouter:
    router = APIRouter()
    log = ChangeLog(index)

    @router.get(CHANGES_PATH)
    def changes(request: Request) -> JSONResponse:
        """The changes after ``since`` (the last seq seen, default 0), at most ``limit``
        of them (default 100, at most 10,000)."""
        since = _count(request, "since", 0, low=0, high=2**63 - 1)
        limit = _count(request, "limit", 100, low=1, high=MAX_LIMIT)
        found = log.since(since, limit)
        last = found[-1].seq if found else max(since, 0)
        # Done when this page was not full: nothing newer was committed when it was read.
        done = len(found) < limit
        return JSONResponse({"changes": [c.as_json() for c in found], "last": last, "done": done})

    return router


def _count(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    given = request.query_params.getlist(name)
    if not given:
        return default
    text = given[0]
    plain = len(given) == 1 and 0 < len(text) <= 19 and text.isascii() and text.isdigit()
    if not plain or not low <= int(text) <= high:
        raise InvalidQuery(f"{name} must be one whole number from {low} to {high}")
    return int(text)
