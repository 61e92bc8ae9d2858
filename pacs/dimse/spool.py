"""C-STORE data sets received in pieces: small ones in memory, large ones straight to staging.

Without help pynetdicom gathers a C-STORE data set in a BytesIO and the handler copies
it: a 200 MiB instance costs 400 MiB, per association. With its chunked receive on,
each P-DATA fragment is written as it arrives to a file object that pynetdicom asks
``dimse_messages.NamedTemporaryFile`` for; here that name gives a :class:`Spool` to the
associations of our servers. A spool keeps up to :data:`MEMORY_LIMIT` bytes in memory
(most instances never touch a second file), and past that writes our own Part 10 header
and every following fragment into a staging file of the archive's store, hashing on
the way, so that the archive only fsyncs and renames it. Associations not registered
here (a test's own Storage SCP in the same process) get pynetdicom's temporary file.

Once a data set goes to a staging file, its pieces are written (and hashed) on a thread
of the spool's own while the association reads the next PDU, so the network and the
disk work at the same time instead of in turn; at most :data:`IN_FLIGHT` pieces wait.
"""

from __future__ import annotations

import io
import logging
import queue
import struct
import threading
import uuid
import weakref
from collections.abc import Callable
from tempfile import NamedTemporaryFile
from typing import Any

from pynetdicom import _config, dimse_messages

from pacs.errors import InstanceTooLarge, PacsError, StorageFailure
from pacs.part10 import FileMeta, encode_file_meta, read_file_meta
from pacs.store import BlobStore, StagedBlob, StagingWriter

log = logging.getLogger(__name__)

MEMORY_LIMIT = 2 << 20
# Pieces received but not yet written; receiving waits beyond this.
IN_FLIGHT = 4
_META_START = 132  # preamble and "DICM"
_GROUP_LENGTH = struct.Struct("<L")

_stores: weakref.WeakKeyDictionary[threading.Thread, BlobStore] = weakref.WeakKeyDictionary()
_limits = {"max_instance_bytes": 4 << 30}
_install_lock = threading.Lock()


class _WriteBehind:
    """A staging file's writes on a thread of their own, in order.

    Pieces are kept by reference until written: they must not change afterwards, as
    a received PDU's bytes do not (each PDU is read into a buffer of its own).
    """

    def __init__(self, writer: StagingWriter) -> None:
        self.writer = writer
        self.error: PacsError | None = None
        self._pieces: queue.Queue[bytes | bytearray | memoryview | None] = queue.Queue(
            maxsize=IN_FLIGHT
        )
        self._thread = threading.Thread(target=self._run, name="staging-writer", daemon=True)
        self._thread.start()

    def put(self, data: bytes | bytearray | memoryview) -> None:
        self._pieces.put(data)

    def _run(self) -> None:
        while (data := self._pieces.get()) is not None:
            if self.error is not None:
                continue  # the rest is drained unwritten; the sender gets the failure
            try:
                self.writer.write(data)
            except PacsError as exc:
                self.error = exc
            except Exception as exc:  # the thread must go on draining, or receiving blocks
                log.exception("writing a staging file failed")
                self.error = StorageFailure(f"cannot write the instance: {exc}")

    def drain(self) -> PacsError | None:
        """Wait until every piece is written: the first failure, if any."""
        if self._thread.is_alive():
            self._pieces.put(None)
            self._thread.join()
        return self.error


class Spool:
    """The file-like object pynetdicom writes one C-STORE data set into."""

    def __init__(self, store: BlobStore, max_bytes: int | None = None) -> None:
        self.store = store
        self.max_bytes = _limits["max_instance_bytes"] if max_bytes is None else max_bytes
        self.received = 0
        self.meta: FileMeta | None = None
        self.error: PacsError | None = None
        self.memory = io.BytesIO()
        self.head_length = 0
        self._header = bytearray()
        self._writer: StagingWriter | None = None
        self._behind: _WriteBehind | None = None
        self._missing = store.staging / f"{uuid.uuid4().hex}.unused"

    @property
    def file(self) -> Spool:
        """pynetdicom flushes ``file.file`` after every fragment."""
        return self

    @property
    def name(self) -> str:
        """pynetdicom unlinks this after the handler: the staging file, or nothing."""
        return str(self._writer.path if self._writer is not None else self._missing)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.meta is None and self.error is None:
            self._header += data
            self._parse_header()
        elif self.error is None:
            self._keep(data)
        return len(data)

    def _parse_header(self) -> None:
        """pynetdicom writes preamble, prefix and its meta group first: read the identity."""
        if len(self._header) < _META_START + 12:
            return
        (length,) = _GROUP_LENGTH.unpack_from(self._header, _META_START + 8)
        end = _META_START + 12 + length
        if len(self._header) < end:
            return
        try:
            self.meta = read_file_meta(io.BytesIO(bytes(self._header[:end])))
        except PacsError as exc:
            self.error = exc
            return
        rest = bytes(self._header[end:])
        self._header = bytearray()
        if rest:
            self._keep(rest)

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        if self.received > self.max_bytes:
            # Past max_instance_bytes nothing more is kept; the handler refuses it.
            self.error = InstanceTooLarge(
                f"the data set has more than max_instance_bytes {self.max_bytes} bytes"
            )
            self.discard()
            self._writer = self._behind = None
            self.memory = io.BytesIO()
            return
        if self._behind is not None:
            self._behind.put(data)
            return
        if self.memory.tell() + len(data) <= MEMORY_LIMIT:
            self.memory.write(data)
            return
        assert self.meta is not None
        head = encode_file_meta(self.meta)
        try:
            writer = self.store.open_staging(head)
        except PacsError as exc:
            self.error = exc
            self.memory = io.BytesIO()
            return
        self._writer = writer
        self.head_length = len(head)
        behind = self._behind = _WriteBehind(writer)
        behind.put(self.memory.getbuffer())
        behind.put(data)
        self.memory = io.BytesIO()
        # An association that ends mid-transfer never reaches the handler.
        weakref.finalize(self, _abandon, behind)

    def flush(self) -> None:
        """Nothing buffered here; :meth:`staged` fsyncs."""

    def close(self) -> None:
        """The handler already took what it needed."""

    def staged(self) -> StagedBlob | None:
        """The durable staging file of a large data set, or None when it is in memory;
        the failure to write it, raised."""
        if self._writer is None:
            return None
        failed = self._behind.drain() if self._behind is not None else None
        if failed is not None:
            self.discard()
            raise failed
        return self._writer.finish()

    def discard(self) -> None:
        if self._behind is not None:
            self._behind.drain()
        if self._writer is not None:
            self._writer.discard()


def _abandon(behind: _WriteBehind) -> None:
    behind.drain()
    behind.writer.discard()


def register(thread: threading.Thread, store: BlobStore) -> None:
    """Data sets received on ``thread`` (an association's DUL) go to ``store``'s staging."""
    _stores[thread] = store


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    store = _stores.get(threading.current_thread())
    if store is None:
        return NamedTemporaryFile(*args, **kwargs)
    return Spool(store)


def install(max_instance_bytes: int | None = None) -> None:
    """Turn on chunked receive for this process, with spools for registered threads."""
    with _install_lock:
        if max_instance_bytes is not None:
            _limits["max_instance_bytes"] = max_instance_bytes
        factory: Callable[..., Any] = _spool_file
        dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]
        _config.STORE_RECV_CHUNKED_DATASET = True


def received_data_set(request: Any) -> tuple[Spool | None, io.BytesIO]:
    """The spool of a C-STORE request (None without chunked receive) and its in-memory bytes."""
    spool = getattr(request, "_dataset_file", None)
    if isinstance(spool, Spool):
        return spool, spool.memory
    data = request.DataSet
    return None, data if isinstance(data, io.BytesIO) else io.BytesIO()
