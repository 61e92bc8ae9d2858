"""C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root models, all levels.

The identifier is decoded into a :class:`~pacs.query.Query` (the same engine QIDO-RS
uses), matches are counted up to the configured limit, then streamed from one SELECT:
each row becomes one pending response holding exactly the requested keys plus
QueryRetrieveLevel, SpecificCharacterSet and RetrieveAETitle, sent by
:class:`~pacs.dimse.pending.PendingResponses`. C-CANCEL is checked before every response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
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
from pacs.audit import Actor, AuditEvent, Outcome
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
from pacs.query import (
    ATTRIBUTES,
    MAX_QUERY_KEYS,
    Level,
    Model,
    Query,
    count,
    execute,
    item_matches,
    key_name,
    returned_value,
    tag_of,
)
from pacs.status import QueryStatus

log = logging.getLogger(__name__)

MODELS: Mapping[str, Model] = {
    PatientRootQueryRetrieveInformationModelFind: Model.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: Model.STUDY_ROOT,
}
_FUZZY_BYTE = 2  # PS3.4 C.5.1.1: byte 3 of the C-FIND extended negotiation
_COMBINED_DATETIME_BYTE = 1
_TIMEZONE_BYTE = 3
# Matches read before the first is sent; a query with fewer is never counted apart.
_PEEK = 256

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
    identifier: Dataset,
    model: Model,
    *,
    fuzzy: bool = False,
    combined_datetime: bool = True,
    case_insensitive_names: bool = False,
    max_keys: int = MAX_QUERY_KEYS,
) -> Query:
    """Decode a C-FIND identifier into the protocol-free query."""
    raw_level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    try:
        level = Level(raw_level)
    except ValueError as exc:
        raise InvalidQuery(f"QueryRetrieveLevel {raw_level!r} is not valid") from exc
    keys: dict[str, str] = {}
    sequences: dict[str, dict[str, str]] = {}
    returned: list[str] = []
    for element in identifier:
        if element.tag.is_private_creator or element.tag.element == 0:
            continue
        keyword = key_name(int(element.tag))
        if keyword in CONTROL_KEYS:
            continue
        returned.append(keyword)
        if element.VR == "SQ":
            items = list(element.value or [])
            if len(items) > 1:
                raise InvalidQuery(f"{keyword}: a sequence matching key has one item")
            sequences[keyword] = (
                {key_name(int(e.tag)): _value_text(e.value).strip() for e in items[0]}
                if items
                else {}
            )
            continue
        keys[keyword] = _value_text(element.value).strip()
    return Query(
        level=level,
        model=model,
        keys=keys,
        return_keys=tuple(returned),
        fuzzy=fuzzy,
        combined_datetime=combined_datetime,
        sequences=sequences,
        case_insensitive_names=case_insensitive_names,
        max_keys=max_keys,
    )


def encode_match(
    row: Mapping[str, Any],
    identifier: Dataset,
    level: Level,
    retrieve_ae_title: str,
    query: Query | None = None,
) -> Dataset:
    """The pending-response identifier for one matching row."""
    answer = Dataset()
    texts: list[str] = []
    folded = query is not None and query.names_folded
    for element in identifier:
        if element.tag.is_private_creator or element.tag.element == 0:
            continue
        keyword = key_name(int(element.tag))
        if keyword in CONTROL_KEYS:
            continue
        if element.VR == "SQ":
            item_keys = query.sequences.get(keyword, {}) if query is not None else {}
            answer.add_new(element.tag, "SQ", _sequence(row, keyword, item_keys, folded))
            continue
        if keyword in ATTRIBUTES:
            encoded = _as_vr(row.get(keyword), element.VR)
        else:
            encoded = _stored(returned_value(row, keyword), element)
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


def _stored(element_json: dict[str, Any] | None, requested: Any) -> Any:
    """A value of the stored header (DICOM JSON) as the requested element's value."""
    if not element_json or not element_json.get("Value"):
        return None
    tag = f"{int(requested.tag):08X}"
    try:
        found = Dataset.from_json({tag: element_json})[requested.tag]
    except Exception:  # a value kept as sent (an IS of "1A"): returned as that text
        texts = [str(v) for v in element_json["Value"] if v is not None]
        return texts[0] if len(texts) == 1 else texts
    return found.value


def _sequence(
    row: Mapping[str, Any], keyword: str, item_keys: Mapping[str, str], folded: bool
) -> list[Dataset]:
    """PS3.4 C.2.2.2.6: the matching items, with only the requested attributes; the
    whole sequence when no item attribute was named."""
    stored = returned_value(row, keyword) or {}
    items = [i for i in stored.get("Value") or [] if isinstance(i, dict)]
    if any(item_keys.values()):
        items = [i for i in items if item_matches(i, item_keys, folded)]
    wanted = {f"{tag_of(k):08X}" for k in item_keys}
    out = []
    for item in items:
        kept = {t: v for t, v in item.items() if t in wanted} if wanted else item
        try:
            out.append(Dataset.from_json(kept))
        except Exception:
            log.warning("C-FIND: an item of %s could not be returned", keyword)
    return out


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


@dataclass(frozen=True, slots=True)
class FindService:
    """C-FIND as this archive answers it, whichever code carries the messages."""

    archive: Archive
    max_matches: int
    retrieve_ae_title: str
    case_insensitive_names: bool = True
    max_keys: int = MAX_QUERY_KEYS

    def responses(
        self,
        who: Actor,
        *,
        sop_class: str,
        extended: bytes,
        transfer_syntax: str,
        identifier: Callable[[], Dataset],
        cancelled: Callable[[], bool],
    ) -> Generator[Answer, None, None]:
        """Pending responses (with their match), then a final one unless the final is a
        plain Success; audited once the request is answered.

        ``identifier`` decodes the request's identifier (it raises what pydicom raises);
        ``extended`` is the SOP Class Extended Negotiation the requestor sent for
        ``sop_class`` (PS3.4 C.5.1.1)."""
        model = MODELS.get(sop_class)
        if model is None:
            yield failure(QueryStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unknown model"), None
            return
        try:
            decoded = identifier()
        except Exception as exc:  # whatever pydicom raises
            yield failure(QueryStatus.UNABLE_TO_PROCESS, f"identifier unreadable: {exc}"), None
            return
        final: int = QueryStatus.SUCCESS
        try:
            for status, answer in answers(
                self.archive,
                decoded,
                model,
                sop_class=sop_class,
                extended=extended,
                transfer_syntax=transfer_syntax,
                cancelled=cancelled,
                max_matches=self.max_matches,
                retrieve_ae=self.retrieve_ae_title,
                case_insensitive_names=self.case_insensitive_names,
                max_keys=self.max_keys,
            ):
                final = int(getattr(status, "Status", status))
                yield status, answer
        finally:
            ok = final in (0x0000, 0xFE00, 0xFF00, 0xFF01)
            self.archive.audit.record(
                AuditEvent.QUERY,
                who,
                Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE,
                StudyInstanceUID=str(decoded.get("StudyInstanceUID", "") or ""),
                detail=f"C-FIND {decoded.get('QueryRetrieveLevel', '')}"
                + ("" if ok else f" 0x{final:04X}"),
            )


def make_find_handler(service: FindService) -> Callable[[evt.Event], Iterator[Response]]:
    def handle_find(event: evt.Event) -> Iterator[Response]:
        sop_class = str(event.request.AffectedSOPClassUID)
        negotiated = {str(k): v for k, v in event.assoc.requestor.sop_class_extended.items()}
        responses = service.responses(
            actor(event),
            sop_class=sop_class,
            extended=negotiated.get(sop_class, b""),
            transfer_syntax=str(event.context.transfer_syntax),
            identifier=lambda: event.identifier,
            cancelled=lambda: bool(event.is_cancelled),
        )
        # Matches go out through our own sender; pynetdicom sends only the last response.
        pending = PendingResponses(
            event.assoc, event.context, int(event.request.MessageID or 0), sop_class
        )
        with closing(responses):
            for status, answer in responses:
                code = int(getattr(status, "Status", status))
                if code == QueryStatus.PENDING and answer is not None:
                    try:
                        if not pending.send(answer):
                            return  # the peer aborted or released: nobody to answer
                    except Exception as exc:
                        log.exception("a C-FIND response could not be sent")
                        comment = f"response not sent: {exc}"
                        yield failure(QueryStatus.UNABLE_TO_PROCESS, comment), None
                        return
                    continue
                assert not isinstance(answer, bytes)
                yield status, answer

    return handle_find


def answers(
    archive: Archive,
    identifier: Dataset,
    model: Model,
    *,
    sop_class: str,
    extended: bytes,
    transfer_syntax: str,
    cancelled: Callable[[], bool],
    max_matches: int,
    retrieve_ae: str,
    case_insensitive_names: bool = True,
    max_keys: int = MAX_QUERY_KEYS,
) -> Iterator[Answer]:
    """The responses to one request, matches as pending ones, checking C-CANCEL before
    each; a final Success is left to the caller."""
    try:
        query = query_from_identifier(
            identifier,
            model,
            fuzzy=len(extended) > _FUZZY_BYTE and extended[_FUZZY_BYTE] == 1,
            combined_datetime=(
                len(extended) > _COMBINED_DATETIME_BYTE and extended[_COMBINED_DATETIME_BYTE] == 1
            ),
            case_insensitive_names=case_insensitive_names,
            max_keys=max_keys,
        )
        with archive.index.reading() as conn:
            # Rows are fetched as they are sent (a server-side cursor where the database
            # has one), never all at once. The first few are read before anything is
            # sent: most queries end there, and need no count of their matches to know
            # that they stay under max_matches.
            rows = execute(conn, query)
            first = list(islice(rows, min(_PEEK, max_matches + 1)))
            if len(first) > max_matches or (
                len(first) == _PEEK and count(conn, query, at_most=max_matches + 1) > max_matches
            ):
                comment = f"more than {max_matches} matches: refine the query"
                yield failure(QueryStatus.OUT_OF_RESOURCES, comment), None
                return
            fast = MatchEncoder(identifier, query.level, retrieve_ae, transfer_syntax)
            for match in chain(first, rows):
                if cancelled():
                    yield QueryStatus.CANCEL, None
                    return
                encoded = fast.encode(match)
                yield (
                    QueryStatus.PENDING,
                    (
                        encode_match(match, identifier, query.level, retrieve_ae, query)
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
