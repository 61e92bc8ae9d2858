"""Index behaviour on SQLite and on a real PostgreSQL server (same code, same tests)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy import select

from pacs.errors import DuplicateRejected, InvalidInstance
from pacs.header import (
    InstanceAttributes,
    InstanceHeader,
    PatientAttributes,
    SeriesAttributes,
    StudyAttributes,
)
from pacs.index import BlobFacts, Index, IndexAction, count_rows, instance, patient, series, study


def header(
    study_uid: str, series_uid: str, sop: str, modality: str = "CT", pid: str = "P1"
) -> InstanceHeader:
    return InstanceHeader(
        patient=PatientAttributes(pid, "", "Müller^Jürgen", "19700101", "M"),
        study=StudyAttributes(study_uid, "20260101", "101010", "ACC", "1", "desc", "Ref^Rita", ""),
        series=SeriesAttributes(series_uid, modality, 1, "", "CHEST", "", "", "", "", ""),
        instance=InstanceAttributes(
            "1.2.840.10008.5.1.4.1.1.2",
            sop,
            1,
            512,
            512,
            16,
            None,
            "",
            "",
            "ORIGINAL\\PRIMARY",
            "",
            "",
            "",
            "MONOCHROME2",
            "ISO_IR 192",
        ),
    )


def facts(sha: str = "a" * 64, path: str = "x.dcm") -> BlobFacts:
    return BlobFacts("1.2.840.10008.1.2.1", 1234, sha, path, "dimse", "MODALITY")


def _counts(index: Index, study_uid: str) -> tuple[int, int, str]:
    with index.reading() as conn:
        row = conn.execute(
            select(
                study.c.NumberOfStudyRelatedSeries,
                study.c.NumberOfStudyRelatedInstances,
                study.c.ModalitiesInStudy,
            ).where(study.c.StudyInstanceUID == study_uid)
        ).one()
        return row[0], row[1], row[2]


def test_add_counts_and_derived_attributes(index: Index) -> None:
    index.add(header("1.1", "1.1.1", "1.1.1.1"), facts(path="a"), "reject")
    index.add(header("1.1", "1.1.1", "1.1.1.2"), facts(path="b"), "reject")
    index.add(header("1.1", "1.1.2", "1.1.2.1", modality="SR"), facts(path="c"), "reject")
    index.add(header("1.1", "1.1.3", "1.1.3.1", modality="CT"), facts(path="d"), "reject")
    assert _counts(index, "1.1") == (3, 4, "CT\\SR")
    with index.reading() as conn:
        p = conn.execute(select(patient)).mappings().one()
        assert p["PatientNameSearch"] == "muller jurgen"
        assert (
            p["NumberOfPatientRelatedStudies"],
            p["NumberOfPatientRelatedSeries"],
            p["NumberOfPatientRelatedInstances"],
        ) == (1, 3, 4)
        s = (
            conn.execute(select(series).where(series.c.SeriesInstanceUID == "1.1.1"))
            .mappings()
            .one()
        )
        assert s["NumberOfSeriesRelatedInstances"] == 2


def test_duplicates_follow_the_policy(index: Index) -> None:
    first = index.add(header("1.1", "1.1.1", "1.1.1.1"), facts("a" * 64, "a"), "reject")
    assert first.action == IndexAction.STORED
    again = index.add(header("1.1", "1.1.1", "1.1.1.1"), facts("a" * 64, "a"), "reject")
    assert again.action == IndexAction.DUPLICATE
    with pytest.raises(DuplicateRejected):
        index.add(header("1.1", "1.1.1", "1.1.1.1"), facts("b" * 64, "b"), "reject")
    over = index.add(header("1.1", "1.1.1", "1.1.1.1"), facts("b" * 64, "b"), "overwrite")
    assert over.action == IndexAction.OVERWRITTEN
    assert over.replaced is not None
    assert over.replaced.path == "a"
    assert over.record.sha256 == "b" * 64
    assert _counts(index, "1.1") == (1, 1, "CT")
    with index.reading() as conn:
        assert count_rows(conn, instance) == 1


def test_overwrite_can_move_an_instance_to_another_study(index: Index) -> None:
    index.add(header("1.1", "1.1.1", "1.1.1.1"), facts("a" * 64, "a"), "reject")
    index.add(header("1.2", "1.2.1", "1.1.1.1", pid="P2"), facts("b" * 64, "b"), "overwrite")
    with index.reading() as conn:
        assert count_rows(conn, study) == 1
        assert count_rows(conn, patient) == 1
        assert conn.execute(select(patient.c.PatientID)).scalar_one() == "P2"


def test_remove_drops_empty_parents(index: Index) -> None:
    index.add(header("1.1", "1.1.1", "1.1.1.1"), facts(path="a"), "reject")
    index.add(header("1.1", "1.1.2", "1.1.2.1", modality="MR"), facts(path="b"), "reject")
    removed = index.remove("1.1.2.1")
    assert removed is not None
    assert removed.path == "b"
    assert _counts(index, "1.1") == (1, 1, "CT")
    assert index.remove("1.1.2.1") is None
    index.remove("1.1.1.1")
    with index.reading() as conn:
        assert [count_rows(conn, t) for t in (patient, study, series, instance)] == [0, 0, 0, 0]


def test_series_cannot_change_study(index: Index) -> None:
    index.add(header("1.1", "1.1.1", "1.1.1.1"), facts(path="a"), "reject")
    with pytest.raises(InvalidInstance, match="another study"):
        index.add(header("1.2", "1.1.1", "1.1.1.2"), facts(path="b"), "reject")
    with index.reading() as conn:
        assert count_rows(conn, instance) == 1
        assert count_rows(conn, study) == 1


def test_concurrent_writers_keep_counts_exact(index: Index) -> None:
    """Eight threads storing into the same two studies: no lost update, no duplicate row."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(15):
                s = f"1.{n % 2}"
                h = header(s, f"{s}.{i % 3}", f"9.{n}.{i}")
                index.add(h, facts(path=f"{n}-{i}"), "reject")
                # Every thread also re-sends one shared instance.
                index.add(
                    replace(h, instance=replace(h.instance, SOPInstanceUID="9.9")),
                    facts(path="shared"),
                    "reject",
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with index.reading() as conn:
        assert count_rows(conn, instance) == 8 * 15 + 1
        total = sum(conn.execute(select(study.c.NumberOfStudyRelatedInstances)).scalars())
        assert total == 8 * 15 + 1
        per_series = sum(conn.execute(select(series.c.NumberOfSeriesRelatedInstances)).scalars())
        assert per_series == 8 * 15 + 1
        assert count_rows(conn, series) == 6
