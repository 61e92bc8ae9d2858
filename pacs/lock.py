"""One server per archive: the data folder (and a PostgreSQL index) is locked before anything
touches it.

A second ``filmless serve`` on the same folder would reconcile the store against the
index at startup, moving the files of instances the first one is storing that moment
out of the store, acknowledged ones included. So the server takes an exclusive lock on
``data_dir/.lock`` first and fails at once, changing nothing, if another holds it. The
DIMSE worker processes hold a shared lock on ``data_dir/.workers.lock`` while they run:
a server killed with ``kill -9`` leaves its workers finishing their associations, and a
new server must not reconcile under them either. On PostgreSQL, where several folders
could point at one index, the server also holds an advisory lock of the database.

Nodes that share object storage and a PostgreSQL index are meant to run side by side:
each holds the advisory lock shared. A node that finds none of the others running gets
it exclusively first, and only then sets aside blobs without a row (:attr:`alone`);
``reindex`` always needs it exclusively, so it never runs under a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from pacs.errors import ArchiveInUse
from pacs.index import Index

LOCK_FILE = ".lock"
WORKERS_LOCK_FILE = ".workers.lock"
# pg_try_advisory_lock key: "filmless" in ASCII.
_ADVISORY_KEY = 0x66696C6D6C657373


def _open(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+b")


class ArchiveLock:
    """Held by a process that may change the archive behind others' backs (``serve``,
    ``reindex``) for as long as it runs."""

    def __init__(
        self, data_dir: Path, index: Index, *, shared: bool = False, wait_seconds: float = 30.0
    ) -> None:
        self.data_dir = data_dir
        self.index = index
        self.shared = shared
        self.wait_seconds = wait_seconds
        # No other process holds the archive: safe to act on what only they could own.
        self.alone = False
        self._file: IO[bytes] | None = None
        self._database: Connection | None = None

    def acquire(self) -> None:
        """Take the locks or raise :class:`ArchiveInUse` saying who holds them."""
        handle = _open(self.data_dir / LOCK_FILE)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "another process"
            handle.close()
            raise ArchiveInUse(
                f"the data folder {self.data_dir} is in use by {holder}: one filmless serve "
                "(or reindex) per archive; stop it first"
            ) from None
        workers = _open(self.data_dir / WORKERS_LOCK_FILE)
        try:
            fcntl.flock(workers, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            workers.close()
            handle.close()
            raise ArchiveInUse(
                f"DIMSE workers of a filmless serve that stopped are still finishing their "
                f"associations on {self.data_dir}; start again once they are gone"
            ) from None
        workers.close()  # nobody else runs: the new workers take it shared
        handle.seek(0)
        handle.truncate()
        handle.write(f"filmless pid {os.getpid()}\n".encode())
        handle.flush()
        self._file = handle
        if self.index.is_sqlite:
            self.alone = True
            return
        self._database = self.index.writer.connect()
        self.alone = self._advisory("pg_try_advisory_lock")
        if self.alone or (self.shared and self._join()):
            return
        self.release()
        raise ArchiveInUse(
            f"the index {self.index.url.render_as_string(hide_password=True)} is in use by "
            + (
                "filmless reindex (or a node setting blobs aside); try again later"
                if self.shared
                else "another filmless serve (PostgreSQL advisory lock); several nodes on "
                "one index need object storage (s3_bucket)"
            )
        )

    def share(self) -> None:
        """Let other nodes join: from the exclusive lock to a shared one (a node of a
        shared store calls it once it has done what needed it alone)."""
        if self._database is None or not self.shared or not self.alone:
            return
        self._advisory("pg_advisory_lock_shared")
        self._advisory("pg_advisory_unlock")
        self.alone = False

    def _join(self) -> bool:
        """The lock shared beside running nodes; a node reconciling alone holds it only
        for a moment, so it is waited for."""
        deadline = time.monotonic() + self.wait_seconds
        while not self._advisory("pg_try_advisory_lock_shared"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def _advisory(self, function: str) -> bool:
        assert self._database is not None
        taken = self._database.execute(
            text(f"SELECT {function}(:key)"), {"key": _ADVISORY_KEY}
        ).scalar()
        self._database.commit()
        return taken is None or bool(taken)

    def release(self) -> None:
        if self._database is not None:
            # Session locks outlive close(): the connection goes back to the pool.
            with contextlib.suppress(SQLAlchemyError):
                self._database.execute(text("SELECT pg_advisory_unlock_all()"))
                self._database.commit()
            self._database.close()
            self._database = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ArchiveLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def hold_as_worker(data_dir: Path) -> IO[bytes]:
    """The shared lock a DIMSE worker keeps until it exits (closing the file frees it)."""
    handle = _open(data_dir / WORKERS_LOCK_FILE)
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle
