"""Storage and query associations served on their connection's thread, without pynetdicom's DUL.

pynetdicom runs every association on three threads (the connection's, the DUL reactor,
the association reactor) that hand each PDU and each DIMSE message to one another
through queues, decode every command set with pydicom and drive a state machine per
PDU: for a 512x512 CT instance that was a third of the server's CPU, and each hand-off
a wait. Most associations a PACS accepts are modalities storing images and viewers or
RIS querying, and they need none of that machinery.

When an A-ASSOCIATE-RQ proposes only Storage, C-FIND and Verification contexts and
none of the negotiations that only pynetdicom implements here (SCP/SCU role selection,
extended negotiation, user identity, asynchronous operations), and its calling AE title
is allowed, it is accepted here with the same A-ASSOCIATE-AC pynetdicom would send (its
own negotiation function and PDU encoder build it), and served on the connection's
thread: PDUs read into one buffer, PDVs cut with memoryviews, command sets parsed and
built with :mod:`struct` (PS3.7 E.1, Implicit VR Little Endian), C-STORE data sets
written fragment by fragment into a :class:`~pacs.dimse.spool.Spool`, and the answers
given by the same code as pynetdicom's handlers (:func:`~pacs.dimse.store.store_response`,
:class:`~pacs.dimse.find.FindService`). Every other association goes to pynetdicom
unchanged. ``tests/test_direct.py`` compares both, byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import logging
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs.archive import Archive, InstanceSource
from pacs.audit import Actor
from pacs.dimse import associations, spool
from pacs.dimse.bounds import COMMAND_LIMIT
from pacs.dimse.echo import echoed
from pacs.dimse.find import MODELS, FindService
from pacs.dimse.pending import encoded_match, pdus
from pacs.dimse.retrieve import GET_MODELS, MOVE_MODELS
from pacs.dimse.store import store_response
from pacs.dimse.wire import (
    A_ABORT,
    A_RELEASE_RQ,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_FIND_RQ,
    C_STORE_RQ,
    COMMAND_LAST,
    P_DATA_TF,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP,
    RESPONSE,
    Command,
    ProtocolError,
    p_data_tf,
    parse_command,
    response_command,
    status_of,
)
from pacs.errors import InvalidInstance, PacsError
from pacs.status import QueryStatus
from pacs.store import BlobStore

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# How long an ended association waits for its peer to close the connection.
LINGER_S = 5.0
# User Information sub-items (PS3.7 D.3.3) that need nothing from the acceptor.
_PLAIN_USER_ITEMS = (
    MaximumLengthNotification,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
)


@dataclass(slots=True)
class Accepted:
    """One accepted presentation context."""

    abstract_syntax: str
    transfer_syntax: str
    implicit: bool
    little: bool
    deflated: bool


@dataclass(slots=True)
class Negotiated:
    """An A-ASSOCIATE-RQ this path serves, and the A-ASSOCIATE-AC that accepts it."""

    calling_ae_title: str
    peer_max_pdu: int
    contexts: dict[int, Accepted]
    accept: bytes


class DirectServices:
    """What the direct path needs of the server, shared by all its associations."""

    def __init__(
        self,
        archive: Archive,
        find: FindService,
        *,
        supported: list[PresentationContext],
        maximum_pdu: int,
        implementation_class_uid: str,
        implementation_version_name: str,
        allowed_calling_aets: tuple[str, ...],
        network_timeout: float,
        max_identifier_bytes: int,
    ) -> None:
        self.archive = archive
        self.find = find
        self.supported = supported
        # What the server accepts, less the retrieve models (they need pynetdicom):
        # C-FIND models, Verification, and every other one is a storage SOP class.
        self.served = {str(cx.abstract_syntax) for cx in supported} - _RETRIEVE_MODELS
        self.maximum_pdu = maximum_pdu
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name
        self.allowed_calling_aets = tuple(a.strip() for a in allowed_calling_aets)
        self.network_timeout = network_timeout
        self.max_identifier_bytes = max_identifier_bytes
        self._live: set[DirectAssociation] = set()
        self._lock = threading.Lock()

    def negotiate(self, request: bytes) -> Negotiated | None:
        """The acceptance of ``request`` (a whole A-ASSOCIATE-RQ PDU), or None when
        pynetdicom must negotiate it (anything it would reject or that needs more)."""
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(request)
            primitive = pdu.to_primitive()
        except Exception:
            return None  # pynetdicom answers malformed requests as it always has
        if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return None
        calling = str(primitive.calling_ae_title or "").strip()
        if self.allowed_calling_aets and calling not in self.allowed_calling_aets:
            return None
        peer_max = 0
        for item in primitive.user_information:
            if not isinstance(item, _PLAIN_USER_ITEMS):
                return None
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
        proposed = primitive.presentation_context_definition_list
        if not proposed or any(str(cx.abstract_syntax) not in self.served for cx in proposed):
            return None
        results, _roles = negotiate_as_acceptor(proposed, self.supported, None)
        contexts: dict[int, Accepted] = {}
        for cx in results:
            if cx.result != 0x00:
                continue
            syntax = UID(str(cx.transfer_syntax[0]))
            contexts[int(cx.context_id or 0)] = Accepted(
                abstract_syntax=str(cx.abstract_syntax),
                transfer_syntax=str(syntax),
                implicit=syntax.is_implicit_VR,
                little=syntax.is_little_endian,
                deflated=syntax.is_deflated,
            )
        accepted = sorted((cx for cx in results if cx.result == 0x00), key=_context_id)
        answer = A_ASSOCIATE()
        answer.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        answer.calling_ae_title = primitive.calling_ae_title
        answer.called_ae_title = primitive.called_ae_title
        answer.result = 0x00
        answer.result_source = 0x01
        answer.presentation_context_definition_results_list = accepted + [
            cx for cx in results if cx.result != 0x00
        ]
        length = MaximumLengthNotification()
        length.maximum_length_received = self.maximum_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(self.implementation_class_uid)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = self.implementation_version_name
        answer.user_information = [length, class_uid, version]
        accept = A_ASSOCIATE_AC()
        accept.from_primitive(answer)
        return Negotiated(calling, peer_max, contexts, accept.encode())

    def serve(
        self,
        connection: socket.socket,
        address: tuple[str, int],
        negotiated: Negotiated,
        store: BlobStore,
    ) -> None:
        """Accept and serve the association until it ends; the connection is closed."""
        association = DirectAssociation(self, connection, address, negotiated, store)
        with self._lock:
            self._live.add(association)
        try:
            association.run()
        finally:
            with self._lock:
                self._live.discard(association)

    def live(self) -> list[DirectAssociation]:
        with self._lock:
            return list(self._live)

    def abort_all(self) -> None:
        for association in self.live():
            association.abort()


def _context_id(cx: PresentationContext) -> int:
    return int(cx.context_id or 0)


_RETRIEVE_MODELS = frozenset((*MOVE_MODELS, *GET_MODELS))


@dataclass(slots=True)
class _Message:
    """A request being received: its command set, then its data set."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    parsed: Command | None = None
    data: bytearray = field(default_factory=bytearray)
    received: spool.Spool | None = None


class DirectAssociation:
    """One association, served on the calling thread (see the module docstring)."""

    def __init__(
        self,
        services: DirectServices,
        connection: socket.socket,
        address: tuple[str, int],
        negotiated: Negotiated,
        store: BlobStore,
    ) -> None:
        self.services = services
        self.sock = connection
        self.address = address
        self.negotiated = negotiated
        self.store = store
        self.actor = Actor(negotiated.calling_ae_title, str(address[0]), "DIMSE")
        self.is_established = False
        self._message: _Message | None = None
        self._early: deque[tuple[int, bytearray]] = deque()
        self._closed = False
        self._send_lock = threading.Lock()

    def _peer(self) -> str:
        return f"{self.negotiated.calling_ae_title or '?'}@{self.address[0]}:{self.address[1]}"

    def run(self) -> None:
        try:
            self.sock.settimeout(self.services.network_timeout)
            self._send(self.negotiated.accept)
            self.is_established = True
            associations.accepted(self._peer())
            self._serve()
        except (ProtocolError, PacsError) as exc:
            associations.aborted(self._peer(), str(exc))
            self._abort(ABORT_UNEXPECTED_PDU)
        except TimeoutError:
            associations.aborted(self._peer(), "network timeout")
            self._abort(ABORT_NOT_SPECIFIED)
        except (OSError, EOFError) as exc:
            if not self._closed:
                log.warning("association with %s ended: %s", self._peer(), exc)
        except Exception:
            log.exception("association with %s failed", self._peer())
            self._abort(ABORT_NOT_SPECIFIED)
        finally:
            self.is_established = False
            self._discard()
            self._close()

    def abort(self) -> None:
        """From another thread (the server stops): A-ABORT, and the socket is closed."""
        if self._closed:
            return
        self._send_quietly(ABORT_NOT_SPECIFIED)
        self._close()

    def _serve(self) -> None:
        while True:
            kind, body = self._next_pdu()
            if kind == P_DATA_TF:
                for message in self._messages(body):
                    self._dispatch(message)
            elif kind == A_RELEASE_RQ:
                if self._message is not None:
                    raise ProtocolError("release requested in the middle of a message")
                self._send(RELEASE_RP)
                self.is_established = False
                log.info("association with %s released", self._peer())
                self._linger()
                return
            elif kind == A_ABORT:
                self.is_established = False
                associations.aborted(self._peer())
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")

    def _next_pdu(self) -> tuple[int, bytearray]:
        if self._early:
            return self._early.popleft()
        return self._read_pdu()

    def _read_pdu(self) -> tuple[int, bytearray]:
        header = self._recv_exact(PDU_HEADER.size)
        kind, _reserved, length = PDU_HEADER.unpack(header)
        limit = self.services.maximum_pdu
        if kind == P_DATA_TF and limit and length > limit:
            raise ProtocolError(f"a {length} byte PDU, more than the {limit} negotiated")
        if kind != P_DATA_TF and length > 64:
            raise ProtocolError(f"a {length} byte PDU of type 0x{kind:02X}")
        return kind, self._recv_exact(length)

    def _recv_exact(self, count: int) -> bytearray:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            got = self.sock.recv_into(view[received:], count - received)
            if got == 0:
                raise EOFError("the peer closed the connection")
            received += got
        return buffer

    def _messages(self, body: bytearray) -> Iterator[_Message]:
        """Complete messages as the PDVs of one P-DATA-TF finish them (PS3.8 9.3.5.1)."""
        view = memoryview(body)
        position = 0
        while position < len(view):
            if position + PDV_HEADER.size > len(view):
                raise ProtocolError("a PDV header overruns its PDU")
            length, context_id, control = PDV_HEADER.unpack_from(view, position)
            end = position + 4 + length
            if length < 2 or end > len(view):
                raise ProtocolError("a PDV's length overruns its PDU")
            fragment = view[position + PDV_HEADER.size : end]
            position = end
            if context_id not in self.negotiated.contexts:
                raise ProtocolError(f"presentation context {context_id} was not accepted")
            message = self._message
            if message is None:
                message = self._message = _Message(context_id)
            elif message.context_id != context_id:
                raise ProtocolError("a message continues on another presentation context")
            if control & 0x01:
                if message.parsed is not None:
                    raise ProtocolError("a command fragment after the command set")
                message.command += fragment
                if len(message.command) > COMMAND_LIMIT:
                    raise ProtocolError(f"a command set over {COMMAND_LIMIT} bytes")
                if control & 0x02:
                    message.parsed = parse_command(message.command)
                    self._begin(message)
                    if not message.parsed.has_data_set:
                        self._message = None
                        yield message
                continue
            if message.parsed is None or not message.parsed.has_data_set:
                raise ProtocolError("a data set fragment without its command set")
            if message.received is not None:
                message.received.write(fragment)
            else:
                message.data += fragment
                if len(message.data) > self.services.max_identifier_bytes:
                    raise ProtocolError(
                        f"an identifier over {self.services.max_identifier_bytes} bytes"
                        " (max_identifier_bytes)"
                    )
            if control & 0x02:
                self._message = None
                yield message

    def _begin(self, message: _Message) -> None:
        """A C-STORE data set is spooled as it arrives, not gathered in memory."""
        command = message.parsed
        assert command is not None
        if command.CommandField != C_STORE_RQ or not command.has_data_set:
            return
        context = self.negotiated.contexts[message.context_id]
        received = spool.Spool(self.store)
        try:
            received.meta = InstanceSource.from_data_set(
                io.BytesIO(),
                TransferSyntaxUID=context.transfer_syntax,
                SOPClassUID=command.AffectedSOPClassUID,
                SOPInstanceUID=command.AffectedSOPInstanceUID,
            ).meta
        except PacsError as exc:
            received.error = exc  # nothing is kept; the response says why
        message.received = received

    def _dispatch(self, message: _Message) -> None:
        command = message.parsed
        assert command is not None
        context = self.negotiated.contexts[message.context_id]
        field_ = command.CommandField
        if field_ == C_STORE_RQ and _is_storage(context.abstract_syntax):
            self._store(message, command, context)
        elif field_ == C_FIND_RQ and context.abstract_syntax in MODELS:
            self._find(message, command, context)
        elif field_ == C_ECHO_RQ and context.abstract_syntax == str(Verification):
            status = echoed(self.actor.user, *self.address)
            self._respond(
                message.context_id,
                response_command(
                    RESPONSE | C_ECHO_RQ, command.AffectedSOPClassUID, command.MessageID, status
                ),
            )
        elif field_ == C_CANCEL_RQ:
            return  # nothing of that message is still running
        else:
            raise ProtocolError(
                f"command 0x{field_:04X} on a context for {context.abstract_syntax}"
            )

    def _store(self, message: _Message, command: Command, context: Accepted) -> None:
        received = message.received
        if received is None:  # a C-STORE-RQ without a data set
            received = spool.Spool(self.store)
            received.error = InvalidInstance("the C-STORE request has no data set")
        try:
            status = store_response(
                self.services.archive,
                self.actor,
                abstract_syntax=context.abstract_syntax,
                transfer_syntax=context.transfer_syntax,
                announced_class=command.AffectedSOPClassUID,
                sop_instance=command.AffectedSOPInstanceUID,
                received=received,
                data_set=received.memory,
            )
        finally:
            received.discard()  # as pynetdicom unlinks its file: a renamed one is gone
        code, comment = status_of(status)
        self._respond(
            message.context_id,
            response_command(
                RESPONSE | C_STORE_RQ,
                command.AffectedSOPClassUID,
                command.MessageID,
                code,
                error_comment=comment,
                sop_instance_uid=command.AffectedSOPInstanceUID,
            ),
        )

    def _find(self, message: _Message, command: Command, context: Accepted) -> None:
        pending_command = response_command(
            RESPONSE | C_FIND_RQ,
            command.AffectedSOPClassUID,
            command.MessageID,
            QueryStatus.PENDING,
            data_set=True,
        )
        identifier = bytes(message.data)
        responses = self.services.find.responses(
            self.actor,
            sop_class=command.AffectedSOPClassUID,
            extended=b"",
            transfer_syntax=context.transfer_syntax,
            identifier=lambda: _decoded(identifier, context),
            cancelled=lambda: self._cancelled(command.MessageID),
        )
        final: Any = QueryStatus.SUCCESS
        with contextlib.closing(responses):
            for status, answer in responses:
                code, _comment = status_of(status)
                if code == QueryStatus.PENDING and answer is not None:
                    encoded = encoded_match(
                        answer, context.implicit, context.little, context.deflated
                    )
                    for pdvs in pdus(
                        message.context_id,
                        pending_command,
                        encoded,
                        self.negotiated.peer_max_pdu,
                    ):
                        self._send(p_data_tf(pdvs))
                    if self._closed:
                        return
                    continue
                final = status
                break
        code, comment = status_of(final)
        self._respond(
            message.context_id,
            response_command(
                RESPONSE | C_FIND_RQ,
                command.AffectedSOPClassUID,
                command.MessageID,
                code,
                error_comment=comment,
            ),
        )

    def _cancelled(self, message_id: int) -> bool:
        """Whether a C-CANCEL-RQ for ``message_id`` arrived (PS3.7 9.3.2.3), or the
        association is ending; a release or abort is kept for the main loop."""
        while self._readable():
            kind, body = self._read_pdu()
            if kind != P_DATA_TF:
                self._early.append((kind, body))
                return True
            for message in self._messages(body):
                parsed = message.parsed
                assert parsed is not None
                if parsed.CommandField != C_CANCEL_RQ:
                    raise ProtocolError("a new request while a C-FIND is being answered")
                if parsed.MessageIDBeingRespondedTo == message_id:
                    return True
        return False

    def _readable(self) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            ready, _w, _x = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def _respond(self, context_id: int, command: bytes) -> None:
        """A response without a data set: its command set in one PDV."""
        self._send(p_data_tf([(context_id, bytes((COMMAND_LAST,)) + command)]))

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if self._closed:
                raise OSError("the association was closed")
            self.sock.sendall(data)

    def _abort(self, pdu: bytes) -> None:
        self._send_quietly(pdu)
        self._linger()

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._send(data)

    def _linger(self) -> None:
        """After an A-RELEASE-RP or A-ABORT the peer closes (PS3.8 7.2, 7.3.1): what it
        still sends is read and dropped until then, at most :data:`LINGER_S`, so that
        closing first does not reset the connection under the PDU it has to read."""
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    return

    def _discard(self) -> None:
        message = self._message
        if message is not None and message.received is not None:
            message.received.discard()
        self._message = None

    def _close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def _is_storage(uid: str) -> bool:
    """Of the accepted contexts (see ``DirectServices.served``), the storage ones."""
    return uid not in MODELS and uid != str(Verification)


def _decoded(identifier: bytes, context: Accepted) -> Dataset:
    return decode(io.BytesIO(identifier), context.implicit, context.little, context.deflated)
