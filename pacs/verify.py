"""The archive against its index: what a crash can leave behind, and what the disk lost.

:func:`reconcile` runs at startup, before anything is received. A staging file was never
acknowledged (Success follows the index commit), so it goes. A stored file without an
index row was renamed into place but not committed, so never acknowledged either: it
is moved to ``orphans/`` rather than deleted, for an operator to look at. A row whose
file is missing is a loss the archive cannot repair; it is reported, and kept so that
the loss stays visible. :func:`verify` re-reads every file and compares size and SHA-256
with the index.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacs.archive import Archive
from pacs.index import InstanceRecord

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass
class Reconciled:
    staging_removed: int = 0
    orphans_moved: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs


@dataclass
class Verified:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def reconcile(archive: Archive) -> Reconciled:
    """Both ways between the store and the index; call it before taking any input."""
    store = archive.store
    result = Reconciled()
    # Staging files, spooled request parts and inflated copies of a process that
    # stopped: none of them was acknowledged.
    for leftover in [
        *store.staging.glob("*.part"),
        *store.staging.glob("upload-*"),  # dicomweb.multipart
        *store.staging.glob("inflated-*"),  # pacs.inflate
    ]:
        leftover.unlink(missing_ok=True)
        result.staging_removed += 1
    indexed = {}
    for record in archive.index.instances():
        indexed[store.path(record.path)] = record.SOPInstanceUID
    objects = store.objects.resolve()
    for folder, _dirs, names in os.walk(objects):
        for name in names:
            path = Path(folder) / name
            if path not in indexed:
                target = store.root / "orphans" / path.relative_to(objects)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                result.orphans_moved.append(target)
    result.missing = [uid for path, uid in indexed.items() if not path.is_file()]
    if result.staging_removed or result.orphans_moved:
        log.warning(
            "startup: %d unacknowledged staging file(s) removed, %d file(s) without an index "
            "row moved to %s",
            result.staging_removed,
            len(result.orphans_moved),
            store.root / "orphans",
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
