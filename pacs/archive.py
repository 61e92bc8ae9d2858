"""The archive facade: the one ingest path and the one way to read stored instances.

C-STORE, STOW-RS, ``filmless import`` and the inference results all end in
:meth:`Archive.ingest`. The order of its steps is the durability contract: stage the
bytes (fsync), validate the header, move the blob into place (fsync of the directory),
commit the index row, and only then report success. A failure at any step leaves no
row behind and no file in the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pacs.errors import DuplicateRejected, PacsError
from pacs.events import EventBus, InstanceStored
from pacs.header import read_header
from pacs.index import BlobFacts, DuplicatePolicy, Index, IndexAction, InstanceRecord
from pacs.part10 import FileMeta, encode_file_meta, read_file_meta
from pacs.store import FsBlobStore
from pacs.uids import require_uid

log = logging.getLogger(__name__)


class Origin(StrEnum):
    """How an instance reached the archive, kept in the index for audit and routing."""

    DIMSE = "dimse"
    STOW = "stow"
    IMPORT = "import"
    INFERENCE = "inference"


@dataclass(frozen=True, slots=True)
class InstanceSource:
    """An encoded data set plus the identity its sender announced for it."""

    meta: FileMeta
    body: BinaryIO

    @classmethod
    def from_part10(cls, stream: BinaryIO) -> InstanceSource:
        """A DICOM file: its own meta group is read for the identity, then dropped."""
        return cls(meta=read_file_meta(stream), body=stream)

    @classmethod
    def from_data_set(
        cls,
        stream: BinaryIO,
        *,
        TransferSyntaxUID: str,
        SOPClassUID: str,
        SOPInstanceUID: str,
    ) -> InstanceSource:
        """A bare data set as DIMSE carries it, with the UIDs of the C-STORE request."""
        meta = FileMeta(
            MediaStorageSOPClassUID=require_uid(SOPClassUID, "AffectedSOPClassUID"),
            MediaStorageSOPInstanceUID=require_uid(SOPInstanceUID, "AffectedSOPInstanceUID"),
            TransferSyntaxUID=require_uid(TransferSyntaxUID, "TransferSyntaxUID"),
        )
        return cls(meta=meta, body=stream)


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    action: IndexAction
    record: InstanceRecord


class Archive:
    """Store + index + events, wired once by the composition root."""

    def __init__(
        self,
        store: FsBlobStore,
        index: Index,
        events: EventBus | None = None,
        *,
        duplicate_policy: DuplicatePolicy = "reject",
    ) -> None:
        self.store = store
        self.index = index
        self.events = events or EventBus()
        self.duplicate_policy = duplicate_policy

    def ingest(
        self, source: InstanceSource, origin: Origin, *, SourceApplicationEntityTitle: str = ""
    ) -> StoreOutcome:
        """Store one instance durably or raise a :class:`PacsError` that says why not."""
        head = encode_file_meta(source.meta)
        staged = self.store.stage(head, source.body)
        try:
            header = read_header(staged.path, len(head), source.meta)
            existing = self.index.instance(source.meta.MediaStorageSOPInstanceUID)
            if existing is not None and existing.sha256 == staged.sha256:
                self.store.discard(staged)
                return StoreOutcome(IndexAction.DUPLICATE, existing)
            if existing is not None and self.duplicate_policy == "reject":
                raise DuplicateRejected(
                    f"SOP Instance {existing.SOPInstanceUID} is already stored with "
                    "different content and the duplicate policy is 'reject'"
                )
            relative = self.store.relative_path(
                header.study.StudyInstanceUID,
                header.series.SeriesInstanceUID,
                header.instance.SOPInstanceUID,
                staged.sha256,
            )
        except BaseException:
            self.store.discard(staged)
            raise
        self.store.commit(staged, relative)
        facts = BlobFacts(
            TransferSyntaxUID=source.meta.TransferSyntaxUID,
            size=staged.size,
            sha256=staged.sha256,
            path=relative,
            origin=str(origin),
            SourceApplicationEntityTitle=SourceApplicationEntityTitle,
        )
        try:
            outcome = self.index.add(header, facts, self.duplicate_policy)
        except BaseException:
            # Lost a race to a different copy, or the database is down: the blob goes.
            other = self._indexed_path(header.instance.SOPInstanceUID)
            if other != relative:
                self.store.delete(relative)
            raise
        if outcome.replaced is not None and outcome.replaced.path != relative:
            self.store.delete(outcome.replaced.path)
        if outcome.action != IndexAction.DUPLICATE:
            self.events.publish(
                InstanceStored(
                    record=outcome.record,
                    header=header,
                    origin=str(origin),
                    replaced=outcome.replaced is not None,
                )
            )
        return StoreOutcome(outcome.action, outcome.record)

    def _indexed_path(self, SOPInstanceUID: str) -> str | None:
        try:
            record = self.index.instance(SOPInstanceUID)
        except PacsError:
            return None
        return None if record is None else record.path

    def ingest_file(self, path: Path, origin: Origin = Origin.IMPORT) -> StoreOutcome:
        with open(path, "rb") as stream:
            return self.ingest(InstanceSource.from_part10(stream), origin)

    def open(self, record: InstanceRecord) -> BinaryIO:
        """The stored Part 10 file of an indexed instance."""
        return self.store.open(record.path)

    def delete_instance(self, SOPInstanceUID: str) -> InstanceRecord | None:
        """Unindex first, then remove the blob: a crash in between leaves an orphan file,
        never a row that points at nothing."""
        record = self.index.remove(SOPInstanceUID)
        if record is not None:
            self.store.delete(record.path)
        return record
