"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data, frames, rendered and thumbnails.

Everything is read from the blob store through :mod:`pacs.pixels`; answers are streamed
one part at a time. Negotiation happens before the first byte is sent, so a request that
cannot be served gets its 406 or 404, never a truncated multipart body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC
from email.utils import format_datetime, parsedate_to_datetime
from typing import IO

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.uid import UID

from dicomweb import media
from dicomweb.metadata import bulk_value, instance_json, parse_path
from dicomweb.multipart import Part, encode, multipart_type, new_boundary
from dicomweb.rendered import THUMBNAIL_SIZE, RenderParams, Viewport, parse_params, render
from pacs.archive import Archive
from pacs.errors import MalformedRequest, NoSuchFrame, NotAcceptable, UndecodablePixels
from pacs.index import InstanceRecord
from pacs.pixels import (
    PIXEL_DATA,
    check_pixels,
    native_frame,
    read_image,
    stored_frame,
    transcode,
)

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_SPOOL_IN_MEMORY = 8 << 20
_THUMBNAIL_CANDIDATES = 16


def _file_chunks(archive: Archive, record: InstanceRecord) -> Iterator[bytes]:
    with archive.open(record) as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk


Plan = tuple[InstanceRecord, str, IO[bytes] | None]


def _plan(archive: Archive, record: InstanceRecord, choice: media.InstanceChoice) -> Plan:
    """How one instance is sent, decided before the first byte of the answer: as stored,
    or transcoded now into a spool file (memory up to a few MB, then disk), falling back
    to the next acceptable syntax when the pixels cannot be decoded (PS3.18 8.7.3.5.2:
    406 when none of them can be produced)."""
    reasons = []
    for syntax in choice.candidates(record.TransferSyntaxUID):
        if syntax == record.TransferSyntaxUID:
            return record, syntax, None
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        try:
            with archive.open_parsed(record) as stream:
                spool.write(transcode(stream, UID(syntax)))
        except UndecodablePixels as exc:
            spool.close()
            reasons.append(str(exc))
            continue
        spool.seek(0)
        return record, syntax, spool
    raise NotAcceptable(
        f"instance {record.SOPInstanceUID} is stored as {record.TransferSyntaxUID} and none "
        "of the accepted transfer syntaxes can be produced from it"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + "; accept transfer-syntax=* to receive it as stored"
    )


def _spooled(body: IO[bytes]) -> Iterator[bytes]:
    while chunk := body.read(_CHUNK):
        yield chunk


def _close(plans: list[Plan]) -> None:
    for _record, _syntax, body in plans:
        if body is not None:
            body.close()


def validators(records: Sequence[InstanceRecord], variant: str) -> dict[str, str]:
    """ETag and Last-Modified from what the index already holds: content hashes and times.

    ``variant`` names the representation (resource kind, negotiated syntax, parameters),
    so two representations of the same instances never share an ETag.
    """
    digest = hashlib.sha256(variant.encode())
    for record in records:
        digest.update(record.sha256.encode("ascii"))
    newest = max(r.received_at for r in records).astimezone(UTC)
    return {
        "ETag": f'"{digest.hexdigest()[:32]}"',
        "Last-Modified": format_datetime(newest.replace(microsecond=0), usegmt=True),
    }


def not_modified(request: Request, headers: dict[str, str]) -> Response | None:
    """A 304 when the client's copy is current (RFC 9110 13.1.2, 13.1.3)."""
    match = request.headers.get("if-none-match")
    if match is not None:
        tags = {t.strip().removeprefix("W/") for t in match.split(",")}
        if "*" in tags or headers["ETag"] in tags:
            return Response(status_code=304, headers=headers)
        return None
    since = request.headers.get("if-modified-since")
    if since:
        try:
            then = parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return None
        if parsedate_to_datetime(headers["Last-Modified"]) <= then:
            return Response(status_code=304, headers=headers)
    return None


def _ranges(request: Request) -> list[media.MediaRange]:
    return media.requested(request.headers.get("accept"), request.query_params.get("accept"))


def _check_params(request: Request, allowed: set[str]) -> None:
    for name in request.query_params:
        if name not in allowed:
            raise MalformedRequest(f"unknown query parameter {name!r}")


def _frame_numbers(text: str) -> list[int]:
    numbers = []
    for raw in text.split(","):
        part = raw.strip()
        if not part.isascii() or not part.isdigit() or len(part) > 9 or int(part) < 1:
            raise MalformedRequest(
                f"frame list {text[:80]!r} must be positive integers, like 1,2,3"
            )
        numbers.append(int(part))
    return numbers


def wado_router(archive: Archive) -> APIRouter:
    router = APIRouter()

    records = archive.records

    def instance_url(request: Request, record: InstanceRecord) -> str:
        base = str(request.url_for("retrieve_study", study=record.StudyInstanceUID))
        return f"{base}/series/{record.SeriesInstanceUID}/instances/{record.SOPInstanceUID}"

    # -- instances ---------------------------------------------------------------------

    def retrieve(request: Request, found: list[InstanceRecord]) -> Response:
        _check_params(request, {"accept"})
        choice = media.choose_instances(_ranges(request))
        plans = [_plan(archive, record, choice) for record in found]
        syntaxes = [syntax for _record, syntax, _body in plans]
        headers = validators(found, "instances " + ",".join(syntaxes))
        if (cached := not_modified(request, headers)) is not None:
            _close(plans)
            return cached
        transcoded = sum(body is not None for _r, _s, body in plans)
        if transcoded:
            request.state.audit_note = f"{transcoded} of {len(plans)} instance(s) transcoded"

        def parts() -> Iterator[Part]:
            try:
                for record, syntax, body in plans:
                    chunks = _file_chunks(archive, record) if body is None else _spooled(body)
                    yield Part(media.content_type(media.DICOM, syntax), chunks)
            finally:
                _close(plans)

        boundary = new_boundary()
        return StreamingResponse(
            encode(boundary, parts()),
            media_type=multipart_type(media.DICOM, boundary),
            headers=headers,
        )

    @router.get("/studies/{study}", name="retrieve_study")
    def retrieve_study(request: Request, study: str) -> Response:
        return retrieve(request, records(study))

    @router.get("/studies/{study}/series/{series}")
    def retrieve_series(request: Request, study: str, series: str) -> Response:
        return retrieve(request, records(study, series))

    @router.get("/studies/{study}/series/{series}/instances/{instance}")
    def retrieve_instance(request: Request, study: str, series: str, instance: str) -> Response:
        return retrieve(request, records(study, series, instance))

    # -- metadata ----------------------------------------------------------------------

    def metadata(request: Request, found: list[InstanceRecord]) -> Response:
        _check_params(request, {"accept"})
        for r in _ranges(request):
            if r.type in (media.DICOM_JSON, "application/json", "*/*", "application/*"):
                break
        else:
            raise NotAcceptable("metadata is available as application/dicom+json")
        headers = validators(found, "metadata " + str(request.base_url))
        if (cached := not_modified(request, headers)) is not None:
            return cached

        def array() -> Iterator[bytes]:
            yield b"["
            for n, record in enumerate(found):
                yield (b"," if n else b"") + json.dumps(entry(record)).encode()
            yield b"]"

        def entry(record: InstanceRecord) -> dict[str, object]:
            """One instance's metadata; one whose header cannot be read any more is
            named by its UIDs, so that the rest of the study is still answered whole."""
            try:
                with archive.open_parsed(record) as stream:
                    return instance_json(read_image(stream), instance_url(request, record))
            except Exception:
                log.exception("metadata of %s cannot be read", record.SOPInstanceUID)
                return {
                    "00080016": {"vr": "UI", "Value": [record.SOPClassUID]},
                    "00080018": {"vr": "UI", "Value": [record.SOPInstanceUID]},
                    "0020000D": {"vr": "UI", "Value": [record.StudyInstanceUID]},
                    "0020000E": {"vr": "UI", "Value": [record.SeriesInstanceUID]},
                }

        return StreamingResponse(array(), media_type=media.DICOM_JSON, headers=headers)

    @router.get("/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> Response:
        return metadata(request, records(study))

    @router.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> Response:
        return metadata(request, records(study, series))

    @router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
    def instance_metadata(request: Request, study: str, series: str, instance: str) -> Response:
        return metadata(request, records(study, series, instance))

    # -- frames and bulk data ----------------------------------------------------------

    def frames(request: Request, record: InstanceRecord, numbers: list[int] | None) -> Response:
        _check_params(request, {"accept"})
        choice = media.choose_frames(_ranges(request))
        picked = choice.for_stored(record.TransferSyntaxUID)
        if picked is None:
            raise NotAcceptable(
                f"the frames are stored as {record.TransferSyntaxUID}; none of the accepted "
                "media types and transfer syntaxes can be produced from it"
            )
        part_type, syntax = picked
        with archive.open_parsed(record) as stream:
            image = read_image(stream)
            if not image.has_pixels:
                raise NoSuchFrame(f"instance {record.SOPInstanceUID} has no pixel data")
            # Before any list of frames is made or a frame is read: a frame count that the
            # pixel data does not bear out, a frame too large to decode.
            check_pixels(image, stream)
        wanted = numbers or list(range(1, image.number_of_frames + 1))
        if len(wanted) > image.number_of_frames:
            # Each listed frame is a part of the answer: a list longer than the instance
            # (frame 1 five thousand times) would multiply it.
            raise MalformedRequest(
                f"{len(wanted)} frames asked for; the instance has {image.number_of_frames}"
            )
        for number in wanted:
            if number > image.number_of_frames:
                raise NoSuchFrame(
                    f"frame {number} does not exist (NumberOfFrames {image.number_of_frames})"
                )
        as_stored = syntax == record.TransferSyntaxUID
        headers = validators([record], f"frames {wanted} {syntax}")
        if (cached := not_modified(request, headers)) is not None:
            return cached

        read = stored_frame if as_stored else native_frame
        # The first frame is read before answering: a frame that cannot be located or
        # decoded is an error status, not a response cut off after its headers.
        with archive.open_parsed(record) as stream:
            first = read(stream, image, wanted[0] - 1)

        def parts() -> Iterator[Part]:
            yield Part(media.content_type(part_type, syntax), [first])
            with archive.open_parsed(record) as stream:
                for number in wanted[1:]:
                    data = read(stream, image, number - 1)
                    yield Part(media.content_type(part_type, syntax), [data])

        boundary = new_boundary()
        content = multipart_type(part_type, boundary) + f"; transfer-syntax={syntax}"
        return StreamingResponse(encode(boundary, parts()), media_type=content, headers=headers)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame_list}")
    def retrieve_frames(
        request: Request, study: str, series: str, instance: str, frame_list: str
    ) -> Response:
        numbers = _frame_numbers(frame_list)
        return frames(request, records(study, series, instance)[0], numbers)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}")
    def retrieve_bulkdata(
        request: Request, study: str, series: str, instance: str, path: str
    ) -> Response:
        record = records(study, series, instance)[0]
        tags = parse_path(path)
        if tags == (PIXEL_DATA,):
            return frames(request, record, None)
        _check_params(request, {"accept"})
        if not any(
            r.type in ("*/*", media.MULTIPART, media.OCTET_STREAM) for r in _ranges(request)
        ):
            raise NotAcceptable("bulk data is sent as application/octet-stream")
        with archive.open_parsed(record) as stream:
            value = bulk_value(read_image(stream).header, tags)
        boundary = new_boundary()
        return StreamingResponse(
            encode(boundary, [Part(media.OCTET_STREAM, [value])]),
            media_type=multipart_type(media.OCTET_STREAM, boundary),
            headers=validators([record], f"bulkdata {path}"),
        )

    # -- rendered and thumbnails -------------------------------------------------------

    def rendered(
        request: Request,
        candidates: list[InstanceRecord],
        frame: int,
        default_viewport: Viewport | None = None,
    ) -> Response:
        params = parse_params(
            list(request.query_params.multi_items()), default_viewport=default_viewport
        )
        media_type = media.choose_rendered(_ranges(request))
        for record in candidates:
            with archive.open_parsed(record) as stream:
                image = read_image(stream)
                if not image.has_pixels:
                    continue
                headers = validators([record], f"rendered {frame} {media_type} {params}")
                if (cached := not_modified(request, headers)) is not None:
                    return cached
                body = render(stream, image, frame - 1, params, media_type)
            return Response(body, media_type=media_type, headers=headers)
        raise NoSuchFrame("no instance with pixel data to render")

    @router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
    def instance_rendered(request: Request, study: str, series: str, instance: str) -> Response:
        return rendered(request, records(study, series, instance), 1)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered")
    def frame_rendered(
        request: Request, study: str, series: str, instance: str, frame: str
    ) -> Response:
        numbers = _frame_numbers(frame)
        if len(numbers) != 1:
            raise MalformedRequest("a rendered frame names exactly one frame")
        return rendered(request, records(study, series, instance), numbers[0])

    def rendered_many(request: Request, found: list[InstanceRecord]) -> Response:
        """PS3.18 10.4.1.1.3 and 8.3.5: a study or series rendered is every frame of its
        images, one image part each. The first is rendered before answering (a study
        with nothing to render is a 404/406, not an empty body); a later one that cannot
        be decoded is left out and said so in the log, never a cut answer."""
        params = parse_params(list(request.query_params.multi_items()))
        media_type = media.choose_rendered(_ranges(request))
        headers = validators(found, f"rendered {media_type} {params}")
        if (cached := not_modified(request, headers)) is not None:
            return cached
        frames = _frames_to_render(archive, found)
        first = None
        while frames and first is None:
            record, index = frames.pop(0)
            first = _render_or_none(archive, record, index, params, media_type)
        if first is None:
            raise NoSuchFrame("nothing in it has pixel data that can be rendered")

        def parts() -> Iterator[Part]:
            yield Part(media_type, [first])
            for record, index in frames:
                body = _render_or_none(archive, record, index, params, media_type)
                if body is not None:
                    yield Part(media_type, [body])

        boundary = new_boundary()
        return StreamingResponse(
            encode(boundary, parts()),
            media_type=multipart_type(media_type, boundary),
            headers=headers,
        )

    @router.get("/studies/{study}/rendered")
    def study_rendered(request: Request, study: str) -> Response:
        return rendered_many(request, records(study))

    @router.get("/studies/{study}/series/{series}/rendered")
    def series_rendered(request: Request, study: str, series: str) -> Response:
        return rendered_many(request, records(study, series))

    thumbnail_size = Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE)

    @router.get("/studies/{study}/thumbnail")
    def study_thumbnail(request: Request, study: str) -> Response:
        return rendered(request, _representative(records(study)), 1, thumbnail_size)

    @router.get("/studies/{study}/series/{series}/thumbnail")
    def series_thumbnail(request: Request, study: str, series: str) -> Response:
        return rendered(request, _representative(records(study, series)), 1, thumbnail_size)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/thumbnail")
    def instance_thumbnail(request: Request, study: str, series: str, instance: str) -> Response:
        return rendered(request, records(study, series, instance), 1, thumbnail_size)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail")
    def frame_thumbnail(
        request: Request, study: str, series: str, instance: str, frame: str
    ) -> Response:
        numbers = _frame_numbers(frame)
        if len(numbers) != 1:
            raise MalformedRequest("a thumbnail names exactly one frame")
        return rendered(request, records(study, series, instance), numbers[0], thumbnail_size)

    return router


def _frames_to_render(
    archive: Archive, found: list[InstanceRecord]
) -> list[tuple[InstanceRecord, int]]:
    frames = []
    for record in found:
        with archive.open_parsed(record) as stream:
            image = read_image(stream)
        if not image.has_pixels:
            continue
        try:
            count = image.number_of_frames
        except UndecodablePixels:
            count = 0
        frames += [(record, index) for index in range(count)]
    return frames


def _render_or_none(
    archive: Archive, record: InstanceRecord, index: int, params: RenderParams, media_type: str
) -> bytes | None:
    try:
        with archive.open_parsed(record) as stream:
            return render(stream, read_image(stream), index, params, media_type)
    except UndecodablePixels as exc:
        log.warning("rendered: %s frame %d left out: %s", record.SOPInstanceUID, index + 1, exc)
        return None


def _representative(found: list[InstanceRecord]) -> list[InstanceRecord]:
    """Middle instance of each series first (what a series looks like), then the rest."""
    by_series: dict[str, list[InstanceRecord]] = {}
    for record in found:
        by_series.setdefault(record.SeriesInstanceUID, []).append(record)
    ordered = [members[len(members) // 2] for members in by_series.values()]
    ordered += [r for r in found if r not in ordered]
    return ordered[:_THUMBNAIL_CANDIDATES]
