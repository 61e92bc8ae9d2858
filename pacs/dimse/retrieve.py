"""C-MOVE and C-GET SCPs (PS3.4 C.4.2, C.4.3): the same instance selection, two transports.

The identifier is decoded by the C-FIND decoder and resolved by
:func:`pacs.query.compile_retrieve`. pynetdicom performs the C-STORE sub-operations and
counts them; the handlers here yield one stored instance at a time, read from the blob
store as it was received, so memory holds one instance whatever the size of the study.

C-MOVE opens an association to a destination from the settings (unknown AE title:
0xA801) proposing, per SOP class, the stored transfer syntax and the uncompressed ones.
C-GET answers over the requester's association with the storage contexts it proposed
(SCP role): an uncompressed instance is re-encoded into a syntax the requester accepted,
a compressed one it did not accept is a failed sub-operation, logged with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacs.archive import Archive
from pacs.audit import AuditEvent, Outcome
from pacs.dimse.associations import actor
from pacs.dimse.find import query_from_identifier
from pacs.dimse.responses import status_dataset as failure
from pacs.encoding import NATIVE_LITTLE_ENDIAN
from pacs.errors import InvalidQuery, PacsError
from pacs.index import InstanceRecord
from pacs.query import Model, compile_retrieve
from pacs.status import QueryStatus
from pacs.stored import read_stored

log = logging.getLogger(__name__)

MOVE_MODELS: Mapping[str, Model] = {
    PatientRootQueryRetrieveInformationModelMove: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: Model.STUDY_ROOT,
}
GET_MODELS: Mapping[str, Model] = {
    PatientRootQueryRetrieveInformationModelGet: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelGet: Model.STUDY_ROOT,
}
_MAX_CONTEXTS = 128


def select_instances(archive: Archive, event: evt.Event, model: Model) -> list[InstanceRecord]:
    """The records an identifier names; raises :class:`PacsError` with the reason."""
    try:
        identifier = event.identifier
    except Exception as exc:  # pynetdicom raises what pydicom raises
        raise InvalidQuery(f"identifier unreadable: {exc}") from exc
    query = query_from_identifier(identifier, model)
    with archive.index.reading() as conn:
        rows = conn.execute(compile_retrieve(query)).mappings()
        return [InstanceRecord(**row) for row in rows]


def _contexts(records: list[InstanceRecord]) -> list[PresentationContext]:
    """One context per stored (SOP class, transfer syntax), as sent; plus, per SOP class,
    one offering the uncompressed syntaxes so that pynetdicom can convert between them.

    A context accepts a single transfer syntax, so mixing syntaxes in one proposal would
    let the destination pick one and fail every instance stored in another.
    """
    pairs: dict[tuple[str, str], None] = {}
    classes: dict[str, None] = {}
    for record in records:
        pairs[(record.SOPClassUID, record.TransferSyntaxUID)] = None
        classes[record.SOPClassUID] = None
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    contexts += [build_context(sop_class, list(NATIVE_LITTLE_ENDIAN)) for sop_class in classes]
    return contexts[:_MAX_CONTEXTS]


def _read(archive: Archive, record: InstanceRecord) -> Dataset:
    with archive.open(record) as stream:
        return read_stored(stream, pixels=True)


def _sub_operations(
    archive: Archive, event: evt.Event, records: list[InstanceRecord]
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    for record in records:
        if event.is_cancelled:
            yield QueryStatus.CANCEL, None
            return
        try:
            dataset = _read(archive, record)
        except Exception as exc:
            log.error("cannot read %s for a retrieve: %s", record.SOPInstanceUID, exc)
            placeholder = Dataset()
            placeholder.SOPInstanceUID = record.SOPInstanceUID
            yield QueryStatus.PENDING, placeholder  # fails as a sub-operation, counted
            continue
        yield QueryStatus.PENDING, dataset


def _audit(
    archive: Archive,
    event: evt.Event,
    records: list[InstanceRecord],
    problem: PacsError | None,
    what: str,
) -> None:
    """One message per study that is sent (or one failure); sub-operation outcomes are
    in the C-MOVE/C-GET response the peer gets."""
    if problem is not None:
        archive.audit.record(
            AuditEvent.RETRIEVE, actor(event), Outcome.MINOR_FAILURE, detail=f"{what}: {problem}"
        )
        return
    for study in sorted({r.StudyInstanceUID for r in records}):
        count = sum(r.StudyInstanceUID == study for r in records)
        archive.audit.record(
            AuditEvent.RETRIEVE,
            actor(event),
            Outcome.SUCCESS,
            StudyInstanceUID=study,
            detail=f"{what}: {count} instance(s)",
        )


def make_move_handler(
    archive: Archive, destinations: Mapping[str, tuple[str, int]]
) -> Callable[[evt.Event], Iterator[Any]]:
    def handle_move(event: evt.Event) -> Iterator[Any]:
        model = MOVE_MODELS[str(event.request.AffectedSOPClassUID)]
        name = str(event.move_destination or "").strip()
        destination = destinations.get(name)
        if destination is None:
            log.warning("C-MOVE to unknown destination %r", name)
            archive.audit.record(
                AuditEvent.RETRIEVE,
                actor(event),
                Outcome.MINOR_FAILURE,
                detail=f"C-MOVE to unknown destination {name!r} (0xA801)",
            )
            yield None, None
            return
        try:
            records = select_instances(archive, event, model)
            problem: PacsError | None = None
        except PacsError as exc:
            records, problem = [], exc
        if problem is not None:
            _audit(archive, event, records, problem, f"C-MOVE to {name}")
        # pynetdicom opens the destination association before any status can be sent,
        # even for a refusal: propose what every Storage SCP accepts in that case.
        contexts = _contexts(records) or [
            build_context(Verification),
            build_context(CTImageStorage, list(NATIVE_LITTLE_ENDIAN)),
            build_context(SecondaryCaptureImageStorage, list(NATIVE_LITTLE_ENDIAN)),
        ]
        finished = False
        try:
            yield destination[0], destination[1], {"contexts": contexts}
            if problem is not None:
                yield 1
                yield failure(problem.dimse_status, str(problem)), None
                return
            yield len(records)
            yield from _sub_operations(archive, event, records)
            finished = True
        finally:
            # pynetdicom stops asking for the data sets when the destination cannot be
            # reached (0xA801) or the association ends: that is no success to record.
            if problem is None:
                if finished:
                    _audit(archive, event, records, None, f"C-MOVE to {name}")
                else:
                    archive.audit.record(
                        AuditEvent.RETRIEVE,
                        actor(event),
                        Outcome.MINOR_FAILURE,
                        detail=f"C-MOVE to {name} at {destination[0]}:{destination[1]} "
                        "did not complete (destination unreachable or association ended)",
                    )

    return handle_move


def make_get_handler(archive: Archive) -> Callable[[evt.Event], Iterator[Any]]:
    def handle_get(event: evt.Event) -> Iterator[Any]:
        model = GET_MODELS[str(event.request.AffectedSOPClassUID)]
        try:
            records = select_instances(archive, event, model)
        except PacsError as exc:
            _audit(archive, event, [], exc, "C-GET")
            yield 1
            yield failure(exc.dimse_status, str(exc)), None
            return
        _audit(archive, event, records, None, "C-GET")
        yield len(records)
        yield from _sub_operations(archive, event, records)

    return handle_get
