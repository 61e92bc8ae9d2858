"""The AI result as a TID 1500 SR: content, references, stable UIDs, and dciodvfy's verdict."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from inference.report import build_report, derived_uid, findings
from models.codes import concept
from pacs.archive import Archive, InstanceSource, Origin
from pacs.index import IndexAction
from scripts.synthetic_corpus import Patient, Rng, chest_dx
from tests.support.zoo import ZOO

PATIENT = Patient("SR1", "Report^Ed", "ISO_IR 192", "19700101", "O")
CXR = ZOO[0]


def _source() -> Dataset:
    frontal, _ = chest_dx(Rng(7), PATIENT, 0.05, "20260101", "R1")
    return frontal


PEAKS = [(i % 7, (3 * i) % 7) for i in range(18)]  # the hottest cell of each label's map


def _outputs() -> dict[str, np.ndarray]:
    maps = np.full((18, 7, 7), 0.1, np.float32)
    for label, (row, column) in enumerate(PEAKS):
        maps[label, row, column] = 0.9
    return {
        "probabilities": np.linspace(0.05, 0.95, 18).astype(np.float32),
        "activation_maps": maps,
    }


def _items(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _numbers(ds: Dataset) -> list[float]:
    return [
        float(i.MeasuredValueSequence[0].NumericValue) for i in _items(ds) if i.ValueType == "NUM"
    ]


def _label(group: Dataset) -> str:
    """A finding group's label: its Tracking Identifier."""
    return next(
        str(i.TextValue)
        for i in group.ContentSequence
        if i.ValueType == "TEXT"
        and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
    )


def _groups(sr: Dataset) -> tuple[list[Dataset], Dataset]:
    """The finding groups, in the order written, and the exam summary."""
    groups = [
        i for i in _items(sr) if i.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]
    (summary,) = [g for g in groups if _label(g).startswith("AI exam")]
    return [g for g in groups if g is not summary], summary


def test_report_content_and_references() -> None:
    source = _source()
    sr = build_report(CXR, [source], _outputs(), job="job-1", device_uid=derived_uid("dev"))
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == source.PatientID
    items = _items(sr)
    groups, summary = _groups(sr)
    assert len(groups) == 18  # a group per finding, and the exam summary
    called = [
        i.ConceptNameCodeSequence[0].CodeMeaning
        for i in summary.ContentSequence
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Present"
    ]
    positive = [f.label for f in findings(CXR, _outputs()) if f.positive]
    assert called == [concept(label).meaning for label in positive]
    assert sr.SeriesDescription.endswith("NOT FOR CLINICAL USE")
    calls = {
        _label(group): i.ConceptCodeSequence[0].CodeMeaning
        for group in groups
        for i in group.ContentSequence
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")
    }
    expected = {f.label: "Present" if f.positive else "Absent" for f in findings(CXR, _outputs())}
    assert calls == expected
    numbers = {_label(g): n for g in groups for n in _numbers(g)}
    probabilities = dict(zip(CXR.outputs[0].labels, _outputs()["probabilities"], strict=True))
    assert numbers == pytest.approx(probabilities, abs=1e-5)
    texts = [str(i.get("TextValue", "")) for i in items]
    assert f"weights sha256 {CXR.weights.sha256}" in texts
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_positive_findings_carry_the_image_region_of_their_peak() -> None:
    source = _source()  # 125 x 102: centre crop to rows 11..113, scaled by 102/224
    sr = build_report(CXR, [source], _outputs(), job="job-4", device_uid="1.2.3")
    groups, _ = _groups(sr)
    cell = 32 * 102 / 224
    by_label = {f.label: f for f in findings(CXR, _outputs())}
    drawn = [any(i.ValueType == "SCOORD" for i in g.ContentSequence) for g in groups]
    assert drawn == sorted(drawn, reverse=True)  # viewers open a report at its first group
    assert drawn[0]
    # Labels 0 and 7 (and 1 and 8...) peak in the same cell: the more probable one is
    # drawn there, the other in a cell of its own, so that no two overlap.
    owners: dict[tuple[int, int], str] = {}
    for f in sorted(by_label.values(), key=lambda f: -f.probability):
        if f.positive:
            owners.setdefault(PEAKS[CXR.outputs[0].labels.index(f.label)], f.label)
    drawn_boxes = []
    for group in groups:
        finding = by_label[_label(group)]
        regions = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        if not finding.positive:
            assert regions == [], finding.label
            continue
        (region,) = regions
        assert region.GraphicType == "POLYLINE"
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
        assert (points[0] == points[-1]).all()  # closed
        drawn_boxes.append(tuple(points[0]))
        peak = PEAKS[CXR.outputs[0].labels.index(finding.label)]
        if owners[peak] != finding.label:
            continue
        row, column = peak
        assert points[0] == pytest.approx([column * cell, 11 + row * cell], abs=1e-3)
        assert points[2] == pytest.approx([(column + 1) * cell, 11 + (row + 1) * cell], abs=1e-3)
    assert (
        len(set(drawn_boxes))
        == len(drawn_boxes)
        == sum(bool(f.positive) for f in by_label.values())
    )


def test_uids_are_stable_per_job() -> None:
    source = _source()
    one = build_report(CXR, [source], _outputs(), job="job-1", device_uid="1.2.3")
    again = build_report(CXR, [source], _outputs(), job="job-1", device_uid="1.2.3")
    other = build_report(CXR, [source], _outputs(), job="job-2", device_uid="1.2.3")
    assert one.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert one.SeriesInstanceUID == other.SeriesInstanceUID


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_rerun_replaces_the_report_in_the_archive(archive: Archive) -> None:
    source = _source()
    first = build_report(CXR, [source], _outputs(), job="job-9", device_uid="1.2.3")
    stored = archive.ingest(
        InstanceSource.from_part10(io.BytesIO(_part10(first))), Origin.INFERENCE
    )
    assert stored.action == IndexAction.STORED
    changed = {**_outputs(), "probabilities": _outputs()["probabilities"][::-1].copy()}
    second = build_report(CXR, [source], changed, job="job-9", device_uid="1.2.3")
    replaced = archive.ingest(
        InstanceSource.from_part10(io.BytesIO(_part10(second))),
        Origin.INFERENCE,
        duplicate_policy="overwrite",
    )
    assert replaced.action == IndexAction.OVERWRITTEN
    assert len(archive.index.instances()) == 1
    with archive.open(replaced.record) as stream:
        back = pydicom.dcmread(stream)
    assert _numbers(back)[0] == pytest.approx(0.95, abs=1e-5)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors(tmp_path: Path) -> None:
    sr = build_report(CXR, [_source()], _outputs(), job="job-3", device_uid="1.2.3")
    path = tmp_path / "sr.dcm"
    path.write_bytes(_part10(sr))
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).splitlines()
    errors = [line for line in output if line.startswith("Error")]
    assert errors == [], "\n".join(errors)


@pytest.mark.parametrize(("probability", "code"), [(0.9, "408574004"), (0.1, "408573005")])
def test_the_chest_exam_is_called_abnormal_when_any_finding_is_positive(
    probability: float, code: str
) -> None:
    """The exam-level call in SCT (CID 3209): Imaging result abnormal or normal."""
    outputs = _outputs()
    outputs["probabilities"] = np.full(18, probability, np.float32)
    sr = build_report(CXR, [_source()], outputs, job="job-exam", device_uid="1.2.3")
    _, summary = _groups(sr)
    calls = {
        i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0].CodeValue
        for i in summary.ContentSequence
        if i.ValueType == "CODE"
    }
    assert calls["121071"] == code  # DCM Finding


def test_imaging_measurements_hold_only_what_a_viewer_can_draw() -> None:
    """TID 1500: groups with an image region (TID 1410) in Imaging Measurements (126010,
    DCM), the findings without one whole in Qualitative Evaluations (C0034375, UMLS).
    A viewer that draws every group of Imaging Measurements (OHIF 3.13 stops at the first
    it cannot) finds nothing it cannot draw; the exam summary is drawn on the whole image,
    its reading in words as its tracking identifier."""
    source = _source()
    sr = build_report(CXR, [source], _outputs(), job="job-tid", device_uid="1.2.3")
    containers = {
        i.ConceptNameCodeSequence[0].CodeValue: i
        for i in sr.ContentSequence
        if i.ValueType == "CONTAINER"
    }
    assert set(containers) == {"126010", "C0034375"}
    drawn = containers["126010"].ContentSequence
    listed = containers["C0034375"].ContentSequence
    assert all(any(i.ValueType == "SCOORD" for i in g.ContentSequence) for g in drawn)
    assert not any(i.ValueType == "SCOORD" for g in listed for i in g.ContentSequence)
    positive = {f.label for f in findings(CXR, _outputs()) if f.positive}
    assert {_label(g) for g in drawn[:-1]} == positive
    assert {_label(g) for g in listed} == set(CXR.outputs[0].labels) - positive
    summary = drawn[-1]
    assert _label(summary).startswith("AI exam: ")
    assert len(_label(summary)) <= 64
    (region,) = [i for i in summary.ContentSequence if i.ValueType == "SCOORD"]
    points = np.asarray(region.GraphicData, dtype=np.float64).reshape(-1, 2)
    assert points.min(axis=0).tolist() == [0, 0]
    assert points.max(axis=0).tolist() == [source.Columns, source.Rows]


@pytest.mark.parametrize(
    ("probability", "words"),
    [(0.1, "AI exam: Normal"), (0.99, "AI exam: Abnormal, Atelectasis, Consolidation, ")],
)
def test_the_summary_says_the_exam_reading_in_words(probability: float, words: str) -> None:
    outputs = _outputs()
    outputs["probabilities"] = np.full(18, probability, np.float32)
    sr = build_report(CXR, [_source()], outputs, job="job-words", device_uid="1.2.3")
    _, summary = _groups(sr)
    assert _label(summary).startswith(words)
    assert len(_label(summary)) <= 64
