"""STOW-RS (PS3.18 10.5): a multipart body of DICOM files into :meth:`Archive.ingest`.

Parts are spooled to temporary files while the body arrives and each is ingested as
soon as it is complete, so a large upload is neither held in memory nor parsed twice.
Each instance succeeds or fails on its own; the answer lists both, with the failure
reason being the DICOM status of the archive error (PS3.18 table 10.5.3-2).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicomweb import media
from dicomweb.audit import request_actor
from dicomweb.multipart import ReceivedPart, media_params, parse
from pacs.archive import Archive, InstanceSource, Origin
from pacs.audit import Actor, AuditEvent, Outcome
from pacs.errors import (
    MalformedRequest,
    PacsError,
    RequestTooLarge,
    TooBusy,
    UnsupportedMediaType,
)
from pacs.index import InstanceRecord
from pacs.status import StoreStatus
from pacs.uids import require_uid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    SOPClassUID: str
    SOPInstanceUID: str
    FailureReason: int
    reason: str


def _sequence(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def response_body(
    stored: list[InstanceRecord],
    failed: list[Failure],
    instance_url: Callable[[InstanceRecord], str],
    study_url: str | None,
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 table 10.5.3-3) as DICOM JSON."""
    referenced = [
        {
            "00081150": {"vr": "UI", "Value": [r.SOPClassUID]},
            "00081155": {"vr": "UI", "Value": [r.SOPInstanceUID]},
            "00081190": {"vr": "UR", "Value": [instance_url(r)]},
        }
        for r in stored
    ]
    failures = [
        {
            "00081150": {"vr": "UI", "Value": [f.SOPClassUID]} if f.SOPClassUID else {"vr": "UI"},
            "00081155": (
                {"vr": "UI", "Value": [f.SOPInstanceUID]} if f.SOPInstanceUID else {"vr": "UI"}
            ),
            "00081197": {"vr": "US", "Value": [f.FailureReason]},
        }
        for f in failed
    ]
    body: dict[str, Any] = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
        "00081198": _sequence(failures),
        "00081199": _sequence(referenced),
    }
    if study_url is not None:
        body["00081190"] = {"vr": "UR", "Value": [study_url]}
    return dict(sorted(body.items()))


def http_status(stored: int, failed: int) -> int:
    """PS3.18 10.5.3: all stored 200, some 202, none 409."""
    if failed == 0:
        return 200
    return 202 if stored else 409


def _boundary(content_type: str) -> str:
    kind, params = media_params(content_type)
    if kind != media.MULTIPART:
        raise UnsupportedMediaType(
            f'STOW-RS takes multipart/related; type="application/dicom", not {kind or "nothing"}'
        )
    part_type = params.get("type", media.DICOM).lower()
    if part_type != media.DICOM:
        raise UnsupportedMediaType(
            f"parts of type {part_type} are not supported; send application/dicom files"
        )
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise MalformedRequest("the multipart/related Content-Type has no valid boundary")
    return boundary


def stow_router(archive: Archive, *, max_bytes: int, max_uploads: int = 16) -> APIRouter:
    """``max_uploads``: STOW-RS requests received at a time; more get 503 at once."""
    router = APIRouter()
    uploads = threading.BoundedSemaphore(max_uploads)

    def store_part(part: ReceivedPart, study: str | None, actor: Actor) -> InstanceRecord | Failure:
        """One instance, audited on its own as a C-STORE is (who, from where, which study,
        the outcome and the reason)."""
        sop_class = sop_instance = ""
        try:
            kind, _ = media_params(part.content_type or media.DICOM)
            if kind != media.DICOM:
                raise UnsupportedMediaType(f"a part of type {kind} is not an application/dicom")
            source = InstanceSource.from_part10(part.body)
            sop_class = source.meta.MediaStorageSOPClassUID
            sop_instance = source.meta.MediaStorageSOPInstanceUID
            outcome = archive.ingest(source, Origin.STOW, StudyInstanceUID=study)
        except PacsError as exc:
            log.info("STOW-RS refused %s: %s", sop_instance or "a part", exc)
            archive.audit.record(
                AuditEvent.STORE,
                actor,
                Outcome.MINOR_FAILURE,
                StudyInstanceUID=study or "",
                detail=f"STOW-RS {sop_instance} refused: {exc}",
            )
            return Failure(sop_class, sop_instance, exc.dimse_status, str(exc))
        except Exception:
            log.exception("STOW-RS failed to store %s", sop_instance or "a part")
            archive.audit.record(
                AuditEvent.STORE, actor, Outcome.SERIOUS_FAILURE, detail="STOW-RS internal error"
            )
            failure = StoreStatus.PROCESSING_FAILURE
            return Failure(sop_class, sop_instance, failure, "processing failure")
        finally:
            part.body.close()
        archive.audit.record(
            AuditEvent.STORE,
            actor,
            Outcome.SUCCESS,
            StudyInstanceUID=outcome.record.StudyInstanceUID,
            detail="; ".join(
                (f"STOW-RS {outcome.record.SOPInstanceUID} {outcome.action}", *outcome.notes)
            ),
        )
        return outcome.record

    async def store(request: Request, study: str | None) -> Response:
        if study is not None:
            require_uid(study, "StudyInstanceUID")
        boundary = _boundary(request.headers.get("content-type", ""))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise RequestTooLarge(f"the request body exceeds the maximum of {max_bytes} bytes")
        stored: list[InstanceRecord] = []
        failed: list[Failure] = []
        actor = request_actor(request)
        if not uploads.acquire(blocking=False):
            raise TooBusy(f"{max_uploads} STOW-RS requests are being received; send again shortly")
        try:
            parts = parse(
                request.stream(), boundary, max_bytes=max_bytes, spool_dir=archive.store.staging
            )
            async for part in parts:
                result = await run_in_threadpool(store_part, part, study, actor)
                if isinstance(result, Failure):
                    failed.append(result)
                else:
                    stored.append(result)
        except ClientDisconnect:
            # The sender went away: what it sent whole is stored (and audited, each);
            # nobody is left to answer.
            request.state.audit_note = (
                f"client went away; {len(stored)} stored, {len(failed)} refused before"
            )
            log.info("STOW-RS sender went away after %d instance(s)", len(stored))
            return Response(status_code=400)
        finally:
            uploads.release()
        if not stored and not failed:
            raise MalformedRequest("the request holds no instances")

        def instance_url(record: InstanceRecord) -> str:
            base = str(request.url_for("retrieve_study", study=record.StudyInstanceUID))
            return f"{base}/series/{record.SeriesInstanceUID}/instances/{record.SOPInstanceUID}"

        studies = {r.StudyInstanceUID for r in stored}
        target = study or (studies.pop() if len(studies) == 1 else None)
        study_url = str(request.url_for("retrieve_study", study=target)) if target else None
        headers = {}
        if failed:
            first = failed[0]
            headers["Warning"] = f'299 filmless "{_header_text(first.reason)}"'
        return JSONResponse(
            response_body(stored, failed, instance_url, study_url),
            status_code=http_status(len(stored), len(failed)),
            media_type=media.DICOM_JSON,
            headers=headers,
        )

    @router.post("/studies")
    async def store_instances(request: Request) -> Response:
        return await store(request, None)

    @router.post("/studies/{study}")
    async def store_study_instances(request: Request, study: str) -> Response:
        return await store(request, study)

    return router


def _header_text(reason: str) -> str:
    """A reason safe inside a quoted HTTP header value."""
    text = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else " " for c in reason)
    return text[:200]
