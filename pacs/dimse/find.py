"""C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root models, all levels.

The identifier is decoded into a :class:`~pacs.query.Query` (the same engine QIDO-RS
uses), matches are counted up to the configured limit, then streamed from one SELECT:
each row becomes one pending response holding exactly the requested keys plus
QueryRetrieveLevel, SpecificCharacterSet and RetrieveAETitle, sent by
:class:`~pacs.dimse.pending.PendingResponses`. C-CANCEL is checked before every response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.archive import Archive
from pacs.audit import AuditEvent, Outcome
from pacs.dimse.associations import actor
from pacs.dimse.match_encoding import (
    CONTROL_KEYS,
    MatchEncoder,
    requested_charset,
    response_charset,
)
from pacs.dimse.pending import PendingResponses
from pacs.dimse.responses import status_dataset as failure
from pacs.errors import InvalidQuery
from pacs.query import ATTRIBUTES, Level, Model, Query, compile_query, count_query
from pacs.status import QueryStatus

log = logging.getLogger(__name__)

MODELS: Mapping[str, Model] = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
}
_FUZZY_BYTE = 2  # PS3.4 C.5.1.1: byte 3 of the C-FIND extended negotiation
_COMBINED_DATETIME_BYTE = 1
_TIMEZONE_BYTE = 3

Response = tuple[int | Dataset, Dataset | None]
# A match is already encoded (bytes) where the fast path could, a Dataset otherwise.
Answer = tuple[int | Dataset, Dataset | bytes | None]


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def query_from_identifier(
    identifier: Dataset, model: Model, *, fuzzy: bool = False, combined_datetime: bool = True
) -> Query:
    """Decode a C-FIND identifier into the protocol-free query."""
    raw_level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    try:
        level = Level(raw_level)
    except ValueError as exc:
        raise InvalidQuery(f"QueryRetrieveLevel {raw_level!r} is not valid") from exc
    keys: dict[str, str] = {}
    returned: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in CONTROL_KEYS:
            continue
        returned.append(keyword)
        if element.VR == "SQ":
            continue  # sequence matching is not supported; the sequence is returned
        keys[keyword] = _value_text(element.value).strip()
    return Query(
        level=level,
        model=model,
        keys=keys,
        return_keys=tuple(returned),
        fuzzy=fuzzy,
        combined_datetime=combined_datetime,
    )


def encode_match(
    row: Mapping[str, Any], identifier: Dataset, level: Level, retrieve_ae_title: str
) -> Dataset:
    """The pending-response identifier for one matching row."""
    answer = Dataset()
    texts: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in CONTROL_KEYS:
            continue
        if element.VR == "SQ":
            answer.add_new(element.tag, "SQ", _sequence(keyword, row))
            continue
        value = row.get(keyword) if keyword in ATTRIBUTES else None
        encoded = _as_vr(value, element.VR)
        if isinstance(encoded, str | PersonName):
            texts.append(str(encoded))
        elif isinstance(encoded, list):
            texts.extend(str(v) for v in encoded)
        answer.add_new(element.tag, element.VR, encoded)
    charset = response_charset(requested_charset(identifier), texts)
    if charset:
        answer.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    answer.QueryRetrieveLevel = level.value
    answer.RetrieveAETitle = retrieve_ae_title
    return answer


def _sequence(keyword: str, row: Mapping[str, Any]) -> list[Dataset]:
    if keyword != "RequestAttributesSequence":
        return []
    item = Dataset()
    item.ScheduledProcedureStepID = row.get("ScheduledProcedureStepID") or ""
    item.RequestedProcedureID = row.get("RequestedProcedureID") or ""
    return [item] if item.ScheduledProcedureStepID or item.RequestedProcedureID else []


def _as_vr(value: Any, vr: str) -> Any:
    if value is None or value == "":
        return None
    if vr in ("US", "UL", "SS", "SL"):
        return int(value)
    if vr == "IS":
        return str(int(value))
    if vr == "PN":
        return PersonName(str(value))
    text = str(value)
    return text.split("\\") if "\\" in text else text


def make_find_handler(
    archive: Archive, *, max_matches: int, retrieve_ae_title: str
) -> Callable[[evt.Event], Iterator[Response]]:
    def handle_find(event: evt.Event) -> Iterator[Response]:
        model = MODELS.get(str(event.request.AffectedSOPClassUID))
        if model is None:
            yield failure(QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unknown model"), None
            return
        try:
            identifier = event.identifier
        except Exception as exc:  # pynetdicom raises what pydicom raises
            yield failure(QueryStatus.UNABLE_TO_PROCESS, f"identifier unreadable: {exc}"), None
            return
        final: int = QueryStatus.SUCCESS
        # Matches go out through our own sender; pynetdicom sends only the last response.
        pending = PendingResponses(
            event.assoc,
            event.context,
            int(event.request.MessageID or 0),
            str(event.request.AffectedSOPClassUID),
        )
        try:
            for status, answer in answers(
                archive,
                event,
                identifier,
                model,
                max_matches=max_matches,
                retrieve_ae=retrieve_ae_title,
            ):
                final = int(getattr(status, "Status", status))
                if final == QueryStatus.PENDING and answer is not None:
                    try:
                        if not pending.send(answer):
                            return  # the peer aborted or released: nobody to answer
                    except Exception as exc:
                        log.exception("a C-FIND response could not be sent")
                        final = QueryStatus.UNABLE_TO_PROCESS
                        yield failure(final, f"response not sent: {exc}"), None
                        return
                    continue
                assert not isinstance(answer, bytes)
                yield status, answer
        finally:
            ok = final in (0x0000, 0xFE00, 0xFF00, 0xFF01)
            archive.audit.record(
                AuditEvent.QUERY,
                actor(event),
                Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
                StudyInstanceUID=str(identifier.get("StudyInstanceUID", "") or ""),
                detail=f"C-FIND {identifier.get('QueryRetrieveLevel', '')}"
                + ("" if ok else f" 0x{final:04X}"),
            )

    return handle_find


def answers(
    archive: Archive,
    event: evt.Event,
    identifier: Dataset,
    model: Model,
    *,
    max_matches: int,
    retrieve_ae: str,
) -> Iterator[Answer]:
    """The responses to one request, matches as pending ones, checking C-CANCEL before
    each; the final Success is left to pynetdicom."""
    sop_class = str(event.request.AffectedSOPClassUID)
    negotiated = {str(k): v for k, v in event.assoc.requestor.sop_class_extended.items()}
    extended = negotiated.get(sop_class, b"")
    try:
        query = query_from_identifier(
            identifier,
            model,
            fuzzy=len(extended) > _FUZZY_BYTE and extended[_FUZZY_BYTE] == 1,
            combined_datetime=(
                len(extended) > _COMBINED_DATETIME_BYTE and extended[_COMBINED_DATETIME_BYTE] == 1
            ),
        )
        with archive.index.reading() as conn:
            count = conn.execute(count_query(query, at_most=max_matches + 1)).scalar_one()
            if count > max_matches:
                comment = f"more than {max_matches} matches: refine the query"
                yield failure(QueryStatus.OUT_OF_RESOURCES, comment), None
                return
            # Server-side cursor where the database has one: rows are fetched as they
            # are sent, never all at once.
            statement = compile_query(query).execution_options(
                stream_results=True, max_row_buffer=500
            )
            fast = MatchEncoder(
                identifier, query.level, retrieve_ae, str(event.context.transfer_syntax)
            )
            for row in conn.execute(statement).mappings():
                if event.is_cancelled:
                    yield QueryStatus.CANCEL, None
                    return
                match = dict(row)
                encoded = fast.encode(match)
                yield (
                    QueryStatus.PENDING,
                    (
                        encode_match(match, identifier, query.level, retrieve_ae)
                        if encoded is None
                        else encoded
                    ),
                )
    except InvalidQuery as exc:
        yield failure(exc.dimse_status, str(exc)), None
    except Exception as exc:
        log.exception("C-FIND failed")
        yield failure(QueryStatus.UNABLE_TO_PROCESS, f"query failed: {exc}"), None


def accept_extended_negotiation(event: evt.Event) -> dict[str, bytes]:
    """PS3.4 C.5.1.1: accept combined date-time and fuzzy person-name matching as asked;
    decline relational queries and timezone adjustment."""
    accepted: dict[str, bytes] = {}
    app_info: dict[str, bytes] = getattr(event, "app_info", {})
    for uid, info in app_info.items():
        if uid not in MODELS:
            continue
        reply = bytearray(info[:4])
        if reply:
            reply[0] = 0  # relational queries: not supported
        if len(reply) > _TIMEZONE_BYTE:
            reply[_TIMEZONE_BYTE] = 0  # timezone query adjustment: not supported
        accepted[uid] = bytes(reply)
    return accepted
