"""pynetdicom SCU helpers, including sending bytes exactly as given (malformed on purpose)."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.dimse.reactor import MendedAE, mend
from pacs.dimse.server import DimseConfig


def associate(
    config: DimseConfig,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling: str = "MODALITY",
) -> Association:
    ae = MendedAE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    return ae.associate("127.0.0.1", config.port, ae_title=config.ae_title)


def send_raw(
    assoc: Association,
    *,
    context_id: int,
    SOPClassUID: str,
    SOPInstanceUID: str,
    data_set: bytes,
) -> Dataset:
    """A C-STORE whose command and data set bytes are exactly what the test says."""
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = SOPClassUID
    req.AffectedSOPInstanceUID = SOPInstanceUID
    req.DataSet = BytesIO(data_set)
    mend(assoc)._reactor_checkpoint.clear()  # the reactor must not take the answer
    try:
        assoc.dimse.send_msg(req, context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE response"
    status = Dataset()
    status.Status = rsp.Status
    comment = getattr(rsp, "ErrorComment", None)
    if comment:
        status.ErrorComment = comment
    return status


def store(assoc: Association, data: Dataset | Path | str) -> Dataset:
    """``send_c_store`` without pynetdicom's pause race (see :mod:`pacs.dimse.reactor`)."""
    return mend(assoc).send_c_store(data)


def find(port: int, query: Dataset, *, called: str = "FILMLESS") -> list[Dataset]:
    """The identifiers a C-FIND (Study Root) on a fresh association answers with."""
    ae = MendedAE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    found = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                found.append(identifier)
    finally:
        assoc.release()
    return found


def context_id(assoc: Association, sop_class: str, syntax: str) -> int:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == syntax:
            assert cx.context_id is not None
            return cx.context_id
    raise LookupError(f"no accepted context for {sop_class} in {syntax}")
