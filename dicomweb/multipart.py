"""multipart/related (RFC 2387) as PS3.18 uses it: encoded while streaming, parsed likewise.

Neither direction holds a whole message in memory: WADO-RS answers are produced one
part (and one chunk) at a time, and a STOW-RS body is split into parts that are spooled
to temporary files as they arrive, so a 2 GB study costs a few megabytes of memory.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pacs.errors import MalformedRequest, RequestTooLarge

CRLF = b"\r\n"
# Per part in memory before it goes to a file: a thousand slow uploads cost 256 MiB.
SPOOL_IN_MEMORY = 256 << 10
SPOOL_PREFIX = "upload-"  # what startup clears from the staging folder after a crash
_MAX_HEADER_BYTES = 16 << 10
_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def new_boundary() -> str:
    return f"filmless-{secrets.token_hex(16)}"


def multipart_type(part_type: str, boundary: str) -> str:
    """The Content-Type of a multipart/related answer whose parts are ``part_type``."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


@dataclass(frozen=True)
class Part:
    """One part to send: its headers and its body as chunks."""

    content_type: str
    body: Iterable[bytes]
    location: str | None = None


def encode(boundary: str, parts: Iterable[Part]) -> Iterator[bytes]:
    """The message as chunks; parts are consumed lazily, one after the other."""
    marker = b"--" + boundary.encode("ascii")
    for part in parts:
        head = [marker, b"Content-Type: " + part.content_type.encode("ascii")]
        if part.location:
            head.append(b"Content-Location: " + part.location.encode("ascii"))
        yield CRLF.join(head) + CRLF + CRLF
        yield from part.body
        yield CRLF
    yield marker + b"--" + CRLF


def media_params(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` -> (lower-case type, parameters with lower-case names)."""
    media, _, rest = value.partition(";")
    params = {}
    for match in _PARAM.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = raw[1:-1]
        params[match.group(1).lower()] = raw
    return media.strip().lower(), params


@dataclass
class ReceivedPart:
    """A part of a request body, its bytes spooled to a temporary file (rewound)."""

    headers: dict[str, str]
    body: BinaryIO

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedRequest(f"malformed part header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def parse(
    chunks: AsyncIterator[bytes],
    boundary: str,
    *,
    max_bytes: int,
    spool_dir: Path | None = None,
) -> AsyncIterator[ReceivedPart]:
    """Parts of a multipart body as they complete; raises on a malformed or oversize body.

    ``max_bytes`` bounds the whole body even when no Content-Length was sent (chunked).
    Parts past :data:`SPOOL_IN_MEMORY` are spooled to files in ``spool_dir`` (the
    store's staging folder: on the archive's disk, not in a RAM-backed /tmp).
    """
    delimiter = CRLF + b"--" + boundary.encode("latin-1")
    # A CRLF in front lets the first boundary (at offset 0) match like the others.
    buffer = bytearray(CRLF)
    received = 0
    state = "preamble"
    body: BinaryIO | None = None
    headers: dict[str, str] = {}
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                if body is not None:
                    body.close()
                raise RequestTooLarge(f"the request body exceeds the maximum of {max_bytes} bytes")
            buffer += chunk
            while True:
                if state == "preamble":
                    at = buffer.find(delimiter)
                    if at < 0:
                        del buffer[: max(0, len(buffer) - len(delimiter))]
                        break
                    del buffer[: at + len(delimiter)]
                    state = "boundary"
                if state == "boundary":
                    if len(buffer) < 2:
                        break
                    if buffer[:2] == b"--":
                        state = "end"
                        break
                    end = buffer.find(CRLF + CRLF)
                    if end < 0:
                        if len(buffer) > _MAX_HEADER_BYTES:
                            raise MalformedRequest("a part's headers are too long")
                        break
                    # The boundary line may carry transport padding before its CRLF.
                    line_end = buffer.find(CRLF)
                    headers = _headers(bytes(buffer[line_end + 2 : end + 2]))
                    del buffer[: end + 4]
                    body = cast(
                        BinaryIO,
                        tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by its consumer)
                            max_size=SPOOL_IN_MEMORY,
                            dir=None if spool_dir is None else str(spool_dir),
                            prefix=SPOOL_PREFIX,
                        ),
                    )
                    state = "body"
                if state == "body":
                    assert body is not None
                    at = buffer.find(delimiter)
                    if at < 0:
                        keep = len(delimiter) - 1
                        if len(buffer) > keep:
                            body.write(buffer[: len(buffer) - keep])
                            del buffer[: len(buffer) - keep]
                        break
                    body.write(buffer[:at])
                    del buffer[: at + len(delimiter)]
                    body.seek(0)
                    yield ReceivedPart(headers, body)
                    body = None
                    state = "boundary"
                if state == "end":
                    break
        if body is not None:
            body.close()
    except BaseException:
        # A request that fails or a client gone mid-part: its unfinished part goes.
        if body is not None:
            body.close()
        raise
    if state != "end":
        raise MalformedRequest("the multipart body ends before its closing boundary")
