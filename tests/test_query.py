"""The matching engine against a plain Python reference of the same rules (PS3.4 C.2.2.2)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs.errors import InvalidQuery
from pacs.header import (
    InstanceAttributes,
    InstanceHeader,
    PatientAttributes,
    SeriesAttributes,
    StudyAttributes,
    normalise_name,
)
from pacs.index import BlobFacts, Index
from pacs.query import Level, Model, Query, compile_query


@dataclass(frozen=True)
class Study:
    StudyInstanceUID: str
    PatientID: str
    PatientName: str
    StudyDate: str
    StudyTime: str
    AccessionNumber: str
    modalities: tuple[str, ...]


NAMES = [
    "Müller^Jürgen",
    "MULLER^JURGEN",
    "Garçon^Amélie",
    "Smith^John",
    "smith^john",
    "O'Brien^S",
    "a%b_c^D",
]
MODALITIES = ["CT", "MR", "DX", "SR"]


@st.composite
def studies(draw: st.DrawFn) -> list[Study]:
    count = draw(st.integers(min_value=1, max_value=12))
    out = []
    for n in range(count):
        out.append(
            Study(
                StudyInstanceUID=f"1.2.{n + 1}",
                PatientID=draw(st.sampled_from(["P1", "P2", "P3"])),
                PatientName=draw(st.sampled_from(NAMES)),
                StudyDate=draw(
                    st.sampled_from(["20240101", "20240115", "20240131", "20240201", ""])
                ),
                StudyTime=draw(st.sampled_from(["080000", "120030", "235959.5", ""])),
                AccessionNumber=draw(st.sampled_from(["A1", "A2", "B1", "a1"])),
                modalities=tuple(
                    sorted(set(draw(st.lists(st.sampled_from(MODALITIES), min_size=1, max_size=3))))
                ),
            )
        )
    return out


def _store(index: Index, rows: list[Study]) -> None:
    for s in rows:
        for m_index, modality in enumerate(s.modalities):
            series_uid = f"{s.StudyInstanceUID}.{m_index + 1}"
            header = InstanceHeader(
                patient=PatientAttributes(s.PatientID, "", s.PatientName, "", ""),
                study=StudyAttributes(
                    s.StudyInstanceUID, s.StudyDate, s.StudyTime, s.AccessionNumber, "", "", "", ""
                ),
                series=SeriesAttributes(
                    series_uid, modality, m_index + 1, "", "", "", "", "", "", ""
                ),
                instance=InstanceAttributes(
                    "1.2.840.10008.5.1.4.1.1.7",
                    f"{series_uid}.1",
                    1,
                    None,
                    None,
                    None,
                    None,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ),
            )
            facts = BlobFacts("1.2.840.10008.1.2.1", 1, "0" * 64, series_uid, "import", "")
            index.add(header, facts, "reject")


# -- the reference -------------------------------------------------------------------


def _wild(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _range(spec: str, value: str) -> bool:
    low, _, high = spec.partition("-")
    if not value:
        return False
    return (not low or value >= low) and (not high or value[: len(high)] <= high)


def reference(study: Study, patient_name: str, keys: dict[str, str], fuzzy: bool) -> bool:
    for keyword, wanted in keys.items():
        if not wanted or wanted == "*":
            continue
        value = {
            "PatientName": patient_name,
            "PatientID": study.PatientID,
            "StudyDate": study.StudyDate,
            "StudyTime": study.StudyTime,
            "AccessionNumber": study.AccessionNumber,
            "StudyInstanceUID": study.StudyInstanceUID,
        }.get(keyword)
        if keyword == "ModalitiesInStudy":
            if not any(_wild(wanted, m) for m in study.modalities):
                return False
            continue
        assert value is not None
        if keyword in ("StudyDate", "StudyTime") and not value:
            continue  # PS3.4 C.2.2.1.2: an unknown Required Key matches any key value
        if keyword == "StudyInstanceUID" and "\\" in wanted:
            if value not in wanted.split("\\"):
                return False
        elif keyword in ("StudyDate", "StudyTime") and "-" in wanted:
            if not _range(wanted, value):
                return False
        elif keyword == "PatientName" and fuzzy:
            if not _wild(normalise_name(wanted), normalise_name(value)):
                return False
        elif not _wild(wanted, value):
            return False
    return True


# -- the property --------------------------------------------------------------------

text_values = st.sampled_from(
    ["", "*", "M*", "*ller*", "m*", "Sm?th*", "*^J*", "a%b*", "a_b*", "X"]
)


@st.composite
def queries(draw: st.DrawFn) -> tuple[dict[str, str], bool]:
    keys: dict[str, str] = {}
    if draw(st.booleans()):
        keys["PatientName"] = draw(text_values | st.sampled_from(NAMES))
    if draw(st.booleans()):
        keys["StudyDate"] = draw(
            st.sampled_from(["20240115", "20240101-", "-20240131", "20240110-20240131", ""])
        )
    if draw(st.booleans()):
        keys["StudyTime"] = draw(st.sampled_from(["-12", "08-", "1200-2359", "080000", ""]))
    if draw(st.booleans()):
        keys["AccessionNumber"] = draw(st.sampled_from(["A1", "A*", "?1", "a1", ""]))
    if draw(st.booleans()):
        keys["ModalitiesInStudy"] = draw(st.sampled_from(["CT", "M?", "S*", "", "XA"]))
    if draw(st.booleans()):
        picked = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
        keys["StudyInstanceUID"] = "\\".join(f"1.2.{n}" for n in picked)
    if draw(st.booleans()):
        keys["PatientID"] = draw(st.sampled_from(["P1", "P*", "p1"]))
    return keys, draw(st.booleans())


@pytest.fixture(scope="module")
def sqlite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("query")


def _fresh(folder: Path, n: list[int]) -> Iterator[Index]:
    n[0] += 1
    index = Index(f"sqlite:///{folder / f'q{n[0]}.sqlite'}")
    index.create_schema()
    yield index
    index.dispose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=studies(), query=queries())
def test_engine_matches_reference(
    sqlite_dir: Path, data: list[Study], query: tuple[dict[str, str], bool]
) -> None:
    keys, fuzzy = query
    counter = [len(list(sqlite_dir.iterdir()))]
    for index in _fresh(sqlite_dir, counter):
        _store(index, data)
        # Each study answers with the patient its own instances named (PS3.4 C.6.2).
        expected = {s.StudyInstanceUID for s in data if reference(s, s.PatientName, keys, fuzzy)}
        statement = compile_query(
            Query(level=Level.STUDY, keys=keys, fuzzy=fuzzy, combined_datetime=False)
        )
        with index.reading() as conn:
            got = {row.StudyInstanceUID for row in conn.execute(statement)}
        assert got == expected, (keys, fuzzy)


def test_engine_on_both_databases(index: Index) -> None:
    """The same compiled SQL on SQLite and PostgreSQL: wildcards, escapes, case, ranges."""
    rows = [
        Study("1.2.1", "P1", "Müller^Jürgen", "20240101", "080000", "A1", ("CT", "SR")),
        Study("1.2.2", "P2", "a%b_c^D", "20240131", "120030", "a1", ("MR",)),
        Study("1.2.3", "P3", "Smith^John", "20240201", "235959", "B1", ("DX",)),
    ]
    _store(index, rows)
    cases: list[tuple[dict[str, str], bool, set[str]]] = [
        ({"PatientName": "M*"}, False, {"1.2.1"}),
        ({"PatientName": "m*"}, False, set()),
        ({"PatientName": "muller*"}, True, {"1.2.1"}),
        ({"PatientName": "MÜLLER^JÜRGEN"}, True, {"1.2.1"}),
        ({"PatientName": "a%b*"}, False, {"1.2.2"}),
        ({"PatientName": "a_b*"}, False, set()),
        ({"AccessionNumber": "A?"}, False, {"1.2.1"}),
        ({"StudyDate": "20240101-20240131"}, False, {"1.2.1", "1.2.2"}),
        ({"StudyDate": "-20240131", "StudyTime": "-12"}, False, {"1.2.1", "1.2.2"}),
        ({"ModalitiesInStudy": "SR"}, False, {"1.2.1"}),
        ({"ModalitiesInStudy": "CT\\MR"}, False, {"1.2.1", "1.2.2"}),
        ({"StudyInstanceUID": "1.2.1\\1.2.3"}, False, {"1.2.1", "1.2.3"}),
    ]
    for keys, fuzzy, expected in cases:
        statement = compile_query(Query(level=Level.STUDY, keys=keys, fuzzy=fuzzy))
        with index.reading() as conn:
            got = {row.StudyInstanceUID for row in conn.execute(statement)}
        assert got == expected, keys


def test_combined_date_time_range(index: Index) -> None:
    rows = [
        Study("1.2.1", "P1", "A^B", "20240101", "080000", "A1", ("CT",)),
        Study("1.2.2", "P1", "A^B", "20240102", "070000", "A2", ("CT",)),
        Study("1.2.3", "P1", "A^B", "20240102", "090000", "A3", ("CT",)),
    ]
    _store(index, rows)
    query = Query(
        level=Level.STUDY,
        keys={"StudyDate": "20240101-20240102", "StudyTime": "0900-0800"},
        combined_datetime=True,
    )
    with index.reading() as conn:
        got = {row.StudyInstanceUID for row in conn.execute(compile_query(query))}
    # 2024-01-01 09:00 to 2024-01-02 08:00: only the 07:00 study on the 2nd.
    assert got == {"1.2.2"}


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (Query(level=Level.SERIES, keys={"Modality": "CT"}), "StudyInstanceUID must be a single"),
        (
            Query(level=Level.IMAGE, keys={"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.*"}),
            "single",
        ),
        (Query(level=Level.STUDY, keys={"Modality": "CT"}), "below the STUDY level"),
        (Query(level=Level.STUDY, keys={"StudyInstanceUID": "1.2.abc"}), "not a UID"),
        (Query(level=Level.STUDY, keys={"NumberOfStudyRelatedInstances": "many"}), "not a number"),
        (Query(level=Level.STUDY, keys={"StudyDate": "2024*"}), "wildcards are not allowed"),
        (Query(level=Level.STUDY, keys={"StudyTime": "12?000"}), "wildcards are not allowed"),
        (
            Query(level=Level.STUDY, model=Model.PATIENT_ROOT, keys={"StudyDate": ""}),
            "PatientID must be a single",
        ),
    ],
)
def test_invalid_queries(query: Query, reason: str) -> None:
    with pytest.raises(InvalidQuery, match=reason):
        compile_query(query)


def test_patient_level_needs_patient_root() -> None:
    with pytest.raises(InvalidQuery, match="not part of"):
        Query(level=Level.PATIENT, model=Model.STUDY_ROOT)
