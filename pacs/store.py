"""The blob store: durable writes of whole DICOM files, in a folder or in object storage.

Every store receives an instance the same way: into a staging file on this node's disk
(``staging/``), hashed on the way, where the archive reads its header. ``commit`` then
makes it a stored blob, durable before it returns, and the index row follows. Names are
built only from validated UIDs and a content hash, so nothing a peer sends can name a
place outside the store, and a replaced instance gets a new blob instead of being
rewritten in place.

:class:`FsBlobStore` keeps blobs under ``objects/``: fsync of the staging file (on a
thread of its own while the archive reads the header), atomic rename into place, fsync
of the directory and of every directory created on the way.
:class:`pacs.objectstore.S3BlobStore` uploads them to S3-compatible storage.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pacs import writeback
from pacs.errors import StorageFailure
from pacs.uids import require_uid

_CHUNK = 1 << 20
_PARALLEL_HASH_MIN = 1 << 20
# A staging file written in pieces asks for writeback of every this many bytes, so its
# fsync at the end finds most of it on disk already (pacs.writeback).
_WRITEBACK_STEP = 2 << 20
# fsync releases the GIL and waits on the disk; a few at a time let concurrent
# associations' writes reach the disk together.
_syncing = ThreadPoolExecutor(max_workers=16, thread_name_prefix="staging-fsync")


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """Bytes written under ``staging/``, not yet visible in the store; durable once
    :meth:`durable` returns (the store's commit calls it before the rename)."""

    path: Path
    size: int
    sha256: str
    syncing: Future[None] | None = None

    def durable(self) -> None:
        """Wait for the staging file's fsync; StorageFailure if it failed."""
        if self.syncing is None:
            return
        try:
            self.syncing.result()
        except OSError as exc:
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """One blob as the store lists it: its name (as :meth:`BlobStore.relative_path`
    makes them) and its size in bytes."""

    relative: str
    size: int


_HEX = frozenset("0123456789abcdef")


def check_relative(relative: str) -> str:
    """A blob's name, refused (ValueError) when it could lead out of the store. Checked
    on the text (no ``..``, not absolute, no NUL): the stores make no links, and
    resolving each component cost every instance stored and read a system call per
    folder."""
    if relative.startswith("/") or ".." in PurePosixPath(relative).parts or "\0" in relative:
        raise ValueError(f"path {relative!r} escapes the store")
    return relative


class BlobStore(ABC):
    """What the archive needs of a store; staging on this node's disk is common to all.

    ``shared``: other nodes write the same store (object storage), so a blob without an
    index row may be one of theirs, not yet committed.
    """

    shared = False

    def __init__(self, root: Path, *, sync_staging: bool = True) -> None:
        self.root = root
        self.staging = root / "staging"
        for folder in (self.root, self.staging):
            _ensure_dir(folder)
        self.sync_staging = sync_staging

    def stage(self, head: bytes, body: BinaryIO) -> StagedBlob:
        """Write ``head`` then the rest of ``body`` to a new staging file; it is durable
        when :meth:`commit` has renamed it (which waits for its fsync).

        An in-memory body (what DIMSE hands over) is written without copying and hashed
        on a second thread meanwhile: both release the GIL, so a large instance costs
        about one pass over its bytes instead of two.
        """
        writer = self.open_staging(head)
        try:
            if isinstance(body, io.BytesIO):
                with body.getbuffer() as whole:
                    view = whole[body.tell() :]
                    try:
                        writer.write(view)
                    finally:
                        view.release()
            else:
                while chunk := body.read(_CHUNK):
                    writer.write(chunk)
        except OSError as exc:
            writer.discard()
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
        except BaseException:
            writer.discard()
            raise
        return writer.finish()

    def open_staging(self, head: bytes) -> StagingWriter:
        """A staging file that receives a data set piece by piece (see :meth:`stage`)."""
        return StagingWriter(self.staging / f"{uuid.uuid4().hex}.part", head, self.sync_staging)

    def relative_path(
        self, StudyInstanceUID: str, SeriesInstanceUID: str, SOPInstanceUID: str, sha256: str
    ) -> str:
        """Where an instance lives, relative to ``objects/``; UIDs are checked here again."""
        study = require_uid(StudyInstanceUID, "StudyInstanceUID")
        series = require_uid(SeriesInstanceUID, "SeriesInstanceUID")
        sop = require_uid(SOPInstanceUID, "SOPInstanceUID")
        if len(sha256) != 64 or not _HEX.issuperset(sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        fan = hashlib.sha1(study.encode("ascii"), usedforsecurity=False).hexdigest()
        return f"{fan[:2]}/{fan[2:4]}/{study}/{series}/{sop}.{sha256[:16]}.dcm"

    def discard(self, staged: StagedBlob) -> None:
        """Unlinked at once: a duplicate does not wait for an fsync it will not keep (the
        fsync thread still owns the open file and closes it)."""
        _unlink_quietly(staged.path)

    @abstractmethod
    def commit(self, staged: StagedBlob, relative: str) -> None:
        """Make a staged blob the stored ``relative``, durable when this returns; on
        failure (StorageFailure) neither the staging file nor a partial blob is left."""

    @abstractmethod
    def open(self, relative: str) -> BinaryIO:
        """The stored bytes, seekable; FileNotFoundError when there is no such blob."""

    @abstractmethod
    def delete(self, relative: str) -> None:
        """Remove a blob durably; one that is already gone is not an error."""

    @abstractmethod
    def local(self, relative: str) -> contextlib.AbstractContextManager[Path]:
        """A file on this node with the blob's bytes, for readers that need a path (the
        inflater, the equivalence check); valid inside the ``with``."""

    @abstractmethod
    def listing(self) -> Iterator[StoredBlob]:
        """Every stored blob (not staging files, not set-aside ones)."""

    @abstractmethod
    def set_aside(self, relative: str) -> str:
        """Move a blob out of the store to ``orphans/`` for an operator; where it went."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the blobs are, for logs and messages."""


class FsBlobStore(BlobStore):
    """Files under ``root/objects``, staged under ``root/staging`` on the same file system."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.objects = root / "objects"
        _ensure_dir(self.objects)
        self.objects = self.objects.resolve()  # absolute, as every path it gives out

    @property
    def location(self) -> str:
        return str(self.objects)

    def commit(self, staged: StagedBlob, relative: str) -> None:
        """Move a staged blob to its place and make the new directory entry durable."""
        target = self.path(relative)
        try:
            staged.durable()
        except StorageFailure:
            _unlink_quietly(staged.path)
            raise
        try:
            _ensure_dir(target.parent)
            os.replace(staged.path, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            _unlink_quietly(staged.path)
            raise StorageFailure(f"cannot store the instance: {_describe(exc)}") from exc

    def path(self, relative: str) -> Path:
        """``objects/relative``, refused when it could lead elsewhere (the empty name is
        the folder itself)."""
        return self.objects / check_relative(relative)

    def open(self, relative: str) -> BinaryIO:
        return open(self.path(relative), "rb")

    @contextmanager
    def local(self, relative: str) -> Iterator[Path]:
        yield self.path(relative)

    def listing(self) -> Iterator[StoredBlob]:
        for folder, _dirs, names in os.walk(self.objects):
            for name in sorted(names):
                path = Path(folder) / name
                yield StoredBlob(str(path.relative_to(self.objects)), path.stat().st_size)

    def set_aside(self, relative: str) -> str:
        target = self.root / "orphans" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(relative), target)
        return str(target)

    def delete(self, relative: str) -> None:
        """Remove a blob and the directories it leaves empty, durably."""
        target = self.path(relative)
        try:
            target.unlink()
        except FileNotFoundError:
            return
        folder = target.parent
        _fsync_dir(folder)
        objects = self.objects.resolve()
        while folder != objects:
            try:
                folder.rmdir()
            except OSError:
                break
            _fsync_dir(folder.parent)
            folder = folder.parent


class StagingWriter:
    """A staging file written in pieces as they arrive, hashed on the way.

    For data sets too large to hold in memory: nothing is read back to hash it, and
    :meth:`finish` gives the same :class:`StagedBlob` as :meth:`BlobStore.stage`.
    """

    def __init__(self, path: Path, head: bytes, sync: bool = True) -> None:
        self.path = path
        self.sync = sync
        self.digest = hashlib.sha256()
        self.size = 0
        self._written_back = 0
        self._syncing: Future[None] | None = None
        try:
            self.out: BinaryIO = open(path, "xb")  # noqa: SIM115 (closed by finish/discard)
        except OSError as exc:
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
        self.write(head)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Large pieces are hashed on a second thread while written: both release the GIL."""
        hasher = None
        if len(data) >= _PARALLEL_HASH_MIN:
            hasher = threading.Thread(target=self.digest.update, args=(data,))
            hasher.start()
        else:
            self.digest.update(data)
        try:
            self.out.write(data)
        except OSError as exc:
            self.discard()
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
        finally:
            if hasher is not None:
                hasher.join()
        self.size += len(data)
        if self.sync and self.size - self._written_back >= _WRITEBACK_STEP:
            self._write_back()

    def _write_back(self) -> None:
        try:
            self.out.flush()
            writeback.start_writeback(
                self.out.fileno(), self._written_back, self.size - self._written_back
            )
        except OSError as exc:
            self.discard()
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
        self._written_back = self.size

    def finish(self) -> StagedBlob:
        """All bytes handed to the file system; their fsync started on a thread of its own
        (none when the store's durability is elsewhere: an upload)."""
        try:
            self.out.flush()
            if not self.sync:
                self.out.close()
        except OSError as exc:
            self.discard()
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
        if not self.sync:
            return StagedBlob(path=self.path, size=self.size, sha256=self.digest.hexdigest())
        syncing = self._syncing = _syncing.submit(_sync_and_close, self.out)
        return StagedBlob(
            path=self.path, size=self.size, sha256=self.digest.hexdigest(), syncing=syncing
        )

    def discard(self) -> None:
        if self._syncing is None:  # once finished, the fsync thread owns and closes the file
            with contextlib.suppress(OSError):
                self.out.close()
        _unlink_quietly(self.path)


def _sync_and_close(out: BinaryIO) -> None:
    try:
        os.fsync(out.fileno())
    finally:
        out.close()


def _ensure_dir(folder: Path) -> None:
    """mkdir -p, fsyncing each parent that gained an entry so the path survives power loss."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(created.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the archive's disk"
    return exc.strerror or str(exc)
