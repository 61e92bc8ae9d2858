"""QIDO-RS (PS3.18 10.6): query parameters in, DICOM JSON out, matching by pacs.query.

Only the decoding of the URL and the encoding of the answer live here; what matches is
decided by the same engine as C-FIND.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

from pacs.errors import InvalidQuery, QueryTooLarge
from pacs.query import (
    ATTRIBUTES,
    DEPTH,
    DERIVED,
    MAX_QUERY_KEYS,
    Level,
    Model,
    Query,
    check_size,
    key_name,
    keys_at_or_above,
    model_depth,
    returned_value,
    tag_of,
    vr_of,
)

# PS3.18 tables 10.6.3-3 to -5: attributes returned without includefield.
DEFAULT_RETURN: Mapping[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "RetrieveURL",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "TimezoneOffsetFromUTC",
        "SeriesDescription",
        "RetrieveURL",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    Level.IMAGE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "TimezoneOffsetFromUTC",
        "RetrieveURL",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


@dataclass(frozen=True)
class Search:
    query: Query
    return_keys: tuple[str, ...]
    limit: int | None
    offset: int


def _keyword(name: str) -> str | None:
    """A query parameter names an attribute by keyword or by tag (``00100010``); None
    for a parameter that names none (PS3.18 8.3.4: such parameters are ignored, and
    viewers add cache busters)."""
    if _TAG.fullmatch(name):
        tag = int(name, 16)
    else:
        found = tag_for_keyword(name)
        if found is None:
            return None
        tag = int(found)
    if tag >> 16 == 0x0002:
        raise InvalidQuery(f"{name} is a File Meta Information attribute, not a search key")
    return key_name(tag)


def _non_negative(name: str, value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def _included(level: Level, keyword: str) -> bool:
    """PS3.18 10.6.3.3: attributes of a lower level named in includefield are not
    returned (nor returned empty)."""
    if keyword in DERIVED or _private(keyword):
        return True  # private attributes belong to no level; asked for, they are returned
    return model_depth(keyword, Model.STUDY_ROOT) <= DEPTH[level]


def _private(keyword: str) -> bool:
    return bool(_TAG.fullmatch(keyword)) and int(keyword[:4], 16) % 2 == 1


def _with_creators(keywords: list[str]) -> list[str]:
    """PS3.18 10.6.3.3.1: a private element comes with its Private Creator element."""
    out: list[str] = []
    for keyword in keywords:
        if _private(keyword) and int(keyword[4:], 16) > 0xFF:
            group, element = int(keyword[:4], 16), int(keyword[4:], 16)
            out.append(f"{group:04X}{element >> 8:04X}")
        out.append(keyword)
    return out


def parse_search(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    StudyInstanceUID: str | None = None,
    SeriesInstanceUID: str | None = None,
    case_insensitive_names: bool = True,
    max_keys: int = MAX_QUERY_KEYS,
) -> Search:
    keys: dict[str, str] = {}
    included: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    for name, value in params:
        if name == "limit":
            limit = _non_negative(name, value)
        elif name == "offset":
            offset = _non_negative(name, value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise InvalidQuery(f"fuzzymatching must be true or false, not {value!r}")
            fuzzy = value == "true"
        elif name == "includefield":
            for field in (f.strip() for f in value.split(",")):
                if field == "all":
                    include_all = True
                elif field and (keyword := _keyword(field)) is not None:
                    included.append(keyword)
        elif (keyword := _keyword(name)) is not None:
            if keyword in keys:
                raise InvalidQuery(f"{name} is given twice")
            # PS3.18 8.3.4.1: a list of UIDs is comma-separated in a URL.
            is_uid = vr_of(keyword) == "UI"
            keys[keyword] = "\\".join(v.strip() for v in value.split(",")) if is_uid else value
    if StudyInstanceUID is not None:
        keys["StudyInstanceUID"] = StudyInstanceUID
    if SeriesInstanceUID is not None:
        keys["SeriesInstanceUID"] = SeriesInstanceUID
    if include_all:
        included = list(keys_at_or_above(level))
    defaults = list(DEFAULT_RETURN[level])
    # PS3.18 10.6.3.3.2 and .3: across studies, the study's attributes come with each
    # series or instance; across series, the series' attributes with each instance.
    if level in (Level.SERIES, Level.IMAGE) and StudyInstanceUID is None:
        defaults += DEFAULT_RETURN[Level.STUDY]
    if level == Level.IMAGE and SeriesInstanceUID is None:
        defaults += DEFAULT_RETURN[Level.SERIES]
    # What the request names counts, before lower-level fields are dropped.
    named = len(set(keys) | set(included))
    if named > max_keys:
        raise QueryTooLarge(
            f"the query names {named} attributes; at most {max_keys} (max_query_keys)"
        )
    wanted = _with_creators([*defaults, *keys, *included])
    returned = tuple(k for k in dict.fromkeys(wanted) if _included(level, k))
    query = Query(
        level=level,
        model=Model.STUDY_ROOT,
        keys=keys,
        return_keys=returned,
        fuzzy=fuzzy,
        hierarchical=False,
        case_insensitive_names=case_insensitive_names,
        max_keys=max_keys,
    )
    check_size(query, max_keys)
    return Search(query=query, return_keys=returned, limit=limit, offset=offset)


@functools.cache
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    return f"{tag_of(keyword):08X}", vr_of(keyword)


def _json_value(keyword: str, value: Any) -> dict[str, Any]:
    vr = _tag_and_vr(keyword)[1]
    element: dict[str, Any] = {"vr": vr}
    if value is None or value == "":
        return element
    if vr == "PN":
        groups = str(value).split("=")
        names = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))
        element["Value"] = [{k: v for k, v in names.items() if v}]
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        element["Value"] = [int(value)]
    elif vr == "DS":
        element["Value"] = [float(value)]
    else:
        element["Value"] = str(value).split("\\")
    return element


def to_dicom_json(
    row: Mapping[str, Any], return_keys: Iterable[str], level: Level, base_url: str
) -> dict[str, Any]:
    """One match as a DICOM JSON object (PS3.18 F.2), tags as keys in ascending order."""
    out: dict[str, Any] = {}
    for keyword in return_keys:
        tag, vr = _tag_and_vr(keyword)
        if keyword == "InstanceAvailability":
            out[tag] = _json_value(keyword, "ONLINE")
        elif keyword == "RetrieveURL":
            out[tag] = _json_value(keyword, _retrieve_url(row, level, base_url))
        elif keyword in ATTRIBUTES:
            out[tag] = _json_value(keyword, row.get(keyword))
        else:
            # Straight from the stored header, which is DICOM JSON already.
            stored = returned_value(row, keyword)
            out[tag] = stored if stored is not None else {"vr": vr}
    return dict(sorted(out.items()))


def _retrieve_url(row: Mapping[str, Any], level: Level, base_url: str) -> str:
    url = f"{base_url}/studies/{row['StudyInstanceUID']}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url
