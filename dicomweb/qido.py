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

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacs.errors import InvalidQuery
from pacs.query import Level, Model, Query, keys_at_or_above

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
_DERIVED = {"InstanceAvailability", "RetrieveURL"}


@dataclass(frozen=True)
class Search:
    query: Query
    return_keys: tuple[str, ...]
    limit: int | None
    offset: int


def _keyword(name: str) -> str:
    """A query parameter names an attribute by keyword or by tag (``00100010``)."""
    if _TAG.fullmatch(name):
        keyword = keyword_for_tag(int(name, 16))
        if not keyword:
            raise InvalidQuery(f"unknown attribute tag {name}")
        return keyword
    if tag_for_keyword(name) is None:
        raise InvalidQuery(f"unknown query parameter {name!r}")
    return name


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise InvalidQuery(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def parse_search(
    level: Level,
    params: Sequence[tuple[str, str]],
    *,
    StudyInstanceUID: str | None = None,
    SeriesInstanceUID: str | None = None,
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
                elif field:
                    included.append(_keyword(field))
        else:
            keyword = _keyword(name)
            if keyword in keys:
                raise InvalidQuery(f"{name} is given twice")
            keys[keyword] = value
    if StudyInstanceUID is not None:
        keys["StudyInstanceUID"] = StudyInstanceUID
    if SeriesInstanceUID is not None:
        keys["SeriesInstanceUID"] = SeriesInstanceUID
    if include_all:
        included = list(keys_at_or_above(level))
    returned = tuple(dict.fromkeys([*DEFAULT_RETURN[level], *keys, *included]))
    query = Query(
        level=level,
        model=Model.STUDY_ROOT,
        keys=keys,
        return_keys=returned,
        fuzzy=fuzzy,
        hierarchical=False,
    )
    return Search(query=query, return_keys=returned, limit=limit, offset=offset)


@functools.cache
def _tag_and_vr(keyword: str) -> tuple[str, str]:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return f"{tag:08X}", dictionary_VR(tag)


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
        if keyword == "InstanceAvailability":
            value: Any = "ONLINE"
        elif keyword == "RetrieveURL":
            value = _retrieve_url(row, level, base_url)
        elif keyword in _DERIVED or keyword not in row:
            value = None
        else:
            value = row[keyword]
        out[_tag_and_vr(keyword)[0]] = _json_value(keyword, value)
    return dict(sorted(out.items()))


def _retrieve_url(row: Mapping[str, Any], level: Level, base_url: str) -> str:
    url = f"{base_url}/studies/{row['StudyInstanceUID']}"
    if level in (Level.SERIES, Level.IMAGE):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level == Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url
