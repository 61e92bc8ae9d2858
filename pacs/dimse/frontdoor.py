"""The DIMSE front door: what a connection must do before it becomes an association.

pynetdicom gives every accepted connection an Association at once, counts it against
the association limit before it has sent a byte, and runs the TLS handshake on the
accepting thread: a handful of idle sockets then lock every modality out. Here each
connection first proves itself on its own thread, within ``handshake_timeout``: the TLS
handshake, then one complete A-ASSOCIATE-RQ no longer than the negotiation limit. Until
then it costs a thread and a socket and counts against nothing but the pending limit.
Only a complete request is checked against the AE title rules of the peer's network
and the association caps (in total and per peer address, shared by every DIMSE worker
process), and is then either handed to pynetdicom together with the bytes already read
or answered with an A-ASSOCIATE-RJ that says why (PS3.8 9.3.4).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import multiprocessing
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_SERVICE_USER = 1
SOURCE_PROVIDER_PRESENTATION = 3
SOURCE_PROVIDER_ACSE = 2
REASON_NO_REASON = 1
REASON_CALLING_AE_NOT_RECOGNIZED = 3
REASON_CALLED_AE_NOT_RECOGNIZED = 7
REASON_LOCAL_LIMIT_EXCEEDED = 2
# How long a refused requestor is given to close its end (the ARTIM timer's role).
REFUSAL_LINGER_S = 5.0

_ASSOCIATE_RQ = 0x01
_HEADER = struct.Struct(">BBL")
# Called and Calling AE Title: bytes 11-26 and 27-42 of the A-ASSOCIATE-RQ (PS3.8 9.3.2).
_CALLED_AE = slice(10, 26)
_CALLING_AE = slice(26, 42)
_VARIABLE_ITEMS = 74
_ITEM = struct.Struct(">BBH")
# User Identity Type (PS3.7 D.3.3.7.1): username, username+passcode, Kerberos, SAML, JWT.
_USER_IDENTITY_TYPES = range(1, 6)


class Dropped(Exception):
    """The connection is closed without an answer: it never sent a usable request."""


class Refusal(Exception):
    """Answered with an A-ASSOCIATE-RJ carrying these values, then closed."""

    def __init__(
        self,
        reason_text: str,
        result: int = REJECTED_TRANSIENT,
        source: int = SOURCE_PROVIDER_PRESENTATION,
        reason: int = REASON_LOCAL_LIMIT_EXCEEDED,
    ) -> None:
        super().__init__(reason_text)
        self.result = result
        self.source = source
        self.reason = reason

    def pdu(self) -> bytes:
        return bytes((0x03, 0x00)) + struct.pack(
            ">LBBBB", 4, 0, self.result, self.source, self.reason
        )


def calling_ae_title(request: bytes) -> str:
    """The Calling AE Title of an A-ASSOCIATE-RQ PDU (header included)."""
    return request[_CALLING_AE].decode("ascii", "replace").strip()


def called_ae_title(request: bytes) -> str:
    return request[_CALLED_AE].decode("ascii", "replace").strip()


def malformed(request: bytes) -> str | None:
    """What is wrong with the structure of an A-ASSOCIATE-RQ (PS3.8 9.3.2), or None.

    pynetdicom trusts what it decodes: an even or zero presentation context ID (9.3.2.2
    says odd, 1-255), a repeated one, or a user identity of an unknown type kills the
    thread reading the association, which then holds its place until acse_timeout. Such
    a request is refused here, before pynetdicom sees it.
    """
    position, end = _VARIABLE_ITEMS, len(request)
    context_ids: set[int] = set()
    while position < end:
        if position + _ITEM.size > end:
            return "an item header runs past the end of the request"
        kind, _reserved, length = _ITEM.unpack_from(request, position)
        body = position + _ITEM.size
        if body + length > end:
            return f"item 0x{kind:02X} claims {length} bytes past the end of the request"
        if kind == 0x20:
            if length < 4:
                return "a presentation context item is too short"
            context_id = request[body]
            if context_id % 2 == 0:
                return f"presentation context ID {context_id} is not odd"
            if context_id in context_ids:
                return f"presentation context ID {context_id} is given twice"
            context_ids.add(context_id)
            problem = _sub_items(request, body + 4, body + length, (0x30, 0x40))
            if problem:
                return problem
        elif kind == 0x50:
            problem = _sub_items(request, body, body + length, range(0x51, 0x60))
            if problem:
                return problem
        elif kind != 0x10:
            return f"item type 0x{kind:02X} is not one of an A-ASSOCIATE-RQ"
        position = body + length
    if not context_ids:
        return "no presentation context is proposed"
    return None


def _sub_items(request: bytes, position: int, end: int, kinds: Iterable[int]) -> str | None:
    allowed = set(kinds)
    while position < end:
        if position + _ITEM.size > end:
            return "a sub-item header runs past the end of its item"
        kind, _reserved, length = _ITEM.unpack_from(request, position)
        body = position + _ITEM.size
        if body + length > end:
            return f"sub-item 0x{kind:02X} runs past the end of its item"
        if kind not in allowed:
            return f"sub-item 0x{kind:02X} does not belong in its item"
        if kind == 0x58 and (length < 1 or request[body] not in _USER_IDENTITY_TYPES):
            identity = request[body] if length else None
            return f"user identity type {identity} is not one of PS3.7 D.3.3.7.1"
        position = body + length
    return None


@dataclass(frozen=True)
class CallingRules:
    """Which calling AE titles may associate from which networks.

    No rules: any peer. Otherwise a peer must be inside one of the networks, and its
    calling AE title in that network's list (``*`` allows any title from there).
    """

    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, frozenset[str]], ...] = ()

    @classmethod
    def parse(cls, rules: Mapping[str, Iterable[str]]) -> CallingRules:
        parsed = []
        for network, titles in rules.items():
            try:
                net = ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not a network (a.b.c.d/nn): {exc}") from exc
            parsed.append((net, frozenset(t.strip() for t in titles)))
        return cls(tuple(parsed))

    def allows(self, host: str, calling_ae: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        for network, titles in self.networks:
            if address in network and ("*" in titles or calling_ae in titles):
                return True
        return False


class AssociationCounts:
    """Open associations per peer address, in shared memory.

    Every DIMSE worker process writes only its own row, so that the row of a process
    that died can be cleared by its supervisor without knowing what it held; admitting
    reads all rows under one lock, which makes the caps exact across processes.
    """

    def __init__(self, rows: int, slots: int, context: Any = None) -> None:
        context = context or multiprocessing.get_context("spawn")
        self.rows = rows
        self.slots = slots
        self.row = 0
        self._lock = context.Lock()
        self._keys = context.RawArray(ctypes.c_uint64, rows * slots)
        self._counts = context.RawArray(ctypes.c_int32, rows * slots)

    def for_row(self, row: int) -> AssociationCounts:
        """The same counts, written by worker ``row``."""
        if not 0 <= row < self.rows:
            raise ValueError(f"row {row} is not in 0..{self.rows - 1}")
        clone = object.__new__(AssociationCounts)
        clone.__dict__.update(self.__dict__)
        clone.row = row
        return clone

    @staticmethod
    def _key(host: str) -> int:
        key = int.from_bytes(hashlib.blake2b(host.encode(), digest_size=8).digest(), "little")
        return key or 1

    def admit(self, host: str, max_total: int, max_per_host: int) -> str | None:
        """Count one more association from ``host``; the reason when a cap forbids it."""
        key = self._key(host)
        with self._lock:
            total = sum(self._counts)
            if total >= max_total:
                return f"{total} associations are open, the limit is {max_total}"
            mine = sum(count for k, count in zip(self._keys, self._counts, strict=True) if k == key)
            if mine >= max_per_host:
                return f"{host} has {mine} associations open, the limit per peer is {max_per_host}"
            start = self.row * self.slots
            free = None
            for slot in range(start, start + self.slots):
                if self._keys[slot] == key and self._counts[slot] > 0:
                    self._counts[slot] += 1
                    return None
                if free is None and self._counts[slot] == 0:
                    free = slot
            if free is None:
                return f"{self.slots} peers already have associations with this process"
            self._keys[free] = key
            self._counts[free] = 1
            return None

    def release(self, host: str) -> None:
        key = self._key(host)
        with self._lock:
            start = self.row * self.slots
            for slot in range(start, start + self.slots):
                if self._keys[slot] == key and self._counts[slot] > 0:
                    self._counts[slot] -= 1
                    return

    def clear_row(self, row: int) -> None:
        with self._lock:
            for slot in range(row * self.slots, (row + 1) * self.slots):
                self._counts[slot] = 0

    def total(self) -> int:
        with self._lock:
            return sum(self._counts)


def server_tls_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """TLS 1.2+ for the DIMSE port; with ``client_ca`` a client certificate is required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class FrontDoor:
    """The limits every new DIMSE connection passes, shared by one server's threads."""

    counts: AssociationCounts
    max_associations: int = 32
    max_per_host: int = 16
    max_pending: int = 256
    max_pending_per_host: int = 32
    # The AE title a request must call, when it is checked (empty: any).
    called_ae_title: str = ""
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    negotiation_limit: int = 1 << 20
    rules: CallingRules = field(default_factory=CallingRules)
    tls: ssl.SSLContext | None = None
    on_refused: Callable[[str, str, str], None] = lambda host, ae, reason: None
    _pending: int = 0
    _pending_by_host: dict[str, int] = field(default_factory=dict)
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, connection: socket.socket, host: str) -> tuple[socket.socket, bytes]:
        """The (TLS-wrapped) socket and the A-ASSOCIATE-RQ it sent, admitted and counted.

        Raises :class:`Dropped` or :class:`Refusal` (already answered) with the
        connection closed; the caller must :meth:`leave` once an admitted one ends.
        """
        with self._pending_lock:
            if self._pending >= self.max_pending:
                _close(connection)
                raise Dropped(f"{self._pending} connections are still negotiating")
            mine = self._pending_by_host.get(host, 0)
            if mine >= self.max_pending_per_host:
                # One address cannot take the places every other peer needs to get in.
                _close(connection)
                raise Dropped(f"{host} has {mine} connections still negotiating")
            self._pending += 1
            self._pending_by_host[host] = mine + 1
        sock = connection
        try:
            deadline = time.monotonic() + self.handshake_timeout
            if self.tls is not None:
                sock = _tls_handshake(connection, self.tls, deadline)
            request = _read_request(sock, deadline, self.negotiation_limit)
            calling = calling_ae_title(request)
            refusal = self._refusal(host, calling, request)
            if refusal is not None:
                self.on_refused(host, calling, str(refusal))
                _answer(sock, refusal.pdu(), deadline)
                _await_close(sock, min(deadline, time.monotonic() + REFUSAL_LINGER_S))
                raise refusal
        except BaseException:
            _close(sock)
            _close(connection)
            raise
        finally:
            with self._pending_lock:
                self._pending -= 1
                left = self._pending_by_host[host] - 1
                if left:
                    self._pending_by_host[host] = left
                else:
                    del self._pending_by_host[host]
        sock.setblocking(True)
        sock.settimeout(self.idle_timeout)
        return sock, request

    def _refusal(self, host: str, calling: str, request: bytes) -> Refusal | None:
        problem = malformed(request)
        if problem is not None:
            return Refusal(
                f"malformed A-ASSOCIATE-RQ: {problem}",
                REJECTED_PERMANENT,
                SOURCE_PROVIDER_ACSE,
                REASON_NO_REASON,
            )
        called = called_ae_title(request)
        if self.called_ae_title and called != self.called_ae_title:
            return Refusal(
                f"called AE title {called!r} is not this server's {self.called_ae_title!r}",
                REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLED_AE_NOT_RECOGNIZED,
            )
        if not self.rules.allows(host, calling):
            return Refusal(
                f"calling AE title {calling!r} is not allowed from {host}",
                REJECTED_PERMANENT,
                SOURCE_SERVICE_USER,
                REASON_CALLING_AE_NOT_RECOGNIZED,
            )
        reason = self.counts.admit(host, self.max_associations, self.max_per_host)
        return None if reason is None else Refusal(reason)

    def leave(self, host: str) -> None:
        self.counts.release(host)


def _wait(sock: socket.socket, deadline: float, *, write: bool = False) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Dropped("no complete A-ASSOCIATE-RQ within the handshake time")
    readable, writable, _ = select.select(
        [] if write else [sock], [sock] if write else [], [], remaining
    )
    if not readable and not writable:
        raise Dropped("no complete A-ASSOCIATE-RQ within the handshake time")


def _tls_handshake(connection: socket.socket, context: ssl.SSLContext, deadline: float) -> Any:
    connection.setblocking(False)
    try:
        tls = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        raise Dropped(f"TLS: {exc}") from exc
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            _wait(tls, deadline)
        except ssl.SSLWantWriteError:
            _wait(tls, deadline, write=True)
        except (ssl.SSLError, OSError) as exc:
            raise Dropped(f"TLS handshake failed: {exc}") from exc


def _recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = sock.recv(min(count - len(data), 1 << 16))
        except (BlockingIOError, ssl.SSLWantReadError):
            _wait(sock, deadline)
            continue
        except ssl.SSLWantWriteError:
            _wait(sock, deadline, write=True)
            continue
        except OSError as exc:
            raise Dropped(f"connection failed: {exc}") from exc
        if not chunk:
            raise Dropped("closed before sending a complete A-ASSOCIATE-RQ")
        data += chunk
    return bytes(data)


def _read_request(sock: socket.socket, deadline: float, limit: int) -> bytes:
    sock.setblocking(False)
    header = _recv_exact(sock, _HEADER.size, deadline)
    pdu_type, _, length = _HEADER.unpack(header)
    if pdu_type != _ASSOCIATE_RQ:
        raise Dropped(f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ")
    if length > limit:
        raise Dropped(f"A-ASSOCIATE-RQ of {length} bytes announced, the limit is {limit}")
    if length < 68:
        raise Dropped(f"A-ASSOCIATE-RQ of {length} bytes is too short")
    return header + _recv_exact(sock, length, deadline)


def _answer(sock: socket.socket, pdu: bytes, deadline: float) -> None:
    """Best effort: the peer learns why, but a peer that does not read cannot hold us."""
    view = memoryview(pdu)
    with contextlib.suppress(Dropped, OSError):
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                _wait(sock, min(deadline, time.monotonic() + 1), write=True)
                continue
            view = view[sent:]


def _await_close(sock: socket.socket, deadline: float) -> None:
    """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, state
    Sta13): wait for that, reading what still comes, so that closing first does not
    reset the connection before the peer has read why it was refused."""
    with contextlib.suppress(Dropped, OSError):
        while True:
            try:
                if not sock.recv(4096):
                    return
            except (BlockingIOError, ssl.SSLWantReadError):
                _wait(sock, deadline)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
