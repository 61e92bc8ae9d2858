"""The archive against its index: what a crash can leave behind, and what the disk lost.

:func:`reconcile` runs at startup, before anything is received. A staging file was never
acknowledged (Success follows the index commit), so it goes. A stored file without an
index row was renamed into place but not committed, so never acknowledged either: it
is moved to ``orphans/`` rather than deleted, for an operator to look at; in a store
other nodes share, only by a node that knows no other is running (``orphans=False``
otherwise: a blob without a row may be another node's upload, its row about to commit).
A row whose file is missing is a loss the archive cannot repair; it is reported, and
kept so that the loss stays visible. :func:`verify` re-reads every blob and compares size
and SHA-256 with the index.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pacs.archive import Archive
from pacs.index import InstanceRecord

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass
class Reconciled:
    staging_removed: int = 0
    orphans_moved: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs


@dataclass
class Verified:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def reconcile(archive: Archive, *, orphans: bool = True) -> Reconciled:
    """Both ways between the store and the index; call it before taking any input."""
    store = archive.store
    result = Reconciled()
    # Staging files, spooled request parts and inflated or fetched copies of a process
    # that stopped: none of them was acknowledged.
    for leftover in [
        *store.staging.glob("*.part"),
        *store.staging.glob("upload-*"),  # dicomweb.multipart
        *store.staging.glob("inflated-*"),  # pacs.inflate
        *store.staging.glob("fetched-*"),  # pacs.objectstore
    ]:
        leftover.unlink(missing_ok=True)
        result.staging_removed += 1
    # Rows first: a row read here had its blob stored before it committed, so the
    # listing that follows holds it, whatever other nodes store meanwhile.
    indexed = archive.index.blob_paths()
    stored = set()
    for blob in store.listing():
        stored.add(blob.relative)
        if orphans and blob.relative not in indexed:
            result.orphans_moved.append(store.set_aside(blob.relative))
    result.missing = [uid for path, uid in indexed.items() if path not in stored]
    if result.staging_removed or result.orphans_moved:
        log.warning(
            "startup: %d unacknowledged staging file(s) removed, %d blob(s) without an index "
            "row set aside (first: %s)",
            result.staging_removed,
            len(result.orphans_moved),
            result.orphans_moved[0] if result.orphans_moved else "none",
        )
    if result.missing:
        log.error(
            "startup: %d indexed instance(s) have no file (first %s); run filmless verify",
            len(result.missing),
            result.missing[0],
        )
    return result


def verify(
    archive: Archive,
    progress: Callable[[int], None] | None = None,
    records: Sequence[InstanceRecord] | None = None,
) -> Verified:
    """Every indexed file (or ``records``, already read) re-hashed; ``progress`` is told
    the bytes read as it goes."""
    result = Verified()
    for record in archive.index.instances() if records is None else records:
        result.checked += 1
        try:
            stream = archive.store.open(record.path)
        except FileNotFoundError:
            result.missing.append(record.SOPInstanceUID)
            continue
        digest, size = hashlib.sha256(), 0
        with stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        if progress is not None:
            progress(size)
        if size != record.size or digest.hexdigest() != record.sha256:
            result.corrupt.append(record.SOPInstanceUID)
    return result
