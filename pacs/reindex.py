"""Rebuild the index from the stored files: ``filmless reindex``.

The stored files are the archive; the index is what can be derived from them. When a
new version of filmless keeps other columns (schema version in :mod:`pacs.index`), the
patient, study, series and instance tables are made again from the files' headers, with
the rules of this version. The job queue is kept. No file is moved or deleted here: a
file the new rules would refuse (two files of one SOP Instance UID, an instance naming
another patient's study) is indexed as far as the rules allow and reported, and one
that cannot be indexed at all is listed, left where it is for an operator to look at.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pacs.archive import Archive
from pacs.errors import PacsError
from pacs.header import read_header
from pacs.index import BlobFacts
from pacs.part10 import read_file_meta

_CHUNK = 1 << 20


@dataclass
class Reindexed:
    indexed: int = 0
    # (file, why) of those left out of the index, and of those indexed with a change.
    refused: list[tuple[Path, str]] = field(default_factory=list)
    changed: list[tuple[Path, str]] = field(default_factory=list)


def stored_files(archive: Archive) -> list[Path]:
    found = []
    for folder, _dirs, names in os.walk(archive.store.objects):
        found += [Path(folder) / name for name in sorted(names)]
    return found


def reindex(archive: Archive, advance: Callable[[], None] = lambda: None) -> Reindexed:
    """Drop and rebuild the index tables from every file under the store."""
    files = stored_files(archive)
    archive.index.drop_archive_tables()
    archive.index.create_schema()
    result = Reindexed()
    objects = archive.store.objects.resolve()
    for path in files:
        try:
            outcome = _index_one(archive, path, objects)
        except (PacsError, OSError) as exc:
            result.refused.append((path, str(exc)))
        else:
            result.indexed += 1
            if outcome:
                result.changed.append((path, outcome))
        advance()
    return result


def _index_one(archive: Archive, path: Path, objects: Path) -> str:
    with open(path, "rb") as stream:
        meta = read_file_meta(stream)
        offset = stream.tell()
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    header = read_header(path, offset, meta)
    facts = BlobFacts(
        TransferSyntaxUID=meta.TransferSyntaxUID,
        size=path.stat().st_size,
        sha256=digest.hexdigest(),
        path=str(path.resolve().relative_to(objects)),
        origin="reindex",
        SourceApplicationEntityTitle="",
    )
    # What was stored stays stored: a study whose instances name several patients is
    # given the latest one's, and said so, rather than an instance left out.
    outcome = archive.index.add(header, facts, "reject", "update", logged=False)
    return "the study's patient was updated from this file" if outcome.patient_updated else ""
