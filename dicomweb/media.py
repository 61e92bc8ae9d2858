"""Media types and content negotiation for WADO-RS (PS3.18 8.7).

The request names what it accepts in the ``Accept`` header or the ``accept`` query
parameter (which wins, 8.3.3.1); each range may carry a ``transfer-syntax`` parameter,
``*`` meaning "as stored". What the server picks for each part is decided here, as pure
functions, so the routes only stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs.encoding import NATIVE_LITTLE_ENDIAN
from pacs.errors import NotAcceptable

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"
JPEG = "image/jpeg"
PNG = "image/png"

# PS3.18 table 8.7.3-2 and -5: the media type of a compressed frame or bulk data value.
PIXEL_MEDIA_TYPES: Mapping[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
ANY_SYNTAX = "*"


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header, parameters with lower-case names."""

    type: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0

    @property
    def part_type(self) -> str:
        """The media type of the parts a ``multipart/related`` range asks for."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


_RANGE = re.compile(r'(?:[^,"]|"[^"]*")+')
_PARAM = re.compile(r'\s*([^=;\s]+)\s*=\s*("([^"]*)"|[^;]*)')


def parse_accept(value: str) -> list[MediaRange]:
    """Split an Accept value into ranges, best first (ties keep their order)."""
    ranges = []
    for text in _RANGE.findall(value):
        media, *rest = text.split(";")
        media = media.strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        for item in rest:
            match = _PARAM.match(item)
            if match is None:
                continue
            raw = match.group(3) if match.group(3) is not None else match.group(2)
            params[match.group(1).lower()] = raw.strip()
        ranges.append(MediaRange(media, params))
    return sorted((r for r in ranges if r.quality > 0), key=lambda r: -r.quality)


def requested(accept_header: str | None, accept_param: str | None) -> list[MediaRange]:
    """The ranges of a request: the ``accept`` query parameter overrides the header."""
    text = accept_param if accept_param else accept_header
    return parse_accept(text or "*/*")


def _matches(pattern: str, media_type: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media_type.startswith(pattern[:-1])
    return pattern == media_type


@dataclass(frozen=True)
class InstanceChoice:
    """What an instance retrieve may send: syntaxes in order of preference, ``*`` first."""

    syntaxes: tuple[str, ...]

    def syntax_for(self, stored: str) -> UID | None:
        """The syntax an instance stored as ``stored`` is sent in, or None if it cannot be."""
        found = self.candidates(stored)
        return found[0] if found else None

    def candidates(self, stored: str) -> list[UID]:
        """Every syntax it may be sent in, preferred first: the caller falls back to the
        next one when producing one fails (pixels that cannot be decoded)."""
        found: list[UID] = []
        for syntax in self.syntaxes:
            if syntax in (ANY_SYNTAX, stored):
                found.append(UID(stored))
            elif syntax in NATIVE_LITTLE_ENDIAN:
                found.append(UID(syntax))
        return list(dict.fromkeys(found))


def choose_instances(ranges: Iterable[MediaRange]) -> InstanceChoice:
    """Negotiate ``multipart/related; type="application/dicom"`` (PS3.18 8.7.3.5.2).

    Without a transfer-syntax parameter the default is Explicit VR Little Endian.
    """
    syntaxes: list[str] = []
    for r in ranges:
        if r.type == MULTIPART and r.part_type in (DICOM, ""):
            syntaxes.append(r.transfer_syntax or ExplicitVRLittleEndian)
        elif _matches(r.type, DICOM) and r.type != DICOM:
            syntaxes.append(ExplicitVRLittleEndian)
        elif r.type == DICOM:
            syntaxes.append(r.transfer_syntax or ExplicitVRLittleEndian)
    if not syntaxes:
        raise NotAcceptable('instances are sent as multipart/related; type="application/dicom"')
    return InstanceChoice(tuple(syntaxes))


@dataclass(frozen=True)
class FrameChoice:
    """What a frames or pixel bulk data request may send, in order of preference."""

    options: tuple[tuple[str, str], ...]  # (part media type or pattern, transfer syntax)

    def for_stored(self, stored: str) -> tuple[str, UID] | None:
        """(media type, syntax) of the parts for pixels stored as ``stored``."""
        stored_type = PIXEL_MEDIA_TYPES.get(stored, OCTET_STREAM)
        for pattern, syntax in self.options:
            if syntax == ANY_SYNTAX and _matches(pattern, stored_type):
                return stored_type, UID(stored)
            if syntax == ANY_SYNTAX and pattern == OCTET_STREAM:
                # OHIF asks octet-stream with transfer-syntax=*: the stored bit stream.
                return stored_type, UID(stored)
            if syntax == stored and _matches(pattern, stored_type):
                return stored_type, UID(stored)
            if syntax == ExplicitVRLittleEndian and _matches(pattern, OCTET_STREAM):
                return OCTET_STREAM, ExplicitVRLittleEndian
        return None


def choose_frames(ranges: Iterable[MediaRange]) -> FrameChoice:
    """Negotiate a multipart of frames (PS3.18 8.7.3.5.3, 8.7.4).

    A part type without a transfer-syntax means: octet-stream -> uncompressed little
    endian; a compressed image type -> the stored bit stream when it is of that type.
    """
    options: list[tuple[str, str]] = []
    for r in ranges:
        if r.type == MULTIPART:
            part = r.part_type or OCTET_STREAM
            if r.transfer_syntax:
                options.append((part, r.transfer_syntax))
            elif part == OCTET_STREAM:
                options.append((part, ExplicitVRLittleEndian))
            else:
                options.append((part, ANY_SYNTAX))
        elif r.type in ("*/*", "*"):
            options.append((OCTET_STREAM, ExplicitVRLittleEndian))
    if not options:
        raise NotAcceptable(
            'frames are sent as multipart/related; type="application/octet-stream" '
            "or the stored image type"
        )
    return FrameChoice(tuple(options))


def choose_rendered(ranges: Iterable[MediaRange]) -> str:
    """image/jpeg or image/png for a rendered resource; JPEG when anything goes."""
    for r in ranges:
        for candidate in (JPEG, PNG):
            if _matches(r.type, candidate):
                return candidate
    raise NotAcceptable("rendered images are available as image/jpeg or image/png")


def content_type(media_type: str, syntax: str | None = None) -> str:
    if syntax is None:
        return media_type
    return f"{media_type}; transfer-syntax={syntax}"
