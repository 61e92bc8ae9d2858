"""The socket side of the DIMSE server: how PDUs are read, configured around pynetdicom.

pynetdicom reads a PDU by calling ``recv(4096)`` in a Python loop and growing a
bytearray, which under several concurrent associations spends most of the server's CPU
on loop iterations and GIL hand-offs rather than on storing instances. Here the PDU
body is read with ``recv_into`` straight into one buffer of its announced length, and
that length is checked against the limit we negotiated before anything is allocated,
so a peer that announces a 4 GiB PDU gets its connection closed, not a 4 GiB buffer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from pacs.dimse import spool
from pacs.dimse.direct import DirectServices
from pacs.dimse.frontdoor import Dropped, FrontDoor, Refusal
from pacs.dimse.reactor import mend
from pacs.dimse.wakeful import wakeful
from pacs.store import BlobStore

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

# Association negotiation PDUs are not bounded by the maximum PDU length; 128 proposed
# contexts with a few transfer syntaxes each fit comfortably in this.
MIN_PDU_LIMIT = 1 << 20
_RECV_BLOCK = 1 << 20


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that reads whole PDUs efficiently and refuses oversize ones.

    ``prefix`` holds the bytes the front door already read (the A-ASSOCIATE-RQ); they
    are returned first, and make the socket "ready" so that the DUL asks for them.
    """

    pdu_limit: int = MIN_PDU_LIMIT
    prefix: bytes = b""

    @property
    def ready(self) -> bool:
        return bool(self.prefix) or bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.pdu_limit:
            # The DUL treats OSError as a closed transport (Evt17) and aborts.
            raise OSError(
                f"peer announced a {nr_bytes} byte PDU, more than the {self.pdu_limit} allowed"
            )
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        received = 0
        if self.prefix:
            received = min(nr_bytes, len(self.prefix))
            buffer[:received] = self.prefix[:received]
            self.prefix = self.prefix[received:]
        view = memoryview(buffer)
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], min(nr_bytes - received, _RECV_BLOCK))
            if count == 0:
                del view
                return buffer[:received]
            received += count
        del view
        return buffer


class SharedPresentationContext(PresentationContext):
    """A supported context whose per-association copy is cheap.

    pynetdicom deep-copies every supported context for every association: with all
    storage SOP classes in all transfer syntaxes that is thousands of UID objects and
    tens of milliseconds per association. UIDs are immutable strings, so a copy of the
    object with its own transfer syntax list is as safe and costs microseconds.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedPresentationContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def shared_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    shared: list[PresentationContext] = []
    for context in contexts:
        clone = copy.copy(context)
        clone.__class__ = SharedPresentationContext
        shared.append(clone)
    return shared


class FilmlessRequestHandler(RequestHandler):
    server: FilmlessServer

    def handle(self) -> None:
        """Runs on the connection's own thread: the front door first, then pynetdicom."""
        host = str(self.client_address[0])
        door = self.server.front_door
        try:
            self.request, request = door.enter(self.request, host)
        except (Dropped, Refusal) as exc:
            log.info("connection from %s closed before association: %s", host, exc)
            self.server.connection_ended()
            return
        direct = self.server.direct
        store = self.server.spool_store
        negotiated = None if direct is None or store is None else direct.negotiate(request)
        if negotiated is not None:
            assert direct is not None
            assert store is not None
            with contextlib.suppress(OSError):
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                direct.serve(self.request, (host, int(self.client_address[1])), negotiated, store)
            finally:
                door.leave(host)
                self.server.connection_ended()
            return
        try:
            assoc = self._create_association()
        except BaseException:
            door.leave(host)
            self.server.connection_ended()
            raise
        sock = assoc.dul.socket
        assert isinstance(sock, BoundedSocket)
        sock.prefix = request
        if self.server.spool_store is not None:
            spool.register(assoc.dul, self.server.spool_store)
        ended = threading.Lock()
        run = assoc.run

        def run_then_leave() -> None:
            # However the association ends (release, abort, timeout, error), its thread
            # ends, and only then are its places in the counts given back.
            try:
                run()
            finally:
                if ended.acquire(blocking=False):
                    door.leave(host)
                    self.server.connection_ended()

        assoc.run = run_then_leave  # type: ignore[method-assign]
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _create_association(self) -> Association:
        assoc = wakeful(mend(super()._create_association()))
        sock = assoc.dul.socket
        assert isinstance(sock, AssociationSocket)
        # Same object, same state (it already announced the connection to the DUL);
        # only its recv changes.
        sock.__class__ = BoundedSocket
        assert isinstance(sock, BoundedSocket)
        # DIMSE answers are several small PDUs (a command, then its data set); with
        # Nagle's algorithm each second write waits for the peer's delayed ACK (~40 ms).
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        maximum = self.ae.maximum_pdu_size
        sock.pdu_limit = max(MIN_PDU_LIMIT, maximum + 16) if maximum else 1 << 31
        return assoc


class FilmlessServer(ThreadedAssociationServer):
    """pynetdicom's threaded server behind a :class:`FrontDoor`."""

    front_door: FrontDoor  # set by serve_in_thread / handoff_server before any connection
    # Storage and query associations served without pynetdicom (pacs.dimse.direct).
    direct: DirectServices | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = FilmlessRequestHandler
        super().__init__(*args, **kwargs)
        self.on_connection_end: Callable[[], None] | None = None
        # Where large C-STORE data sets are written as they arrive (see pacs.dimse.spool).
        self.spool_store: BlobStore | None = None

    @property
    def active_associations(self) -> list[Any]:
        """pynetdicom's associations and ours: each has ``is_established``."""
        direct = [] if self.direct is None else self.direct.live()
        return [*super().active_associations, *direct]

    def server_close(self) -> None:
        """As pynetdicom's AE aborts its associations when it shuts down, so are ours,
        before the server waits for their threads."""
        if self.direct is not None:
            self.direct.abort_all()
        super().server_close()

    def connection_ended(self) -> None:
        if self.on_connection_end is not None:
            self.on_connection_end()


def serve_in_thread(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    front_door: FrontDoor,
    *,
    spool_store: BlobStore | None = None,
    direct: DirectServices | None = None,
) -> FilmlessServer:
    """Bind now (errors surface to the caller), then accept in a daemon thread."""
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        contexts=shared_contexts(ae.supported_contexts),
        server_class=FilmlessServer,
    )
    assert isinstance(server, FilmlessServer)
    server.front_door = front_door
    server.spool_store = spool_store
    server.direct = direct
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(
        target=server.serve_forever, name=f"DimseAcceptor@{stamp}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # so that server.shutdown() and ae.shutdown() find it
    return server


class HandoffServer(FilmlessServer):
    """Serves associations on connections that another process accepted.

    A supervising process owns the listening socket and passes each accepted connection
    over a Unix socket to the worker with the fewest open associations, so that every
    core runs its own interpreter and no worker idles while another is overloaded.
    """

    def server_bind(self) -> None:
        """Connections arrive through :meth:`serve_handoffs`, nothing to bind."""

    def server_activate(self) -> None:
        """Nothing listens here."""

    def serve_handoffs(self, channel: socket.socket) -> None:
        """Take connections from ``channel`` until it closes."""
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(channel, 1024, 1)
            except OSError:
                return
            if not fds:
                return
            connection = socket.socket(fileno=fds[0])
            try:
                host, port = json.loads(message)
            except ValueError:
                host, port = "", 0
            self.process_request(connection, (str(host), int(port)))

    def shutdown(self) -> None:
        """Stop taking connections and wait for the open associations to end."""
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)
        self.server_close()


def handoff_server(
    ae: AE,
    evt_handlers: list[Any],
    front_door: FrontDoor,
    *,
    spool_store: BlobStore | None = None,
    direct: DirectServices | None = None,
) -> HandoffServer:
    server = ae.make_server(
        ("127.0.0.1", 0),
        evt_handlers=evt_handlers,
        contexts=shared_contexts(ae.supported_contexts),
        server_class=HandoffServer,
    )
    assert isinstance(server, HandoffServer)
    server.front_door = front_door
    server.spool_store = spool_store
    server.direct = direct
    ae._servers.append(server)
    return server
