"""The one matching engine (PS3.4 C.2.2.2) behind C-FIND and QIDO-RS.

A request is decoded by its protocol adapter into a :class:`Query`: the level, the
matching keys (keyword -> raw value as sent), the return keys and whether person names
match fuzzily. From there the engine decides what SQL can do and finishes the rest:
keys the index has a column for become one ``SELECT`` (so matching scales with the
database's indexes); any other attribute, sequences included, is matched and returned
from the stored header (:mod:`pacs.attributes`) of the entity's first instance, as
Orthanc does for the tags it does not index. :func:`execute` streams the matches.

Matching rules, per value representation:

- empty value: universal matching, the attribute is only returned;
- UI with backslashes: list of UIDs;
- ``*`` and ``?`` in text values: wildcard matching (SQL LIKE with ``%``/``_`` escaped);
  on DA, DT and TM they are refused (PS3.4 C.2.2.2.4 allows them only on text VRs);
- DA, TM, DT with ``-``: range matching (``a-``, ``-b``, ``a-b``); an upper bound covers
  everything it is a prefix of, so ``-1200`` includes 12:00:30;
- StudyDate and StudyTime both given as ranges: combined date-time range matching;
- a study with no StudyDate (StudyTime) matches any StudyDate (StudyTime) key: they are
  Required Keys, and PS3.4 C.2.2.1.2 makes an unknown value match;
- PN: case- and accent-insensitive on the normalised form with fuzzy matching, or when
  ``case_insensitive_names`` is set (the default, as Orthanc's CaseSensitivePN=false);
- multi-valued stored attributes (ModalitiesInStudy, ImageType): any value matches;
- sequences (C-FIND): an item of the stored sequence must match every item key
  (PS3.4 C.2.2.2.6);
- anything else: single value matching, exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select, true

from pacs.attributes import text_values, unpack
from pacs.attributes import values as json_values
from pacs.errors import InvalidQuery, QueryTooLarge
from pacs.header import normalise_name
from pacs.index import instance, patient, record_query, series, study
from pacs.uids import is_valid_uid

# Keys (matching and return) one request may name: each one the index has no column for
# is looked up in every match's stored header (1,800 of them over 1,000 matches took 17 s).
MAX_QUERY_KEYS = 256


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class Model(StrEnum):
    """Which information model the query belongs to (PS3.4 C.6.1 and C.6.2)."""

    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"


DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}
# Where a match finds the stored header of its entity (a row's decoded attributes).
ATTRIBUTES_KEY = "__attributes__"


@dataclass(frozen=True, slots=True)
class Attribute:
    keyword: str
    level: Level
    column: Any
    vr: str
    search_column: Any = None  # normalised person name
    multi_valued: bool = False
    # Patient attributes as the study's own instances named them (below PATIENT level).
    study_column: Any = None
    study_search_column: Any = None


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
# Required Keys (PS3.4 C.6) whose unknown (empty) stored value matches any key value
# (C.2.2.1.2). Applied to the study's date and time only: applied to PatientID or a name
# it would list unidentified studies under an identified patient's query.
_UNKNOWN_MATCHES = {"StudyDate", "StudyTime"}


def _attributes() -> dict[str, Attribute]:
    found = {}
    for level, keys in _KEYS.items():
        table = _TABLES[level]
        for keyword, vr in keys.items():
            search = table.c.get(f"{keyword}Search") if vr == "PN" else None
            own = study.c.get(keyword) if level == Level.PATIENT else None
            own_search = study.c.get(f"{keyword}Search") if own is not None and vr == "PN" else None
            found[keyword] = Attribute(
                keyword,
                level,
                table.c[keyword],
                vr,
                search,
                keyword in _MULTI_VALUED,
                own,
                own_search,
            )
    return found


ATTRIBUTES: Mapping[str, Attribute] = _attributes()
UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_NUMERIC_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
_DECIMAL_VRS = {"DS", "FL", "FD"}
_RANGE_VRS = {"DA", "TM", "DT"}
_ESCAPE = "!"
_TAG = re.compile(r"[0-9A-F]{8}")

# The level of attributes the index has no column for, for the ones whose level is not
# the instance (PS3.3 modules: Patient; General Study and Patient Study; General Series,
# General Equipment, Frame of Reference). InstitutionName is a study attribute here, as
# in Orthanc's main tags, so that a study list can show it.
_PATIENT_STUDY_KEYS = {"PatientAge", "PatientSize", "PatientWeight", "Occupation"}
_STUDY_KEYS = {
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "RequestedProcedureDescription",
    "InstitutionName",
    "AdmittingDiagnosesDescription",
    "AdditionalPatientHistory",
    "ProcedureCodeSequence",
    "ReferencedStudySequence",
    "StudyComments",
    "ReasonForPerformedProcedureCodeSequence",
}
_SERIES_KEYS = {
    "SeriesDate",
    "SeriesTime",
    "ProtocolName",
    "OperatorsName",
    "PerformingPhysicianName",
    "PatientPosition",
    "RequestAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "PerformedProtocolCodeSequence",
    "ReferencedPerformedProcedureStepSequence",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "FrameOfReferenceUID",
    "SeriesType",
}


def tag_of(keyword: str) -> int:
    """A keyword's tag; private attributes are named by their tag (``00091001``)."""
    if _TAG.fullmatch(keyword):
        return int(keyword, 16)
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InvalidQuery(f"unknown attribute {keyword!r}")
    return int(tag)


def key_name(tag: int) -> str:
    """The name of an attribute in a query: its keyword, or its tag if it has none."""
    return keyword_for_tag(tag) or f"{tag:08X}"


def vr_of(keyword: str) -> str:
    if keyword in ATTRIBUTES:
        return ATTRIBUTES[keyword].vr
    try:
        return str(dictionary_VR(tag_of(keyword))).split(" ")[0]
    except KeyError:
        return "UN"


def level_of(keyword: str) -> Level:
    """The information model level an attribute belongs to."""
    if keyword in ATTRIBUTES:
        return ATTRIBUTES[keyword].level
    if keyword in _PATIENT_STUDY_KEYS or keyword in _STUDY_KEYS:
        return Level.STUDY
    if keyword in _SERIES_KEYS:
        return Level.SERIES
    if (tag_of(keyword) >> 16) == 0x0010:
        return Level.PATIENT
    if (tag_of(keyword) >> 16) == 0x0032:
        return Level.STUDY
    return Level.IMAGE


def model_depth(keyword: str, model: Model) -> int:
    """How deep an attribute is; in the Study Root model patient attributes are the
    study's own (PS3.4 C.6.2)."""
    level = level_of(keyword)
    if model == Model.STUDY_ROOT and level == Level.PATIENT:
        return DEPTH[Level.STUDY]
    return DEPTH[level]


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
    # Sequence matching keys: keyword -> the keys of its one item (PS3.4 C.2.2.2.6).
    sequences: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    case_insensitive_names: bool = False
    max_keys: int = MAX_QUERY_KEYS

    def __post_init__(self) -> None:
        if self.model == Model.PATIENT_ROOT:
            allowed = set(Level)
        else:
            allowed = {Level.STUDY, Level.SERIES, Level.IMAGE}
        if self.level not in allowed:
            raise InvalidQuery(f"level {self.level} is not part of the {self.model} root model")

    @property
    def names_folded(self) -> bool:
        return self.fuzzy or self.case_insensitive_names


def check_hierarchy(query: Query) -> None:
    """Hierarchical search (PS3.4 C.4.1.3.1): unique keys above the level, nothing below.

    Patient-level unique keys are needed only in the Patient Root model; Study Root starts
    at STUDY, so the patient attributes there are ordinary matching keys of the study.
    """
    depth = DEPTH[query.level]
    top = 0 if query.model == Model.PATIENT_ROOT else 1
    for level, keyword in UNIQUE_KEYS.items():
        level_depth = DEPTH[level]
        if query.hierarchical and top <= level_depth < depth:
            value = query.keys.get(keyword, "")
            if not value or "\\" in value or "*" in value or "?" in value:
                raise InvalidQuery(
                    f"{keyword} must be a single value to query at {query.level} level"
                )
    matched = [k for k, v in query.keys.items() if v] + [
        k for k, item in query.sequences.items() if any(item.values())
    ]
    for keyword in matched:
        if model_depth(keyword, query.model) > depth:
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
    return or_(date_col == "", and_(*conditions))


def _check_value(keyword: str, vr: str, value: str) -> None:
    if vr in _RANGE_VRS and _has_wildcard(value):
        raise InvalidQuery(
            f"{keyword}: wildcards are not allowed on {vr} values (PS3.4 C.2.2.2.4); "
            "use a range such as 20240101-20240131"
        )


def match_condition(
    attribute: Attribute, value: str, fuzzy: bool, column: Any = None, search: Any = None
) -> ColumnElement[bool]:
    """The SQL condition one matching key contributes (``value`` as sent, not empty)."""
    column = attribute.column if column is None else column
    search = attribute.search_column if search is None else search
    _check_value(attribute.keyword, attribute.vr, value)
    if attribute.vr == "UI":
        uids = [v.strip() for v in value.split("\\") if v.strip()]
        for uid in uids:
            if not is_valid_uid(uid) and not _has_wildcard(uid):
                raise InvalidQuery(f"{attribute.keyword} {uid[:70]!r} is not a UID")
        if len(uids) > 1:
            return column.in_(uids)  # type: ignore[no-any-return]
        return _text_match(column, uids[0]) if uids else true()
    unknown_matches = attribute.keyword in _UNKNOWN_MATCHES
    if attribute.vr in _RANGE_VRS and "-" in value:
        condition = _range(column, value)
        return or_(column == "", condition) if unknown_matches else condition
    if attribute.vr in _NUMERIC_VRS:
        try:
            number = int(value.strip())
        except ValueError as exc:
            raise InvalidQuery(f"{attribute.keyword} {value[:40]!r} is not a number") from exc
        if not -(1 << 63) <= number < (1 << 63):
            raise InvalidQuery(f"{attribute.keyword} {value[:40]!r} is out of range")
        return column == number  # type: ignore[no-any-return]
    if attribute.vr == "PN" and fuzzy and search is not None:
        return _text_match(search, normalise_name(value))
    values = value.split("\\") if attribute.vr != "PN" else [value]
    if attribute.multi_valued:
        return or_(*(_multi_match(column, v) for v in values if v)) if any(values) else true()
    if len(values) > 1:
        # A multi-valued key matches any of its values (e.g. Modality "CT\\MR").
        condition = or_(*(_text_match(column, v) for v in values))
    else:
        condition = _text_match(column, value)
    return or_(column == "", condition) if unknown_matches else condition


# -- matching in Python, on the stored header ------------------------------------------


def _wild(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _in_range(key: str, value: str) -> bool:
    low, _, high = key.partition("-")
    low, high = low.strip(), high.strip()
    if not value:
        return False
    return (not low or value >= low) and (not high or value < high + "\x7f")


def value_matches(keyword: str, vr: str, key: str, stored: list[str], folded: bool) -> bool:
    """One non-empty key against the stored values of an attribute (any may match)."""
    _check_value(keyword, vr, key)
    present = [v for v in stored if v != ""]
    if not present:
        return False
    if vr == "UI":
        return any(v in key.split("\\") for v in present) or any(
            _wild(key, v) for v in present if _has_wildcard(key)
        )
    if vr in _RANGE_VRS and "-" in key:
        return any(_in_range(key, v) for v in present)
    if vr in _NUMERIC_VRS or vr in _DECIMAL_VRS:
        parse: Callable[[str], float] = int if vr in _NUMERIC_VRS else float
        try:
            wanted = [parse(k.strip()) for k in key.split("\\")]
        except ValueError as exc:
            raise InvalidQuery(f"{keyword} {key[:40]!r} is not a number") from exc
        found = []
        for v in present:
            try:
                found.append(parse(str(v).strip()))
            except ValueError:
                continue
        return any(f in wanted for f in found)
    if vr == "PN":
        if folded:
            return any(_wild(normalise_name(key), normalise_name(v)) for v in present)
        return any(_wild(key, v) for v in present)
    keys = key.split("\\")
    return any(_wild(k, v.strip()) for k in keys for v in present)


def item_matches(item: Mapping[str, Any], keys: Mapping[str, str], folded: bool) -> bool:
    for keyword, key in keys.items():
        if not key or key == "*":
            continue
        stored = text_values(item, f"{tag_of(keyword):08X}") or []
        if not value_matches(keyword, vr_of(keyword), key, stored, folded):
            return False
    return True


def sequence_matches(
    attributes: Mapping[str, Any], keyword: str, keys: Mapping[str, str], folded: bool
) -> bool:
    """PS3.4 C.2.2.2.6: some item matches every item key; no item keys: universal."""
    if not any(v and v != "*" for v in keys.values()):
        return True
    items = json_values(attributes, f"{tag_of(keyword):08X}") or []
    return any(isinstance(i, dict) and item_matches(i, keys, folded) for i in items)


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What SQL does (``statement``) and what is finished on the stored header."""

    statement: Select[Any]
    residual: Mapping[str, str]
    sequences: Mapping[str, Mapping[str, str]]
    attributes: bool  # the stored header is fetched with each row

    @property
    def exact_in_sql(self) -> bool:
        return not self.residual and not any(
            any(v and v != "*" for v in keys.values()) for keys in self.sequences.values()
        )


def _attributes_column(level: Level) -> Any:
    if level == Level.IMAGE:
        return instance.c.attributes
    inner = instance.alias("representative")
    inner_series = series.alias("representative_series")
    statement = select(inner.c.attributes)
    if level == Level.SERIES:
        statement = statement.where(inner.c.series_id == series.c.id).order_by(inner.c.id)
    else:
        statement = statement.join(inner_series, inner.c.series_id == inner_series.c.id)
        if level == Level.STUDY:
            statement = statement.where(inner_series.c.study_id == study.c.id).order_by(inner.c.id)
        else:
            inner_study = study.alias("representative_study")
            statement = (
                statement.join(inner_study, inner_series.c.study_id == inner_study.c.id)
                .where(inner_study.c.patient_id == patient.c.id)
                .order_by(inner.c.id.desc())
            )
    return statement.limit(1).correlate_except(inner).scalar_subquery()


def _column(attribute: Attribute, depth: int) -> tuple[Any, Any]:
    """The column (and its normalised form) an attribute is matched and returned from."""
    if depth >= DEPTH[Level.STUDY] and attribute.study_column is not None:
        return attribute.study_column, attribute.study_search_column
    return attribute.column, attribute.search_column


def _columns_for(query: Query) -> list[Any]:
    depth = DEPTH[query.level]
    wanted = []
    for attribute in ATTRIBUTES.values():
        if DEPTH[attribute.level] <= depth:
            column, _search = _column(attribute, depth)
            wanted.append(column.label(attribute.keyword))
    return wanted


def needs_attributes(query: Query) -> bool:
    """Whether an answer names an attribute that only the stored header has."""
    return any(k not in ATTRIBUTES and k not in DERIVED for k in query.return_keys)


DERIVED = frozenset({"InstanceAvailability", "RetrieveURL", "QueryRetrieveLevel"})


def check_size(query: Query, max_keys: int = MAX_QUERY_KEYS) -> None:
    named = len(set(query.keys) | set(query.return_keys) | set(query.sequences))
    if named > max_keys:
        raise QueryTooLarge(
            f"the query names {named} attributes; at most {max_keys} (max_query_keys)"
        )


def plan(query: Query, *, limit: int | None = None, offset: int = 0) -> Plan:
    """One SELECT returning one row per candidate at ``query.level``, DICOM keywords as
    labels; the keys it could not express in SQL are left in :attr:`Plan.residual`."""
    check_hierarchy(query)
    check_size(query, query.max_keys)
    depth = DEPTH[query.level]
    keys = {k: v for k, v in query.keys.items() if v and v != "*"}
    residual = {k: v for k, v in keys.items() if k not in ATTRIBUTES}
    for keyword, value in residual.items():
        _check_value(keyword, vr_of(keyword), value)
    with_attributes = bool(residual) or bool(query.sequences) or needs_attributes(query)
    columns = _columns_for(query)
    if with_attributes:
        columns.append(_attributes_column(query.level).label(ATTRIBUTES_KEY))
    statement = select(*columns).select_from(patient)
    if depth >= 1:
        statement = statement.join(study, study.c.patient_id == patient.c.id)
    if depth >= 2:
        statement = statement.join(series, series.c.study_id == study.c.id)
    if depth >= 3:
        statement = statement.join(instance, instance.c.series_id == series.c.id)
    indexed = {k: v for k, v in keys.items() if k in ATTRIBUTES}
    if (
        query.combined_datetime
        and "-" in indexed.get("StudyDate", "")
        and "-" in indexed.get("StudyTime", "")
    ):
        statement = statement.where(
            _combined(
                study.c.StudyDate,
                study.c.StudyTime,
                indexed.pop("StudyDate"),
                indexed.pop("StudyTime"),
            )
        )
    for keyword, value in indexed.items():
        attribute = ATTRIBUTES[keyword]
        column, search = _column(attribute, depth)
        statement = statement.where(
            match_condition(attribute, value, query.names_folded, column, search)
        )
    order = {0: [patient.c.id], 1: [study.c.id], 2: [series.c.id], 3: [instance.c.id]}[depth]
    statement = statement.order_by(*order)
    result = Plan(statement, residual, dict(query.sequences), with_attributes)
    if result.exact_in_sql:
        if limit is not None:
            statement = statement.limit(limit)
        if offset:
            statement = statement.offset(offset)
        result = Plan(statement, residual, dict(query.sequences), with_attributes)
    return result


def compile_query(query: Query, *, limit: int | None = None, offset: int = 0) -> Select[Any]:
    """The SQL part of :func:`plan` (all of it when every key has a column)."""
    return plan(query, limit=limit, offset=offset).statement


def _finished(query: Query, found: Plan, row: dict[str, Any]) -> bool:
    attributes = row[ATTRIBUTES_KEY]
    for keyword, key in found.residual.items():
        stored = text_values(attributes, f"{tag_of(keyword):08X}") or []
        if not value_matches(keyword, vr_of(keyword), key, stored, query.names_folded):
            return False
    return all(
        sequence_matches(attributes, keyword, keys, query.names_folded)
        for keyword, keys in found.sequences.items()
    )


def execute(
    conn: Connection, query: Query, *, limit: int | None = None, offset: int = 0
) -> Iterator[dict[str, Any]]:
    """The matches, streamed (a server-side cursor where the database has one); each row
    carries the decoded stored header under :data:`ATTRIBUTES_KEY` when one is needed."""
    found = plan(query, limit=limit, offset=offset)
    statement = found.statement.execution_options(stream_results=True, max_row_buffer=500)
    skipped = 0
    given = 0
    for mapping in conn.execute(statement).mappings():
        row = dict(mapping)
        if found.attributes:
            row[ATTRIBUTES_KEY] = unpack(row.get(ATTRIBUTES_KEY))
        if not found.exact_in_sql:
            if not _finished(query, found, row):
                continue
            if skipped < offset:
                skipped += 1
                continue
            if limit is not None and given >= limit:
                return
        given += 1
        yield row


def count(conn: Connection, query: Query, *, at_most: int) -> int:
    """How many matches there are, counting no further than ``at_most``."""
    found = plan(query, limit=at_most)
    if found.exact_in_sql:
        inner = found.statement.subquery()
        return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())
    return sum(1 for _ in execute(conn, query, limit=at_most))


def count_query(query: Query, *, at_most: int) -> Select[Any]:
    """SQL counting the matches of a query whose keys all have columns."""
    inner = compile_query(query, limit=at_most).subquery()
    return select(func.count()).select_from(inner)


def keys_at_or_above(level: Level) -> Iterable[str]:
    depth = DEPTH[level]
    return [k for k, a in ATTRIBUTES.items() if DEPTH[a.level] <= depth]


def returned_value(row: Mapping[str, Any], keyword: str) -> Any:
    """What an answer holds for ``keyword``: the indexed value, or the stored header's
    DICOM JSON element (a dict) for any other attribute, None when absent."""
    if keyword in ATTRIBUTES:
        return row.get(keyword)
    attributes = row.get(ATTRIBUTES_KEY) or {}
    return attributes.get(f"{tag_of(keyword):08X}")


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
        attribute = ATTRIBUTES[keyword]
        column, search = _column(attribute, DEPTH[Level.STUDY])
        statement = statement.where(match_condition(attribute, value, False, column, search))
    return statement  # type: ignore[no-any-return]
