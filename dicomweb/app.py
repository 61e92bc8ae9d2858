"""The DICOMweb application: a FastAPI app over one :class:`~pacs.archive.Archive`.

Errors are :class:`~pacs.errors.PacsError` subclasses mapped once, here, to their HTTP
status with the reason in the body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dicomweb.qido import Search, parse_search, to_dicom_json
from pacs.archive import Archive
from pacs.errors import PacsError
from pacs.query import Level, compile_query

DICOM_JSON = "application/dicom+json"


def create_app(
    archive: Archive, *, base_path: str = "/dicom-web", max_results: int = 10000
) -> FastAPI:
    app = FastAPI(title="filmless DICOMweb", version="0.1.0")

    @app.exception_handler(PacsError)
    async def _pacs_error(_request: Request, exc: PacsError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"error": str(exc)})

    def search(request: Request, level: Level, **uids: str) -> Response:
        parsed = parse_search(level, list(request.query_params.multi_items()), **uids)
        # At most max_results per request; one more row tells whether there are others.
        limit = min(parsed.limit if parsed.limit is not None else max_results, max_results)
        # Run the query before answering, so that a database error is a proper status.
        with archive.index.reading() as conn:
            statement = compile_query(parsed.query, limit=limit + 1, offset=parsed.offset)
            rows = [dict(row) for row in conn.execute(statement).mappings()]
        headers = {}
        if len(rows) > limit and (parsed.limit is None or parsed.limit > max_results):
            # PS3.18 8.3.4.4.1: say that the answer was cut and how to get the rest.
            headers["Warning"] = (
                "299 filmless: The number of results exceeded the maximum supported by the "
                "server. Additional results can be requested."
            )
        base = str(request.base_url).rstrip("/") + base_path
        return StreamingResponse(
            _json_array(rows[:limit], parsed, level, base),
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

    return app


def _json_array(
    rows: list[dict[str, object]], parsed: Search, level: Level, base: str
) -> Iterator[bytes]:
    yield b"["
    for n, row in enumerate(rows):
        if n:
            yield b","
        yield json.dumps(to_dicom_json(row, parsed.return_keys, level, base)).encode()
    yield b"]"
