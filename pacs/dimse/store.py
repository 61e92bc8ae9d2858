"""C-STORE SCP (PS3.4 B.2): every storage SOP class, bytes as sent, through archive.ingest.

The data set is never decoded here: the bytes of the request go to the archive with the
transfer syntax of the presentation context and the UIDs of the request. Every refusal
is a :class:`PacsError` whose ``dimse_status`` is sent back with the reason as the
Error Comment; an unexpected exception becomes 0x0110 and is logged, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from pacs.archive import Archive, InstanceSource, Origin
from pacs.audit import AuditEvent, Outcome
from pacs.dimse.associations import actor
from pacs.dimse.responses import status_dataset
from pacs.errors import PacsError, SOPClassMismatch
from pacs.status import StoreStatus

log = logging.getLogger(__name__)


def make_store_handler(archive: Archive) -> Callable[[evt.Event], Dataset]:
    def handle_store(event: evt.Event) -> Dataset:
        request = cast(C_STORE, event.request)
        context = event.context
        calling = event.assoc.requestor.ae_title
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        try:
            announced = str(request.AffectedSOPClassUID or "")
            if announced != context.abstract_syntax:
                raise SOPClassMismatch(
                    f"SOP Class {announced} sent on a context for {context.abstract_syntax}"
                )
            data_set = cast(BytesIO, request.DataSet)
            data_set.seek(0)
            source = InstanceSource.from_data_set(
                data_set,
                TransferSyntaxUID=str(context.transfer_syntax),
                SOPClassUID=announced,
                SOPInstanceUID=sop_instance,
            )
            outcome = archive.ingest(source, Origin.DIMSE, SourceApplicationEntityTitle=calling)
        except PacsError as exc:
            log.warning(
                "C-STORE %s from %s refused (0x%04X): %s",
                sop_instance[:64],
                calling,
                exc.dimse_status,
                exc,
            )
            archive.audit.record(
                AuditEvent.STORE, actor(event), Outcome.MINOR_FAILURE, detail=str(exc)
            )
            return status_dataset(exc.dimse_status, str(exc))
        except Exception:
            log.exception("C-STORE %s from %s failed", sop_instance[:64], calling)
            archive.audit.record(
                AuditEvent.STORE, actor(event), Outcome.SERIOUS_FAILURE, detail="internal error"
            )
            return status_dataset(StoreStatus.PROCESSING_FAILURE, "internal error, see log")
        log.debug("C-STORE %s from %s: %s", sop_instance, calling, outcome.action)
        archive.audit.record(
            AuditEvent.STORE,
            actor(event),
            Outcome.SUCCESS,
            StudyInstanceUID=outcome.record.StudyInstanceUID,
            detail=sop_instance,
        )
        return status_dataset(StoreStatus.SUCCESS)

    return handle_store
