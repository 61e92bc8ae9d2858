"""A requested association that only sends C-STOREs, on one socket, in the calling thread.

What the archive sends on (routing rules, report forwarding) is a stream of stored
files to one peer. pynetdicom's requestor decodes each command set through pydicom and
hands every message through its reactor thread and queues: four milliseconds a small
instance on this path, as much as the peer takes to store it. Here the C-STORE-RQ is
built with ``struct`` (:mod:`pacs.dimse.wire`), the data set goes out as it is encoded
in the file, a PDU at a time, and the response is read from the socket directly.

The A-ASSOCIATE-RQ and -AC are still pynetdicom's (its PDU encoder and decoder), so
that what we propose is what pynetdicom would. One message at a time: no asynchronous
operations window is proposed, so the peer may not expect more (PS3.7 D.3.3.3).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import pdu as pdus
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from pacs.dimse.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    ABORT_NOT_SPECIFIED,
    COMMAND_LAST,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RQ,
    parse_command,
    store_request,
)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# What we receive at most in one PDU (responses are small).
_MAX_PDU = 1 << 16
# Data set fragments when the peer sets no limit.
_UNLIMITED_CHUNK = 1 << 20


class StoreRefused(Exception):
    """The association could not be made or ended in the middle of an exchange."""


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    Status: int
    ErrorComment: str


class StoreAssociation:
    """Use :meth:`open`; then :meth:`store` any number of times, then :meth:`release`."""

    def __init__(self, sock: socket.socket, contexts: dict[tuple[str, str], int], peer_max: int):
        self.sock = sock
        self.contexts = contexts  # (SOP Class, transfer syntax) -> accepted context ID
        self.peer_max = peer_max
        self._message_id = 0
        self.open = True

    @classmethod
    def open_to(
        cls,
        host: str,
        port: int,
        *,
        called: str,
        calling: str,
        proposed: list[tuple[str, str]],
        timeout: float,
    ) -> StoreAssociation:
        """An association proposing one context per (SOP Class, transfer syntax)."""
        request = A_ASSOCIATE()
        request.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        request.calling_ae_title = calling
        request.called_ae_title = called
        contexts = []
        for n, (sop_class, syntax) in enumerate(proposed):
            cx = PresentationContext()
            cx.context_id = 2 * n + 1
            cx.abstract_syntax = UID(sop_class)
            cx.transfer_syntax = [UID(syntax)]
            contexts.append(cx)
        request.presentation_context_definition_list = contexts
        length = MaximumLengthNotification()
        length.maximum_length_received = _MAX_PDU
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(PYNETDICOM_IMPLEMENTATION_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        request.user_information = [length, class_uid, version]
        pdu = pdus.A_ASSOCIATE_RQ()
        pdu.from_primitive(request)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StoreRefused(f"{host}:{port} cannot be reached: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(pdu.encode())
            kind, body = _read_pdu(sock)
            if kind == A_ASSOCIATE_RJ:
                raise StoreRefused(f"{called}@{host}:{port} rejected the association")
            if kind != A_ASSOCIATE_AC:
                raise StoreRefused(f"{called}@{host}:{port} answered the association with {kind}")
            accept = pdus.A_ASSOCIATE_AC()
            accept.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
            answer = accept.to_primitive()
        except BaseException:
            sock.close()
            raise
        peer_max = 0
        for item in answer.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
        accepted = {}
        by_id = {int(cx.context_id or 0): cx for cx in contexts}
        for result in answer.presentation_context_definition_results_list:
            mine = by_id.get(int(result.context_id or 0))
            if mine is not None and result.result == 0x00:
                accepted[(str(mine.abstract_syntax), str(result.transfer_syntax[0]))] = int(
                    result.context_id or 0
                )
        return cls(sock, accepted, peer_max)

    def accepts(self, sop_class: str, syntax: str) -> bool:
        return (sop_class, syntax) in self.contexts

    def store(
        self, sop_class: str, sop_instance: str, syntax: str, data_set: BinaryIO
    ) -> StoreAnswer:
        """Send the data set read from ``data_set`` (to its end) in the context of
        ``(sop_class, syntax)``; the peer's status. :class:`StoreRefused` when the
        association ends instead."""
        context = self.contexts[(sop_class, syntax)]
        self._message_id = self._message_id % 0xFFFF + 1
        command = store_request(sop_class, sop_instance, self._message_id)
        chunk = self.peer_max - PDV_HEADER.size if self.peer_max else _UNLIMITED_CHUNK
        try:
            self._send_pdv(context, COMMAND_LAST, command)
            block = data_set.read(chunk)
            while True:
                following = data_set.read(chunk)
                self._send_pdv(context, 0x00 if following else 0x02, block)
                if not following:
                    break
                block = following
            return self._answer()
        except OSError as exc:
            self.abort()
            raise StoreRefused(f"the association ended: {exc}") from exc

    def _send_pdv(self, context: int, control: int, data: bytes) -> None:
        header = PDU_HEADER.pack(P_DATA_TF, 0, PDV_HEADER.size + len(data))
        pdv = PDV_HEADER.pack(len(data) + 2, context, control)
        self.sock.sendmsg([header, pdv, data])

    def _answer(self) -> StoreAnswer:
        command = bytearray()
        while True:
            kind, body = _read_pdu(self.sock)
            if kind == A_ABORT:
                self.sock.close()
                self.open = False
                raise StoreRefused("the peer aborted the association")
            if kind != P_DATA_TF:
                self.abort()
                raise StoreRefused(f"the peer sent PDU type {kind} instead of a response")
            position = 0
            while position + PDV_HEADER.size <= len(body):
                length, _context, control = PDV_HEADER.unpack_from(body, position)
                start = position + PDV_HEADER.size
                end = position + 4 + length
                if not control & 0x01:
                    self.abort()
                    raise StoreRefused("the peer sent a data set with its C-STORE response")
                command += body[start:end]
                position = end
                if control & 0x02:
                    parsed = parse_command(command)
                    return StoreAnswer(parsed.Status, parsed.ErrorComment)

    def release(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self.sock.sendall(RELEASE_RQ)
            while True:
                kind, _ = _read_pdu(self.sock)
                if kind in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, StoreRefused):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        if not self.open:
            return
        self.open = False
        try:
            self.sock.sendall(ABORT_NOT_SPECIFIED)
        except OSError:
            pass
        finally:
            self.sock.close()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise StoreRefused("the peer closed the connection")
        got += n
    return bytes(buffer)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    kind, _, length = PDU_HEADER.unpack(_read_exactly(sock, PDU_HEADER.size))
    if length > _MAX_PDU * 4:
        raise StoreRefused(f"the peer sent a PDU of {length} bytes")
    return kind, _read_exactly(sock, length)
