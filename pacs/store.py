"""The blob store: durable writes of whole DICOM files under a folder the archive owns.

A write is: temporary file in ``staging/``, fsync, atomic rename into place, fsync of
the directory (and of every directory created on the way). The staging file's fsync
runs on a thread of its own while the archive reads the header and looks up the index;
the rename waits for it. Paths are built only from validated UIDs and a content hash,
so nothing a peer sends can name a path outside the data folder, and a replaced
instance gets a new file instead of being rewritten in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pacs.errors import StorageFailure
from pacs.uids import require_uid

_CHUNK = 1 << 20
_PARALLEL_HASH_MIN = 1 << 20
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


_HEX = frozenset("0123456789abcdef")


class FsBlobStore:
    """Files under ``root/objects``, staged under ``root/staging`` on the same file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.staging = root / "staging"
        for folder in (self.root, self.objects, self.staging):
            _ensure_dir(folder)
        self.objects = self.objects.resolve()  # absolute, as every path it gives out

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
        return StagingWriter(self.staging / f"{uuid.uuid4().hex}.part", head)

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

    def commit(self, staged: StagedBlob, relative: str) -> Path:
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
        return target

    def discard(self, staged: StagedBlob) -> None:
        """Unlinked at once: a duplicate does not wait for an fsync it will not keep (the
        fsync thread still owns the open file and closes it)."""
        _unlink_quietly(staged.path)

    def path(self, relative: str) -> Path:
        """``objects/relative``, refused when it could lead elsewhere. Checked on the
        text (no ``..``, not absolute): the store makes no links, and resolving each
        component cost every instance stored and read a system call per folder."""
        parts = PurePosixPath(relative).parts
        if relative.startswith("/") or ".." in parts or "\0" in relative:
            raise ValueError(f"path {relative!r} escapes the store")
        return self.objects / relative

    def open(self, relative: str) -> BinaryIO:
        return open(self.path(relative), "rb")

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
    :meth:`finish` gives the same durable :class:`StagedBlob` as :meth:`FsBlobStore.stage`.
    """

    def __init__(self, path: Path, head: bytes) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
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

    def finish(self) -> StagedBlob:
        """All bytes handed to the file system; their fsync started on a thread of its own."""
        try:
            self.out.flush()
        except OSError as exc:
            self.discard()
            raise StorageFailure(f"cannot write the instance: {_describe(exc)}") from exc
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
