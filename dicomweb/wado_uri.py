"""WADO-URI (PS3.18 chapter 9): one instance by query parameters, as DICOM or rendered.

Viewers configured for it (OHIF's ``imageRendering: 'wadouri'``, older web viewers,
reporting systems that link to images) ask
``/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..&contentType=..``. The
answer is the instance as ``application/dicom`` (in the transfer syntax asked for,
Explicit VR Little Endian by default) or one frame rendered as JPEG or PNG with the
window, size, region and quality asked for, from the same archive and pixel code as
WADO-RS. It is served under the DICOMweb base path, behind the same authentication.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomweb import media
from dicomweb.rendered import RenderParams, Viewport, render
from pacs.archive import Archive
from pacs.encoding import NATIVE_LITTLE_ENDIAN
from pacs.errors import MalformedRequest, NoSuchFrame, NotAcceptable
from pacs.index import InstanceRecord
from pacs.pixels import read_image, transcode
from pacs.voi import Window

_CHUNK = 1 << 20
_RENDERED = (media.JPEG, media.PNG)
# PS3.18 9.1.2.4: parameters the server may not support; asked for, they are refused
# rather than silently not applied (an image that should have been de-identified).
_REFUSED = {"anonymize": "de-identification", "presentationUID": "presentation states"}


def _single(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise MalformedRequest(f"{name} is given more than once")
    return values[0]


def _required(params: Mapping[str, list[str]], name: str) -> str:
    value = _single(params, name)
    if not value:
        raise MalformedRequest(f"WADO-URI needs {name} (PS3.18 9.1.2.1)")
    return value


def _content_type(params: Mapping[str, list[str]]) -> str:
    """The first type of the contentType list this server produces (PS3.18 9.1.2.2.1);
    single-frame images default to image/jpeg (9.1.2.1.5)."""
    asked = _single(params, "contentType")
    if not asked:
        return media.JPEG
    for entry in asked.split(","):
        kind = entry.split(";")[0].strip().lower()
        if kind in (media.DICOM, *_RENDERED):
            return kind
        if kind in ("*/*", "image/*"):
            return media.JPEG
    raise NotAcceptable(
        f"contentType {asked!r}: this server sends application/dicom, image/jpeg or image/png"
    )


def _number(params: Mapping[str, list[str]], name: str, low: float, high: float) -> float | None:
    value = _single(params, name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise MalformedRequest(f"{name} {value[:20]!r} is not a number") from exc
    if not low <= number <= high:
        raise MalformedRequest(f"{name} must be within {low:g}..{high:g}")
    return number


def render_params(params: Mapping[str, list[str]], rows: int, columns: int) -> RenderParams:
    """rows, columns, region, windowCenter, windowWidth, imageQuality (PS3.18 9.1.2.3)."""
    center = _number(params, "windowCenter", -1e9, 1e9)
    width = _number(params, "windowWidth", 1, 1e9)
    if (center is None) != (width is None):
        raise MalformedRequest("windowCenter and windowWidth go together")
    window = None if center is None or width is None else Window(center, width, "linear")
    region = _single(params, "region")
    source = None
    if region is not None:
        try:
            left, top, right, bottom = (float(v) for v in region.split(","))
        except ValueError as exc:
            raise MalformedRequest(f"region {region[:40]!r} is x1,y1,x2,y2 in 0..1") from exc
        if not 0 <= left < right <= 1 or not 0 <= top < bottom <= 1:
            raise MalformedRequest("region is x1,y1,x2,y2 with 0 <= x1 < x2 <= 1")
        source = (
            round(left * columns),
            round(top * rows),
            max(1, round((right - left) * columns)),
            max(1, round((bottom - top) * rows)),
        )
    height = _number(params, "rows", 1, 8192)
    width_px = _number(params, "columns", 1, 8192)
    viewport = None
    if height is not None or width_px is not None or source is not None:
        viewport = Viewport(
            int(width_px or height or columns), int(height or width_px or rows), source
        )
    quality = _number(params, "imageQuality", 1, 100)
    return RenderParams(window, viewport, 90 if quality is None else int(quality))


def wado_uri_router(archive: Archive) -> APIRouter:
    router = APIRouter()

    @router.get("/wado")
    def wado(request: Request) -> Response:
        params: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            params.setdefault(name, []).append(value)
        if _single(params, "requestType") != "WADO":
            raise MalformedRequest("WADO-URI needs requestType=WADO (PS3.18 9.1.2.1.1)")
        for name, feature in _REFUSED.items():
            if _single(params, name) not in (None, "", "no"):
                raise MalformedRequest(f"{name}: {feature} are not supported by this server")
        (record,) = archive.records(
            _required(params, "studyUID"),
            _required(params, "seriesUID"),
            _required(params, "objectUID"),
        )
        kind = _content_type(params)
        if kind == media.DICOM:
            return _instance(archive, record, _single(params, "transferSyntax"))
        frame = _number(params, "frameNumber", 1, 1 << 31)
        with archive.open_parsed(record) as stream:
            image = read_image(stream)
            if not image.has_pixels:
                raise NoSuchFrame(f"instance {record.SOPInstanceUID} has no pixel data")
            header = image.header
            chosen = render_params(params, int(header.Rows), int(header.Columns))
            index = 0 if frame is None else int(frame) - 1
            body = render(stream, image, index, chosen, kind)
        return Response(body, media_type=kind)

    return router


def _instance(archive: Archive, record: InstanceRecord, syntax: str | None) -> Response:
    """PS3.18 9.1.2.4.2: Explicit VR Little Endian unless transferSyntax names another;
    "*" (as filmless also accepts for WADO-RS) is the stored syntax."""
    wanted = syntax or ExplicitVRLittleEndian
    if wanted in ("*", record.TransferSyntaxUID):
        return StreamingResponse(_chunks(archive, record), media_type=media.DICOM)
    if UID(wanted) not in NATIVE_LITTLE_ENDIAN:
        raise NotAcceptable(
            f"instance {record.SOPInstanceUID} is stored as {record.TransferSyntaxUID}; it "
            f"cannot be produced as {wanted} (ask for Explicit VR Little Endian or *)"
        )
    with archive.open(record) as stream:
        body = transcode(stream, UID(wanted))
    return Response(body, media_type=media.DICOM)


def _chunks(archive: Archive, record: InstanceRecord) -> Iterator[bytes]:
    with archive.open_parsed(record) as stream:
        while chunk := stream.read(_CHUNK):
            yield chunk
