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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pacs.archive import Archive
from pacs.errors import PacsError
from pacs.header import read_header
from pacs.index import BlobFacts
from pacs.part10 import read_file_meta
from pacs.store import StoredBlob

_CHUNK = 1 << 20


@dataclass
class Reindexed:
    indexed: int = 0
    # (blob, why) of those left out of the index, and of those indexed with a change.
    refused: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)


def reindex(
    archive: Archive,
    blobs: Sequence[StoredBlob] | None = None,
    advance: Callable[[], None] = lambda: None,
) -> Reindexed:
    """Drop and rebuild the index tables from every blob in the store (``blobs``, when
    the caller has listed them already: one listing of a bucket, not two)."""
    if blobs is None:
        blobs = list(archive.store.listing())
    archive.index.drop_archive_tables()
    archive.index.create_schema()
    result = Reindexed()
    for blob in blobs:
        try:
            outcome = _index_one(archive, blob)
        except (PacsError, OSError) as exc:
            result.refused.append((blob.relative, str(exc)))
        else:
            result.indexed += 1
            if outcome:
                result.changed.append((blob.relative, outcome))
        advance()
    return result


def _index_one(archive: Archive, blob: StoredBlob) -> str:
    with archive.store.local(blob.relative) as path:
        with open(path, "rb") as stream:
            meta = read_file_meta(stream)
            offset = stream.tell()
            stream.seek(0)
            digest = hashlib.sha256()
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        header = read_header(path, offset, meta)
    facts = BlobFacts(
        TransferSyntaxUID=meta.TransferSyntaxUID,
        size=blob.size,
        sha256=digest.hexdigest(),
        path=blob.relative,
        origin="reindex",
        SourceApplicationEntityTitle="",
    )
    # What was stored stays stored: a study whose instances name several patients is
    # given the latest one's, and said so, rather than an instance left out.
    outcome = archive.index.add(header, facts, "reject", "update", logged=False)
    return "the study's patient was updated from this file" if outcome.patient_updated else ""
