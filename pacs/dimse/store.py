"""C-STORE SCP (PS3.4 B.2): every storage SOP class, bytes as sent, through archive.ingest.

The data set is never decoded here: the bytes of the request go to the archive with the
transfer syntax of the presentation context and the UIDs of the request. Every refusal
is a :class:`PacsError` whose ``dimse_status`` is sent back with the reason as the
Error Comment; an unexpected exception becomes 0x0110 and is logged, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import BinaryIO, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from pacs.archive import Archive, InstanceSource, Origin, StoreOutcome
from pacs.audit import Actor, AuditEvent, Outcome
from pacs.dimse import spool
from pacs.dimse.associations import actor
from pacs.dimse.responses import status_dataset
from pacs.errors import InvalidInstance, PacsError, SOPClassMismatch
from pacs.status import StoreStatus

log = logging.getLogger(__name__)


def make_store_handler(archive: Archive) -> Callable[[evt.Event], Dataset]:
    def handle_store(event: evt.Event) -> Dataset:
        request = cast(C_STORE, event.request)
        received, data_set = spool.received_data_set(request)
        return store_response(
            archive,
            actor(event),
            abstract_syntax=str(event.context.abstract_syntax),
            transfer_syntax=str(event.context.transfer_syntax),
            announced_class=str(request.AffectedSOPClassUID or ""),
            sop_instance=str(request.AffectedSOPInstanceUID or ""),
            received=received,
            data_set=data_set,
        )

    return handle_store


def store_response(
    archive: Archive,
    who: Actor,
    *,
    abstract_syntax: str,
    transfer_syntax: str,
    announced_class: str,
    sop_instance: str,
    received: spool.Spool | None,
    data_set: BinaryIO,
) -> Dataset:
    """Ingest one received data set; the status of the C-STORE response, audited.

    Shared by pynetdicom's associations and our own (:mod:`pacs.dimse.direct`), so
    both answer every request alike."""
    calling = who.user
    try:
        if announced_class != abstract_syntax:
            raise SOPClassMismatch(
                f"SOP Class {announced_class} sent on a context for {abstract_syntax}"
            )
        data_set.seek(0)
        source = InstanceSource.from_data_set(
            data_set,
            TransferSyntaxUID=transfer_syntax,
            SOPClassUID=announced_class,
            SOPInstanceUID=sop_instance,
        )
        outcome = _ingest(archive, source, received, calling)
    except PacsError as exc:
        log.warning(
            "C-STORE %s from %s refused (0x%04X): %s",
            sop_instance[:64],
            calling,
            exc.dimse_status,
            exc,
        )
        archive.audit.record(AuditEvent.STORE, who, Outcome.MINOR_FAILURE, detail=str(exc))
        return status_dataset(exc.dimse_status, str(exc))
    except Exception:
        log.exception("C-STORE %s from %s failed", sop_instance[:64], calling)
        archive.audit.record(
            AuditEvent.STORE, who, Outcome.SERIOUS_FAILURE, detail="internal error"
        )
        return status_dataset(StoreStatus.PROCESSING_FAILURE, "internal error, see log")
    log.debug("C-STORE %s from %s: %s", sop_instance, calling, outcome.action)
    archive.audit.record(
        AuditEvent.STORE,
        who,
        Outcome.SUCCESS,
        StudyInstanceUID=outcome.record.StudyInstanceUID,
        detail=sop_instance,
    )
    return status_dataset(StoreStatus.SUCCESS)


def _ingest(
    archive: Archive, source: InstanceSource, received: spool.Spool | None, calling: str
) -> StoreOutcome:
    if received is not None and received.error is not None:
        received.discard()
        raise received.error
    staged = None if received is None else received.staged()
    if staged is None:
        return archive.ingest(source, Origin.DIMSE, SourceApplicationEntityTitle=calling)
    assert received is not None
    if received.meta != source.meta:
        received.discard()
        raise InvalidInstance("the received data set does not match its C-STORE request")
    return archive.ingest_staged(
        staged,
        source.meta,
        received.head_length,
        Origin.DIMSE,
        SourceApplicationEntityTitle=calling,
    )
