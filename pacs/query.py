"""The one matching engine (PS3.4 C.2.2.2) behind C-FIND and QIDO-RS, compiled to SQL.

A request is decoded by its protocol adapter into a :class:`Query`: the level, the
matching keys (keyword -> raw value as sent), the return keys and whether person names
match fuzzily. Everything from there is pure: :func:`compile_query` turns it into one
SQLAlchemy ``SELECT`` over the index, so matching scales with the database's indexes
instead of a Python loop, and the protocol adapter only encodes the rows it streams.

Matching rules, per value representation:

- empty value: universal matching, the attribute is only returned;
- UI with backslashes: list of UIDs;
- ``*`` and ``?`` in text values: wildcard matching (SQL LIKE with ``%``/``_`` escaped);
- DA, TM, DT with ``-``: range matching (``a-``, ``-b``, ``a-b``); an upper bound covers
  everything it is a prefix of, so ``-1200`` includes 12:00:30;
- StudyDate and StudyTime both given as ranges: combined date-time range matching;
- PN with fuzzy matching: case- and accent-insensitive, on the normalised form;
- multi-valued stored attributes (ModalitiesInStudy, ImageType): any value matches;
- anything else: single value matching, exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, true

from pacs.errors import InvalidQuery
from pacs.header import normalise_name
from pacs.index import instance, patient, record_query, series, study
from pacs.uids import is_valid_uid


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Model(StrEnum):
    """Which information model the query belongs to (PS3.4 C.6.1 and C.6.2)."""

    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


@dataclass(frozen=True, slots=True)
class Attribute:
    keyword: str
    level: Level
    column: Any
    vr: str
    search_column: Any = None  # normalised person name
    multi_valued: bool = False


_TABLES = {Level.PATIENT: patient, Level.STUDY: study, Level.SERIES: series, Level.IMAGE: instance}

# keyword: VR, per level; column names in the index are the keywords.
_KEYS: dict[Level, dict[str, str]] = {
    Level.PATIENT: {
        "PatientName": "PN",
        "PatientID": "LO",
        "IssuerOfPatientID": "LO",
        "PatientBirthDate": "DA",
        "PatientSex": "CS",
        "NumberOfPatientRelatedStudies": "IS",
        "NumberOfPatientRelatedSeries": "IS",
        "NumberOfPatientRelatedInstances": "IS",
    },
    Level.STUDY: {
        "StudyInstanceUID": "UI",
        "StudyDate": "DA",
        "StudyTime": "TM",
        "AccessionNumber": "SH",
        "StudyID": "SH",
        "StudyDescription": "LO",
        "ReferringPhysicianName": "PN",
        "TimezoneOffsetFromUTC": "SH",
        "ModalitiesInStudy": "CS",
        "NumberOfStudyRelatedSeries": "IS",
        "NumberOfStudyRelatedInstances": "IS",
    },
    Level.SERIES: {
        "SeriesInstanceUID": "UI",
        "Modality": "CS",
        "SeriesNumber": "IS",
        "SeriesDescription": "LO",
        "BodyPartExamined": "CS",
        "Laterality": "CS",
        "PerformedProcedureStepStartDate": "DA",
        "PerformedProcedureStepStartTime": "TM",
        "NumberOfSeriesRelatedInstances": "IS",
    },
    Level.IMAGE: {
        "SOPInstanceUID": "UI",
        "SOPClassUID": "UI",
        "InstanceNumber": "IS",
        "Rows": "US",
        "Columns": "US",
        "BitsAllocated": "US",
        "NumberOfFrames": "IS",
        "ContentDate": "DA",
        "ContentTime": "TM",
        "ImageType": "CS",
        "ViewPosition": "CS",
        "ImageLaterality": "CS",
        "PresentationIntentType": "CS",
        "PhotometricInterpretation": "CS",
        "TransferSyntaxUID": "UI",
    },
}
_MULTI_VALUED = {"ModalitiesInStudy", "ImageType"}


def _attributes() -> dict[str, Attribute]:
    found = {}
    for level, keys in _KEYS.items():
        table = _TABLES[level]
        for keyword, vr in keys.items():
            search = table.c.get(f"{keyword}Search") if vr == "PN" else None
            found[keyword] = Attribute(
                keyword, level, table.c[keyword], vr, search, keyword in _MULTI_VALUED
            )
    return found


ATTRIBUTES: Mapping[str, Attribute] = _attributes()
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_NUMERIC_VRS = {"IS", "US", "UL", "SS", "SL"}
_RANGE_VRS = {"DA", "TM", "DT"}
_ESCAPE = "!"


@dataclass(frozen=True)
class Query:
    """A decoded request: what to match and what to return, protocol-free."""

    level: Level
    model: Model = Model.STUDY_ROOT
    keys: Mapping[str, str] = field(default_factory=dict)
    return_keys: tuple[str, ...] = ()
    fuzzy: bool = False
    combined_datetime: bool = True
    # DIMSE C-FIND is hierarchical; QIDO-RS also searches /series and /instances across
    # studies, without the unique keys of the levels above.
    hierarchical: bool = True

    def __post_init__(self) -> None:
        if self.model == Model.PATIENT_ROOT:
            allowed = set(Level)
        else:
            allowed = {Level.STUDY, Level.SERIES, Level.IMAGE}
        if self.level not in allowed:
            raise InvalidQuery(f"level {self.level} is not part of the {self.model} root model")


def check_hierarchy(query: Query) -> None:
    """Hierarchical search (PS3.4 C.4.1.3.1): unique keys above the level, nothing below.

    Patient-level unique keys are needed only in the Patient Root model; Study Root starts
    at STUDY, so the patient attributes there are ordinary matching keys of the study.
    """
    depth = _DEPTH[query.level]
    top = 0 if query.model == Model.PATIENT_ROOT else 1
    for level, keyword in UNIQUE_KEYS.items():
        level_depth = _DEPTH[level]
        if query.hierarchical and top <= level_depth < depth:
            value = query.keys.get(keyword, "")
            if not value or "\\" in value or "*" in value or "?" in value:
                raise InvalidQuery(
                    f"{keyword} must be a single value to query at {query.level} level"
                )
    for keyword, value in query.keys.items():
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None or not value:
            continue
        key_depth = _DEPTH[attribute.level]
        if query.model == Model.STUDY_ROOT and attribute.level == Level.PATIENT:
            key_depth = _DEPTH[Level.STUDY]
        if key_depth > depth:
            raise InvalidQuery(f"{keyword} is below the {query.level} level")


def _like_pattern(value: str) -> str:
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_" + _ESCAPE:
            out.append(_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _text_match(column: Any, value: str) -> ColumnElement[bool]:
    if _has_wildcard(value):
        return column.like(_like_pattern(value), escape=_ESCAPE)  # type: ignore[no-any-return]
    return column == value  # type: ignore[no-any-return]


def _multi_match(column: Any, value: str) -> ColumnElement[bool]:
    """Stored ``A\\B\\C``: true when any stored value matches ``value``."""
    exact = _like_pattern(value)
    return or_(
        column.like(exact, escape=_ESCAPE),
        column.like(exact + "\\%", escape=_ESCAPE),
        column.like("%\\" + exact, escape=_ESCAPE),
        column.like("%\\" + exact + "\\%", escape=_ESCAPE),
    )


def _range(column: Any, value: str) -> ColumnElement[bool]:
    low, _, high = value.partition("-")
    low, high = low.strip(), high.strip()
    conditions: list[ColumnElement[bool]] = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        # Everything that starts with the upper bound is inside it.
        conditions.append(column < high + "\x7f")
    return and_(*conditions)


def _combined(date_col: Any, time_col: Any, dates: str, times: str) -> ColumnElement[bool]:
    """StudyDate + StudyTime as one datetime range (PS3.4 C.2.2.2.5.1)."""
    d_low, _, d_high = dates.partition("-")
    t_low, _, t_high = times.partition("-")
    conditions: list[ColumnElement[bool]] = [date_col != ""]
    if d_low:
        conditions.append(
            or_(date_col > d_low, and_(date_col == d_low, time_col >= t_low))
            if t_low
            else date_col >= d_low
        )
    if d_high:
        conditions.append(
            or_(date_col < d_high, and_(date_col == d_high, time_col < t_high + "\x7f"))
            if t_high
            else date_col <= d_high
        )
    return and_(*conditions)


def match_condition(attribute: Attribute, value: str, fuzzy: bool) -> ColumnElement[bool]:
    """The SQL condition one matching key contributes (``value`` as sent, not empty)."""
    column = attribute.column
    if attribute.vr == "UI":
        uids = [v.strip() for v in value.split("\\") if v.strip()]
        for uid in uids:
            if not is_valid_uid(uid) and not _has_wildcard(uid):
                raise InvalidQuery(f"{attribute.keyword} {uid[:70]!r} is not a UID")
        if len(uids) > 1:
            return column.in_(uids)  # type: ignore[no-any-return]
        return _text_match(column, uids[0]) if uids else true()
    if attribute.vr in _RANGE_VRS and "-" in value:
        return _range(column, value)
    if attribute.vr in _NUMERIC_VRS:
        try:
            return column == int(value.strip())  # type: ignore[no-any-return]
        except ValueError as exc:
            raise InvalidQuery(f"{attribute.keyword} {value[:40]!r} is not a number") from exc
    if attribute.vr == "PN" and fuzzy and attribute.search_column is not None:
        return _text_match(attribute.search_column, normalise_name(value))
    values = value.split("\\") if attribute.vr != "PN" else [value]
    if attribute.multi_valued:
        return or_(*(_multi_match(column, v) for v in values if v)) if any(values) else true()
    if len(values) > 1:
        # A multi-valued key matches any of its values (e.g. Modality "CT\\MR").
        return or_(*(_text_match(column, v) for v in values))
    return _text_match(column, value)


def conditions(query: Query) -> list[ColumnElement[bool]]:
    result: list[ColumnElement[bool]] = []
    keys = {k: v for k, v in query.keys.items() if v and v != "*"}
    if (
        query.combined_datetime
        and "-" in keys.get("StudyDate", "")
        and "-" in keys.get("StudyTime", "")
    ):
        result.append(
            _combined(
                study.c.StudyDate, study.c.StudyTime, keys.pop("StudyDate"), keys.pop("StudyTime")
            )
        )
    for keyword, value in keys.items():
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None:
            # A key the index does not hold cannot be matched: it is returned empty.
            continue
        result.append(match_condition(attribute, value, query.fuzzy))
    return result


def _columns_for(query: Query) -> list[Any]:
    depth = _DEPTH[query.level]
    wanted = []
    for attribute in ATTRIBUTES.values():
        if _DEPTH[attribute.level] <= depth:
            wanted.append(attribute.column.label(attribute.keyword))
    return wanted


def compile_query(query: Query, *, limit: int | None = None, offset: int = 0) -> Select[Any]:
    """One SELECT returning one row per match at ``query.level``, DICOM keywords as labels."""
    check_hierarchy(query)
    depth = _DEPTH[query.level]
    statement = select(*_columns_for(query)).select_from(patient)
    if depth >= 1:
        statement = statement.join(study, study.c.patient_id == patient.c.id)
    if depth >= 2:
        statement = statement.join(series, series.c.study_id == study.c.id)
    if depth >= 3:
        statement = statement.join(instance, instance.c.series_id == series.c.id)
    for condition in conditions(query):
        statement = statement.where(condition)
    order = {
        0: [patient.c.id],
        1: [study.c.id],
        2: [series.c.id],
        3: [instance.c.id],
    }[depth]
    statement = statement.order_by(*order)
    if limit is not None:
        statement = statement.limit(limit)
    if offset:
        statement = statement.offset(offset)
    return statement


def count_query(query: Query, *, at_most: int) -> Select[Any]:
    """How many matches there are, counting no further than ``at_most``."""
    inner = compile_query(query, limit=at_most).subquery()
    return select(func.count()).select_from(inner)


def keys_at_or_above(level: Level) -> Iterable[str]:
    depth = _DEPTH[level]
    return [k for k, a in ATTRIBUTES.items() if _DEPTH[a.level] <= depth]


def compile_retrieve(query: Query) -> Select[Any]:
    """The instances a C-MOVE or C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

    The unique key of the retrieve level must be given (a single UID or a list); unique
    keys of the levels above narrow the match when present.
    """
    unique = UNIQUE_KEYS[query.level]
    if not query.keys.get(unique):
        raise InvalidQuery(f"{unique} is required to retrieve at {query.level} level")
    wanted = {
        keyword: value
        for keyword, value in query.keys.items()
        if keyword in UNIQUE_KEYS.values() and value
    }
    for keyword, value in wanted.items():
        if _has_wildcard(value):
            raise InvalidQuery(f"{keyword} cannot hold wildcards in a retrieve")
    statement = (
        record_query()
        .join(patient, study.c.patient_id == patient.c.id)
        .order_by(study.c.id, series.c.id, instance.c.id)
    )
    for keyword, value in wanted.items():
        statement = statement.where(match_condition(ATTRIBUTES[keyword], value, fuzzy=False))
    return statement  # type: ignore[no-any-return]
