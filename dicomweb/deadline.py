"""A time limit on each DICOMweb request: its body must arrive, and its answer begin,
within ``seconds``.

A client that sends a body a byte at a time, or a request whose work takes forever,
would otherwise hold a connection and a worker thread without end. Once the answer has
begun it streams at the client's pace (a study can be gigabytes), bounded by the
server's connection limit instead. A late body is 408, a late answer 503; the work of
a request already handed to a thread finishes there, its result is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomweb.asgi import send_error
from pacs.errors import AnswerTimedOut, PacsError, RequestTimedOut


class RequestDeadline:
    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        started = asyncio.Event()
        late_body = False
        receiving = False

        async def timed_receive() -> Message:
            nonlocal late_body, receiving
            if started.is_set():
                # Once the answer streams, receive() only waits for a disconnect: untimed.
                return await receive()
            receiving = True
            try:
                return await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                late_body = True
                return {"type": "http.disconnect"}
            finally:
                receiving = False

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, timed_receive, tracking_send))
        begun = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait(
                {task, begun},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            begun.cancel()
        if started.is_set() or (task.done() and not late_body):
            await task
            return
        if task.done():
            with contextlib.suppress(Exception):
                task.result()
        else:
            late_body = late_body or receiving  # the time ran out while waiting for the body
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if started.is_set():
            return
        error: PacsError = (
            RequestTimedOut(f"the request body did not arrive within {self.seconds:g} s")
            if late_body
            else AnswerTimedOut(f"the answer could not begin within {self.seconds:g} s")
        )
        await send_error(send, error, ((b"connection", b"close"),))
