"""The DICOMweb application: a FastAPI app over one :class:`~pacs.archive.Archive`.

QIDO-RS lives here; WADO-RS and STOW-RS are routers of their own, DELETE is here.
Errors are :class:`~pacs.errors.PacsError` subclasses mapped once, here, to their HTTP
status with the reason in the body. JSON answers are gzipped when the client takes it;
pixel data and multipart bodies are not (they are compressed already or too large to
be worth the CPU).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES

from dicomweb.audit import AuditRequests
from dicomweb.auth import ApiToken, BearerAuth, OidcVerifier
from dicomweb.changes import CHANGES_PATH, changes_router
from dicomweb.deadline import RequestDeadline
from dicomweb.hosts import LOOPBACK_NAMES, HostCheck
from dicomweb.media import DICOM_JSON
from dicomweb.qido import Search, parse_search, to_dicom_json
from dicomweb.stow import stow_router
from dicomweb.viewer import viewer_router
from dicomweb.wado import wado_router
from dicomweb.wado_uri import wado_uri_router
from pacs.archive import Archive
from pacs.errors import PacsError, QueryTooLarge
from pacs.query import MAX_QUERY_KEYS, Level, execute

_NOT_GZIPPED = (*DEFAULT_EXCLUDED_CONTENT_TYPES, "multipart/*", "image/*", "application/dicom")


def create_app(
    archive: Archive,
    *,
    base_path: str = "/dicom-web",
    max_results: int = 10000,
    max_request_bytes: int = 1 << 31,
    cors_origins: Sequence[str] = (),
    viewer_dir: Path | None = None,
    viewer_missing: str = "",
    api_tokens: Sequence[ApiToken] = (),
    oidc: OidcVerifier | None = None,
    request_timeout: float = 300.0,
    case_insensitive_names: bool = True,
    allowed_hosts: Sequence[str] = LOOPBACK_NAMES,
    max_uploads: int = 16,
    max_query_keys: int = MAX_QUERY_KEYS,
    max_answer_bytes: int = 64 << 20,
) -> FastAPI:
    """``cors_origins``: origins of other sites allowed to call the API from a browser
    (``*`` for any); empty keeps the same-origin policy, which the bundled viewer needs.
    ``viewer_dir``: the web viewer's files, served at /viewer/ (``viewer_missing`` is
    the answer while they are not there). ``api_tokens`` and ``oidc``: when given, every
    API route needs one of the tokens or an OIDC access token (the viewer's static files
    do not: they hold no patient data). ``request_timeout``: see :mod:`dicomweb.deadline`.
    ``case_insensitive_names``: person names match without regard to case and accents
    even without ``fuzzymatching=true``. ``allowed_hosts``: the Host names answered
    (``*`` for any), see :mod:`dicomweb.hosts`."""
    # /docs and /redoc load Swagger UI and ReDoc from this server: they work offline.
    app = FastAPIOffline(title="filmless DICOMweb", version="0.1.0", static_url="/docs-static")
    app.add_middleware(GZipMiddleware, minimum_size=1024, exclude_content_types=_NOT_GZIPPED)
    if api_tokens or oidc is not None:
        app.add_middleware(
            BearerAuth, tokens=list(api_tokens), prefixes=(base_path, CHANGES_PATH), oidc=oidc
        )
    app.add_middleware(RequestDeadline, seconds=request_timeout)
    app.add_middleware(AuditRequests, audit=archive.audit, prefix=base_path, also=(CHANGES_PATH,))
    # Outermost: a request for another host name is refused before anything else runs.
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["Content-Location", "ETag", "Last-Modified", "Warning"],
        )

    @app.exception_handler(PacsError)
    async def _pacs_error(_request: Request, exc: PacsError) -> JSONResponse:
        # 503 is temporary (RFC 9110 15.6.4): say when to come back.
        headers = {"Retry-After": "1"} if exc.http_status == 503 else None
        return JSONResponse(
            status_code=exc.http_status, content={"error": str(exc)}, headers=headers
        )

    def search(
        request: Request,
        level: Level,
        StudyInstanceUID: str | None = None,
        SeriesInstanceUID: str | None = None,
    ) -> Response:
        parsed = parse_search(
            level,
            list(request.query_params.multi_items()),
            StudyInstanceUID=StudyInstanceUID,
            SeriesInstanceUID=SeriesInstanceUID,
            case_insensitive_names=case_insensitive_names,
            max_keys=max_query_keys,
        )
        # At most max_results per request; one more row tells whether there are others.
        limit = min(parsed.limit if parsed.limit is not None else max_results, max_results)
        # Run the query before answering, so that a database error is a proper status.
        with archive.index.reading() as conn:
            rows = list(execute(conn, parsed.query, limit=limit + 1, offset=parsed.offset))
        headers = {}
        if len(rows) > limit:
            # PS3.18 8.3.4.4.1: say that the answer was cut and how to get the rest.
            headers["Warning"] = (
                "299 filmless: There are more matches than returned; request them with "
                f"offset={parsed.offset + limit}"
            )
        base = str(request.base_url).rstrip("/") + base_path
        # At most max_results rows: one body built at once beats a chunk (and a thread
        # hop) per match.
        return Response(
            _json_array(rows[:limit], parsed, level, base, max_answer_bytes),
            media_type=DICOM_JSON,
            status_code=200,
            headers=headers,
        )

    @app.get(f"{base_path}/studies")
    def search_studies(request: Request) -> Response:
        return search(request, Level.STUDY)

    @app.get(f"{base_path}/studies/{{study}}/series")
    def search_study_series(request: Request, study: str) -> Response:
        return search(request, Level.SERIES, StudyInstanceUID=study)

    @app.get(f"{base_path}/series")
    def search_series(request: Request) -> Response:
        return search(request, Level.SERIES)

    @app.get(f"{base_path}/studies/{{study}}/series/{{series}}/instances")
    def search_series_instances(request: Request, study: str, series: str) -> Response:
        return search(request, Level.IMAGE, StudyInstanceUID=study, SeriesInstanceUID=series)

    @app.get(f"{base_path}/studies/{{study}}/instances")
    def search_study_instances(request: Request, study: str) -> Response:
        return search(request, Level.IMAGE, StudyInstanceUID=study)

    @app.get(f"{base_path}/instances")
    def search_instances(request: Request) -> Response:
        return search(request, Level.IMAGE)

    @app.delete(f"{base_path}/studies/{{study}}", status_code=204)
    def delete_study(study: str) -> Response:
        return remove(study)

    @app.delete(f"{base_path}/studies/{{study}}/series/{{series}}", status_code=204)
    def delete_series(study: str, series: str) -> Response:
        return remove(study, series)

    @app.delete(
        f"{base_path}/studies/{{study}}/series/{{series}}/instances/{{instance}}",
        status_code=204,
    )
    def delete_instance(study: str, series: str, instance: str) -> Response:
        return remove(study, series, instance)

    def remove(study: str, series: str | None = None, instance: str | None = None) -> Response:
        archive.delete(study, series, instance)
        return Response(status_code=204)

    app.include_router(changes_router(archive.index))
    app.include_router(wado_router(archive), prefix=base_path)
    app.include_router(wado_uri_router(archive), prefix=base_path)
    app.include_router(
        stow_router(archive, max_bytes=max_request_bytes, max_uploads=max_uploads),
        prefix=base_path,
    )
    if viewer_dir is not None:
        app.include_router(viewer_router(viewer_dir, missing=viewer_missing))
    return app


def _json_array(
    rows: list[dict[str, object]], parsed: Search, level: Level, base: str, max_bytes: int
) -> bytes:
    """The answer, one match at a time, refused (400) once it grows past ``max_bytes``."""
    body = bytearray(b"[")
    for n, row in enumerate(rows):
        match = json.dumps(
            to_dicom_json(row, parsed.return_keys, level, base), separators=(",", ":")
        )
        body += (b"," if n else b"") + match.encode()
        if len(body) > max_bytes:
            raise QueryTooLarge(
                f"the answer would be larger than {max_bytes} bytes (max_answer_bytes): ask "
                "for fewer attributes, or fewer matches with limit"
            )
    body += b"]"
    return bytes(body)
