"""The archive facade: the one ingest path and the one way to read stored instances.

C-STORE, STOW-RS, ``filmless import`` and the inference results all end in
:meth:`Archive.ingest`. The order of its steps is the durability contract: stage the
bytes (fsync), validate the header, move the blob into place (fsync of the directory),
commit the index row, and only then report success. A failure at any step leaves no
row behind and no file in the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs.audit import AuditTrail
from pacs.equivalence import same_instance
from pacs.errors import (
    DuplicateRejected,
    InstanceTooLarge,
    InvalidInstance,
    NotFound,
    PacsError,
    SOPClassMismatch,
    StudyMismatch,
)
from pacs.events import EventBus, InstanceStored
from pacs.header import MAX_INSTANCE_BYTES, read_header
from pacs.index import (
    DERIVED_ORIGIN,
    BlobFacts,
    DuplicatePolicy,
    Index,
    IndexAction,
    InstanceRecord,
    PatientPolicy,
)
from pacs.inflate import inflated
from pacs.part10 import FileMeta, encode_file_meta, guess_transfer_syntax, read_file_meta
from pacs.store import BlobStore, StagedBlob
from pacs.uids import require_uid

log = logging.getLogger(__name__)

# Stands in for a UID a file's meta group lacks until the data set names it.
_UNKNOWN = "2.25.0"


def _refuse_other_identity(found: FileMeta, announced: FileMeta) -> None:
    if found.MediaStorageSOPClassUID != announced.MediaStorageSOPClassUID:
        raise SOPClassMismatch(
            f"data set SOP Class UID {found.MediaStorageSOPClassUID} differs from the "
            f"announced {announced.MediaStorageSOPClassUID}"
        )
    raise InvalidInstance(
        f"data set SOP Instance UID {found.MediaStorageSOPInstanceUID} differs from the "
        f"announced {announced.MediaStorageSOPInstanceUID}"
    )


class Origin(StrEnum):
    """How an instance reached the archive, kept in the index for audit and routing."""

    DIMSE = "dimse"
    STOW = "stow"
    IMPORT = "import"
    INFERENCE = DERIVED_ORIGIN


@dataclass(frozen=True, slots=True)
class InstanceSource:
    """An encoded data set plus the identity its sender announced for it.

    ``announced``: the UIDs were stated by the sender for this transfer (a C-STORE
    request), so a data set that says otherwise is refused. A file's meta group is not
    such a statement: dcmtk's and pynetdicom's SCUs send the same file with the UIDs of
    its data set, so the data set's identity wins and the stored meta group is written
    from it, and every route gives a file the same outcome.
    """

    meta: FileMeta
    body: BinaryIO
    announced: bool = True

    @classmethod
    def from_part10(cls, stream: BinaryIO) -> InstanceSource:
        """A DICOM file: its own meta group is read for the identity, then dropped."""
        meta = read_file_meta(stream, lenient=True)
        if not meta.TransferSyntaxUID:
            meta = replace(meta, TransferSyntaxUID=guess_transfer_syntax(stream))
        return cls(meta=meta, body=stream, announced=False)

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
    # What the archive changed or decided beyond storing, for the audit trail.
    notes: tuple[str, ...] = ()


class Archive:
    """Store + index + events, wired once by the composition root."""

    def __init__(
        self,
        store: BlobStore,
        index: Index,
        events: EventBus | None = None,
        *,
        duplicate_policy: DuplicatePolicy = "reject",
        patient_policy: PatientPolicy = "reject",
        audit: AuditTrail | None = None,
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
    ) -> None:
        self.store = store
        self.index = index
        self.events = events or EventBus()
        self.duplicate_policy = duplicate_policy
        self.patient_policy = patient_policy
        self.audit = audit or AuditTrail(None)
        self.max_instance_bytes = max_instance_bytes

    def ingest(
        self,
        source: InstanceSource,
        origin: Origin,
        *,
        SourceApplicationEntityTitle: str = "",
        StudyInstanceUID: str | None = None,
        duplicate_policy: DuplicatePolicy | None = None,
        requires: Sequence[str] = (),
    ) -> StoreOutcome:
        """Store one instance durably or raise a :class:`PacsError` that says why not.

        ``StudyInstanceUID``, when given, is the study the sender says the instance
        belongs to (STOW-RS to ``/studies/{study}``); an instance of another is refused.
        ``duplicate_policy`` overrides the configured one: a re-run inference job replaces
        its earlier report whatever the policy for peers is. ``requires``: the instances a
        derived object was made from; if one was deleted meanwhile it is not stored
        (:class:`SourceGone`), so that a report never brings a deleted study back.
        """
        # A file's meta group may lack the instance's UIDs: stand-ins until the data set
        # says which they are (the file is then staged again with them).
        staging_meta = replace(
            source.meta,
            MediaStorageSOPClassUID=source.meta.MediaStorageSOPClassUID or _UNKNOWN,
            MediaStorageSOPInstanceUID=source.meta.MediaStorageSOPInstanceUID or _UNKNOWN,
        )
        head = encode_file_meta(staging_meta)
        staged = self.store.stage(head, source.body)
        return self.ingest_staged(
            staged,
            staging_meta,
            len(head),
            origin,
            SourceApplicationEntityTitle=SourceApplicationEntityTitle,
            StudyInstanceUID=StudyInstanceUID,
            duplicate_policy=duplicate_policy,
            announced=source.announced,
            requires=requires,
        )

    def ingest_staged(
        self,
        staged: StagedBlob,
        meta: FileMeta,
        head_length: int,
        origin: Origin,
        *,
        SourceApplicationEntityTitle: str = "",
        StudyInstanceUID: str | None = None,
        duplicate_policy: DuplicatePolicy | None = None,
        announced: bool = True,
        requires: Sequence[str] = (),
    ) -> StoreOutcome:
        """:meth:`ingest` of a file already written and fsynced in staging (its owner now).

        ``head_length`` bytes of preamble and meta group, as :func:`encode_file_meta`
        writes them for ``meta``, come before the data set.
        """
        policy = duplicate_policy or self.duplicate_policy
        notes: list[str] = []
        try:
            if staged.size - head_length > self.max_instance_bytes:
                raise InstanceTooLarge(
                    f"the data set has {staged.size - head_length} bytes, more than "
                    f"max_instance_bytes {self.max_instance_bytes}"
                )
            header = read_header(staged.path, head_length, meta, max_bytes=self.max_instance_bytes)
            identity = FileMeta(
                header.instance.SOPClassUID, header.instance.SOPInstanceUID, meta.TransferSyntaxUID
            )
            if identity != meta:
                if announced:
                    _refuse_other_identity(identity, meta)
                if _UNKNOWN not in (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID):
                    notes.append(
                        f"file meta named {meta.MediaStorageSOPInstanceUID}; stored as the data "
                        f"set's {identity.MediaStorageSOPInstanceUID}"
                    )
                staged, head_length = self._restaged(staged, head_length, identity)
                meta = identity
            if StudyInstanceUID is not None and header.study.StudyInstanceUID != StudyInstanceUID:
                raise StudyMismatch(
                    f"instance {header.instance.SOPInstanceUID} belongs to study "
                    f"{header.study.StudyInstanceUID}, not {StudyInstanceUID}"
                )
            existing = self.index.instance(meta.MediaStorageSOPInstanceUID)
            if existing is not None and (
                existing.sha256 == staged.sha256 or self._same_instance(existing, staged)
            ):
                self.store.discard(staged)
                return StoreOutcome(IndexAction.DUPLICATE, existing)
            if existing is not None and policy == "reject":
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
            TransferSyntaxUID=meta.TransferSyntaxUID,
            size=staged.size,
            sha256=staged.sha256,
            path=relative,
            origin=str(origin),
            SourceApplicationEntityTitle=SourceApplicationEntityTitle,
        )
        try:
            outcome = self.index.add(header, facts, policy, self.patient_policy, requires)
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
        if outcome.patient_updated:
            notes.append(
                f"patient of study {header.study.StudyInstanceUID} now "
                f"{header.patient.PatientID!r} {header.patient.PatientName!r}"
            )
        return StoreOutcome(outcome.action, outcome.record, tuple(notes))

    def _restaged(
        self, staged: StagedBlob, head_length: int, meta: FileMeta
    ) -> tuple[StagedBlob, int]:
        """The same data set behind a meta group naming ``meta`` (a new staging file)."""
        head = encode_file_meta(meta)
        writer = self.store.open_staging(head)
        try:
            with open(staged.path, "rb") as source:
                source.seek(head_length)
                while chunk := source.read(1 << 20):
                    writer.write(chunk)
        except BaseException:
            writer.discard()
            raise
        restaged = writer.finish()
        self.store.discard(staged)
        return restaged, len(head)

    def _same_instance(self, existing: InstanceRecord, staged: StagedBlob) -> bool:
        try:
            with self.store.local(existing.path) as stored:
                return same_instance(stored, staged.path)
        except OSError:  # the stored copy is gone or unreadable: not shown to be the same
            return False

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
        """The stored Part 10 file of an indexed instance, byte for byte."""
        return self.store.open(record.path)

    @contextmanager
    def open_parsed(self, record: InstanceRecord) -> Iterator[BinaryIO]:
        """The stored file to read attributes and pixels from: itself, or for a deflated
        one an inflated copy on disk, so that no reader holds it inflated in memory."""
        if record.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
            with self.store.open(record.path) as stream:
                yield stream
            return
        with self.store.open(record.path) as stream:
            meta = read_file_meta(stream)
            offset = stream.tell()
        folder = self.store.staging
        limit = self.max_instance_bytes
        with (
            self.store.local(record.path) as source,
            inflated(source, offset, meta, folder, limit) as (copy, _),
            open(copy, "rb") as stream,
        ):
            yield stream

    def records(
        self,
        StudyInstanceUID: str,
        SeriesInstanceUID: str | None = None,
        SOPInstanceUID: str | None = None,
    ) -> list[InstanceRecord]:
        """The instances of a study, a series or one instance; :class:`NotFound` if none.

        The UIDs usually come from a URL: they are validated first (:class:`InvalidUID`).
        """
        require_uid(StudyInstanceUID, "StudyInstanceUID")
        if SeriesInstanceUID is not None:
            require_uid(SeriesInstanceUID, "SeriesInstanceUID")
        if SOPInstanceUID is not None:
            require_uid(SOPInstanceUID, "SOPInstanceUID")
        found = self.index.records(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)
        if not found:
            named = SOPInstanceUID or SeriesInstanceUID or StudyInstanceUID
            what = "instance" if SOPInstanceUID else "series" if SeriesInstanceUID else "study"
            raise NotFound(f"no {what} {named} in the archive")
        return found

    def delete_instance(self, SOPInstanceUID: str) -> InstanceRecord | None:
        removed = self.delete_all([SOPInstanceUID])
        return removed[0] if removed else None

    def delete(
        self,
        StudyInstanceUID: str,
        SeriesInstanceUID: str | None = None,
        SOPInstanceUID: str | None = None,
    ) -> list[InstanceRecord]:
        """Delete a whole study, series or one instance; :class:`NotFound` if none."""
        self.records(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)  # NotFound
        # Everything in it when the transaction runs, not a list taken before.
        removed = self.index.remove_records(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)
        for record in removed:
            self.store.delete(record.path)
        return removed

    def delete_all(self, SOPInstanceUIDs: Iterable[str]) -> list[InstanceRecord]:
        """Unindex all in one transaction, then remove the blobs: a crash in between
        leaves orphan files, never a row that points at nothing."""
        removed = self.index.remove_all(SOPInstanceUIDs)
        for record in removed:
            self.store.delete(record.path)
        return removed
