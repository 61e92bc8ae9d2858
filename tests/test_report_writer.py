"""Reports written from compiled pieces are byte for byte the reports highdicom builds."""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)
from pydicom.valuerep import DS

from inference.fragments import (
    Hole,
    Nest,
    Splice,
    assemble,
    compile_dataset,
    encode_element,
    encode_value,
    placeholder_key,
)
from inference.geometry import Box, Placement
from inference.heatmap import heatmaps, parametric_map
from inference.readings import Reading, View, breast_readings, fundus_reading
from inference.report import Finding, build_report, findings
from inference.report_writer import ReportWriter
from models.manifest import Manifest
from models.zoo import CHEST_XRAY as CXR_TASK
from scripts.synthetic_corpus import Patient, Rng, chest_dx, fundus_op, mammography
from tests.support import dciodvfy
from tests.support.zoo import ZOO

CXR, FUNDUS, MAMMOGRAPHY = ZOO
DEVICE = "2.25.4242"
TIMES = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
)


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _same_clock(reference: Dataset, written: Dataset) -> None:
    """The two were made at different moments; give the reference the other's times."""
    for keyword in TIMES:
        if keyword in written:
            setattr(reference, keyword, written[keyword].value)
    for ours, theirs in zip(
        reference.get("ContributingEquipmentSequence", []),
        written.get("ContributingEquipmentSequence", []),
        strict=True,
    ):
        if "ContributionDateTime" in theirs:
            ours.ContributionDateTime = theirs.ContributionDateTime


def _check_identical(
    writer: ReportWriter,
    sources: Sequence[Dataset],
    outputs: dict[str, np.ndarray] | list[Finding],
    job: str,
    *,
    readings: Sequence[Reading] = (),
    evidence: Sequence[Dataset] = (),
) -> bytes:
    written = writer.write(sources, outputs, job=job, readings=readings, evidence=evidence)
    parsed = pydicom.dcmread(io.BytesIO(written.data), force=True)
    reference = build_report(
        writer.constant.manifest,
        sources,
        outputs,
        job=job,
        device_uid=DEVICE,
        readings=readings,
        evidence=evidence,
    )
    _same_clock(reference, parsed)
    assert written.SOPInstanceUID == reference.SOPInstanceUID
    assert written.SOPClassUID == reference.SOPClassUID
    assert written.data == _encoded(reference)
    return written.data


PATIENT = Patient("W1", "Writer^Wanda", "ISO_IR 192", "19700101", "F")


def _chest(sop_class: str = DigitalXRayImageStorageForPresentation) -> Dataset:
    frontal, _ = chest_dx(Rng(3), PATIENT, 0.05, "20260101", "W1")
    frontal.SOPClassUID = sop_class
    return frontal


def _cxr_outputs(probabilities: Sequence[float], peaks: Sequence[int]) -> dict[str, np.ndarray]:
    maps = np.zeros((18, 7, 7), np.float32)
    for label, cell in enumerate(peaks):
        maps[label].flat[cell] = 1.0
    return {"probabilities": np.asarray(probabilities, np.float32), "activation_maps": maps}


_probability = st.floats(0.0, 1.0, width=32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    probabilities=st.lists(_probability, min_size=18, max_size=18),
    peaks=st.lists(st.integers(0, 48), min_size=18, max_size=18),
    computed_radiography=st.booleans(),
)
def test_chest_xray_reports_are_identical(
    probabilities: list[float], peaks: list[int], computed_radiography: bool
) -> None:
    sop_class = (
        ComputedRadiographyImageStorage
        if computed_radiography
        else DigitalXRayImageStorageForPresentation
    )
    writer = _writer(CXR)
    _check_identical(writer, [_chest(sop_class)], _cxr_outputs(probabilities, peaks), "cxr-job")


def test_a_report_lists_its_heatmaps_as_evidence(tmp_path: Path) -> None:
    """The Parametric Maps of a job are in the report's Current Requested Procedure
    Evidence (PS3.3 C.17.2.3), in their own series; written and built alike, and
    dciodvfy finds no error."""
    source = _chest()
    outputs = _cxr_outputs(np.linspace(0, 1, 18).tolist(), list(range(18)))
    manifest = _writer(CXR).constant.manifest
    rows, columns = int(source.Rows), int(source.Columns)
    placement = Placement.of_header(rows, columns, CXR.preprocessing)
    made = [
        parametric_map(manifest, source, h, job="maps", instance_number=n, device_uid=DEVICE)
        for n, h in enumerate(
            heatmaps(manifest, outputs, findings(manifest, outputs), placement), 1
        )
    ]
    assert len(made) == CXR_TASK.parametric_maps
    data = _check_identical(_writer(CXR), [source], outputs, "maps", evidence=made)
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    series = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for s in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    }
    assert series[source.SeriesInstanceUID] == {source.SOPInstanceUID}
    assert series[made[0].SeriesInstanceUID] == {pm.SOPInstanceUID for pm in made}
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools not installed")
    found = dciodvfy.errors(ds, tmp_path / "sr.dcm")
    assert found == [], "\n".join(found)


def test_no_finding_and_every_finding() -> None:
    """No call in the summary (highdicom leaves the calls out) and all eighteen."""
    writer = _writer(CXR)
    for value in (0.0, 1.0):
        outputs = _cxr_outputs([value] * 18, list(range(18)))
        _check_identical(writer, [_chest()], outputs, f"edge-{value}")


@settings(max_examples=15, deadline=None)
@given(
    grades=st.lists(_probability, min_size=5, max_size=5),
    referable=_probability,
)
def test_fundus_reports_are_identical(grades: list[float], referable: float) -> None:
    left, _right = fundus_op(Rng(5), PATIENT, 0.05, "20260102", "W2")
    outputs = {
        "grade_probabilities": np.asarray(grades, np.float32),
        "referable": np.asarray([referable], np.float32),
    }
    box = Box(3.5, 4.25, 60.0, 61.5)
    reading = fundus_reading(_writer(FUNDUS).constant.manifest, outputs, left, box)
    _check_identical(_writer(FUNDUS), [left], outputs, "fundus-job", readings=[reading])


@settings(max_examples=15, deadline=None)
@given(values=st.lists(_probability, min_size=7, max_size=7))
def test_exam_level_mammography_reports_are_identical(values: list[float]) -> None:
    """Four sources and findings given already aggregated, as the worker gives them."""
    views = mammography(Rng(6), PATIENT, 0.03, "20260103", "W3")
    threshold = MAMMOGRAPHY.operating_points[0].threshold
    found = [
        Finding("malignancy", f"malignancy {side}", v, threshold)
        for side, v in zip(("L", "R", "exam"), values[:3], strict=True)
    ]
    found += [
        Finding("density", f"density {label}", v, None)
        for label, v in zip(MAMMOGRAPHY.outputs[1].labels, values[3:], strict=True)
    ]
    per_view = [
        View(
            f"{ds.ImageLaterality}-{ds.ViewPosition}",
            ds,
            {"malignancy": np.asarray(values[:1]), "density": np.asarray(values[3:])},
            Box(1, 2, 30, 20) if ds.ViewPosition == "CC" else None,
        )
        for ds in views
    ]
    manifest = _writer(MAMMOGRAPHY).constant.manifest
    readings = breast_readings(manifest, per_view, {"L": values[0], "R": values[1]})
    _check_identical(_writer(MAMMOGRAPHY), views, found, "mammo-job", readings=readings)


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
    ],
)
def test_the_patient_name_keeps_the_character_set_of_its_source(
    charset: str | list[str], name: str
) -> None:
    source = _chest()
    source.SpecificCharacterSet = charset
    source.PatientName = name
    writer = _writer(CXR)
    data = _check_identical(writer, [source], _cxr_outputs([0.7] * 18, [3] * 18), "charset")
    assert pydicom.dcmread(io.BytesIO(data), force=True).PatientName == name


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_labels_beyond_ascii_are_encoded_as_the_document_declares(charset: str) -> None:
    """A manifest of one's own may name findings in any language; its pieces are kept per
    character set."""
    outputs = [o.model_copy(update={"labels": ["Épanchement", *o.labels[1:]]}) for o in CXR.outputs]
    manifest = CXR.model_copy(update={"name": f"cxr-fr-{charset[-3:]}", "outputs": outputs})
    source = _chest()
    source.SpecificCharacterSet = charset
    writer = ReportWriter(manifest, DEVICE)
    data = _check_identical(writer, [source], _cxr_outputs([0.9] * 18, [5] * 18), "fr")
    assert "Épanchement".encode("latin-1" if charset == "ISO_IR 100" else "utf-8") in data


def test_a_source_that_is_no_image_is_refused_as_highdicom_refuses_it() -> None:
    not_an_image = _chest()
    not_an_image.Modality = "SR"
    with pytest.raises(ValueError, match="Modality"):
        _writer(CXR).write([not_an_image], _cxr_outputs([0.5] * 18, [0] * 18), job="sr")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors_in_a_written_report(tmp_path: Path) -> None:
    written = _writer(CXR).write(
        [_chest()], _cxr_outputs(np.linspace(0, 1, 18).tolist(), [10] * 18), job="v"
    )
    ds = pydicom.dcmread(io.BytesIO(written.data), force=True)
    found = dciodvfy.errors(ds, tmp_path / "sr.dcm")
    assert found == [], "\n".join(found)


_WRITERS: dict[str, ReportWriter] = {}


def _writer(manifest: Manifest) -> ReportWriter:
    """One writer per model for the whole module, as a worker keeps one."""
    if manifest.name not in _WRITERS:
        _WRITERS[manifest.name] = ReportWriter(manifest, DEVICE)
    return _WRITERS[manifest.name]


# The fragments on their own.


@pytest.mark.parametrize(
    ("VR", "value"),
    [
        ("UI", "1.2.3"),  # odd: padded with a NUL
        ("UI", "1.2.34"),
        ("DS", DS(0.271828, auto_format=True)),
        ("DS", DS(1e-07, auto_format=True)),  # odd
        ("DS", DS(1.0, auto_format=True)),
        ("FD", 0.1),
        ("FL", [1.5, 2.25, -3.0]),
    ],
)
def test_a_filled_hole_is_what_pydicom_writes(VR: str, value: object) -> None:
    tag = {"UI": 0x00081155, "DS": 0x0040A30A, "FD": 0x0040A161, "FL": 0x00700022}[VR]
    assert encode_value(tag, VR, value) == encode_element(DataElement(tag, VR, value))


def _tree() -> Dataset:
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    inner.ReferencedSOPInstanceUID = "9.9.9"
    marker = Dataset()
    marker.CodeValue = "MARK"
    outer = Dataset()
    outer.ReferencedSOPSequence = [inner, marker]
    ds = Dataset()
    ds.PatientID = "P1"
    ds.ReferencedSeriesSequence = [outer]
    ds.StudyID = "S"
    return ds


def test_holes_and_splices_are_found_and_lengths_follow_what_fills_them() -> None:
    marker = _tree().ReferencedSeriesSequence[0].ReferencedSOPSequence[1]
    pieces = compile_dataset(
        _tree(),
        {placeholder_key("UI", "9.9.9"): "instance"},
        [(lambda item: item == marker, "extra")],
    )
    (series,) = [p for p in pieces if isinstance(p, Nest)]  # open above the hole
    assert [p for p in pieces if isinstance(p, bytes)]  # and the rest literal
    inner_item = series.items[0]
    assert isinstance(inner_item, tuple)
    nest = inner_item[0]
    assert isinstance(nest, Nest)
    assert isinstance(nest.items[1], Splice)
    first = nest.items[0]
    assert isinstance(first, tuple)
    assert any(isinstance(p, Hole) for p in first)
    extra = Dataset()
    extra.ReferencedSOPInstanceUID = "7.7"
    extra_body = _encoded(extra)
    for instance, spliced in (("1.22.333", []), ("4.5", [extra_body, extra_body])):
        data = assemble(pieces, {"instance": instance}, {"extra": spliced})
        expected = _tree()
        references = expected.ReferencedSeriesSequence[0].ReferencedSOPSequence
        references[0].ReferencedSOPInstanceUID = instance
        del references[1]
        for _ in spliced:
            references.append(extra)
        assert data == _encoded(expected)
        back = pydicom.dcmread(io.BytesIO(data), force=True)
        assert back.StudyID == "S"  # lengths right: what follows the sequence is intact
