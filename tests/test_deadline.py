"""The DICOMweb request time limit: a body trickling in gets 408, work that does not
begin its answer in time gets 503, and a long answer that has begun is not cut."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from starlette.types import Message, Receive, Scope, Send

from dicomweb.app import create_app
from dicomweb.deadline import RequestDeadline
from pacs.archive import Archive
from tests.support.web import serving

_SCOPE: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}


def _run(app: RequestDeadline, body_chunks: list[bytes] | None = None) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        if body_chunks:
            return {"type": "http.request", "body": body_chunks.pop(0), "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(_SCOPE, receive, send))
    return sent


def test_late_answer_is_503() -> None:
    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(30)

    started = time.monotonic()
    sent = _run(RequestDeadline(slow, seconds=0.3))
    assert time.monotonic() - started < 20  # not after the handler's 30 s
    assert sent[0]["status"] == 503
    assert b"could not begin" in sent[1]["body"]


def test_a_begun_answer_streams_past_the_limit() -> None:
    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(5):
            await asyncio.sleep(0.1)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    sent = _run(RequestDeadline(streaming, seconds=0.2))
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"xxxxx"


def test_a_streaming_answer_is_not_told_the_client_left() -> None:
    """Past the limit, a streaming answer's wait for a disconnect must not be cut short
    (Starlette would stop the stream on a fake one)."""

    async def listening(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.3)
        try:
            message = await asyncio.wait_for(receive(), 0.3)
        except TimeoutError:
            message = {"type": "still connected"}
        await send({"type": "http.response.body", "body": message["type"].encode()})

    sent = _run(RequestDeadline(listening, seconds=0.1))
    assert sent[1]["body"] == b"still connected"


def test_trickling_body_gets_408_from_the_server(archive: Archive) -> None:
    app = create_app(archive, viewer_dir=Path("/nonexistent"), request_timeout=1.0)
    with serving(app) as url:
        port = int(url.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b'Content-Type: multipart/related; type="application/dicom"; boundary=B\r\n'
                b"Content-Length: 100000\r\n\r\n--B\r\n"
            )
            sock.settimeout(60)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
