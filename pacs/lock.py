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
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text

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

    def __init__(self, data_dir: Path, index: Index) -> None:
        self.data_dir = data_dir
        self.index = index
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
        if not self.index.is_sqlite:
            self._database = self.index.writer.connect()
            taken = self._database.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_KEY}
            ).scalar_one()
            self._database.commit()
            if not taken:
                self.release()
                raise ArchiveInUse(
                    f"the index {self.index.url.render_as_string(hide_password=True)} is in "
                    "use by another filmless serve (PostgreSQL advisory lock)"
                )

    def release(self) -> None:
        if self._database is not None:
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
