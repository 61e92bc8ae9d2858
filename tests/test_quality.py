"""The quality gate: an image its model cannot read is not assessable, with the reason.

Each kind of failure is made from a good synthetic image (darkened, blurred, burnt out,
flattened, its fundus field shrunk), the way a real acquisition goes wrong, and goes
through the same preprocessing as screening.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.preprocess import preprocess
from inference.quality import NotAssessable, field_of_view
from models.manifest import Quality
from models.zoo import CHEST_XRAY, FUNDUS, MAMMOGRAPHY, Task
from pacs.archive import Archive, Origin
from pacs.jobs import JobState
from pacs.pixels import read_image
from scripts.synthetic_corpus import Patient, Rng, chest_dx, fundus_op, mammography
from tests.support import dciodvfy
from tests.support.instances import source
from tests.support.pipeline import drain, pipeline

PATIENT = Patient("QG", "Quality^Gate", "ISO_IR 192", "19700101", "F")
Make = Callable[[Rng, Patient, float, str, str], list[Dataset]]
TASKS: list[tuple[Task, Make]] = [
    (CHEST_XRAY, chest_dx),
    (FUNDUS, fundus_op),
    (MAMMOGRAPHY, mammography),
]


def _pixels(ds: Dataset) -> np.ndarray:
    if ds.SamplesPerPixel == 3:
        return np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 3).copy()
    return np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns).copy()


def _with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    top = 255 if ds.SamplesPerPixel == 3 else 2 ** int(ds.BitsStored) - 1
    ds.PixelData = np.clip(pixels, 0, top).astype(_pixels(ds).dtype).tobytes()
    ds.Rows, ds.Columns = pixels.shape[:2]
    return ds


def _blurred(pixels: np.ndarray, fraction: float) -> np.ndarray:
    """A Gaussian blur of ``fraction`` of the width: a moving patient, a lens out of focus."""
    sigma = pixels.shape[1] * fraction
    radius = int(3 * sigma)
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    out = pixels.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)])
        padded = np.moveaxis(padded, axis, -1)
        windows = np.lib.stride_tricks.sliding_window_view(padded, taps.size, axis=-1)
        out = np.moveaxis(windows @ taps, -1, axis)
    return out


def _gate(ds: Dataset, task: Task) -> np.ndarray:
    stream = io.BytesIO()
    ds.save_as(stream, enforce_file_format=True)
    stream.seek(0)
    return preprocess(stream, task.preprocessing, read_image(stream), task.quality)


@pytest.mark.parametrize("scale", [0.03, 0.1, 0.25])
@pytest.mark.parametrize(("task", "make"), TASKS, ids=[t.task for t, _ in TASKS])
def test_good_images_pass_at_every_size(task: Task, make: Make, scale: float) -> None:
    for ds in make(Rng(3), PATIENT, scale, "20260101", "G"):
        if ds.get("ViewPosition") == "LL":
            continue
        assert _gate(ds, task).shape[1:] == tuple(task.preprocessing.size)


def test_every_zoo_task_has_a_gate() -> None:
    assert all(isinstance(task.quality, Quality) for task, _ in TASKS)


def _fundus() -> Dataset:
    return fundus_op(Rng(4), PATIENT, 0.3, "20260101", "F")[0]


def _chest() -> Dataset:
    return chest_dx(Rng(5), PATIENT, 0.2, "20260101", "C")[0]


def _small_field(ds: Dataset) -> Dataset:
    """The photograph's field in the middle of a frame twice its size (a small pupil)."""
    pixels = _pixels(ds)
    rows, columns = pixels.shape[:2]
    canvas = np.zeros((rows * 2, columns * 2, 3), np.uint8)
    canvas[rows // 2 : rows // 2 + rows, columns // 2 : columns // 2 + columns] = pixels
    return _with_pixels(ds, canvas)


CASES: list[tuple[str, Task, Callable[[], Dataset], str]] = [
    (
        "dark fundus",
        FUNDUS,
        lambda: _with_pixels(d := _fundus(), _pixels(d) * 0.3),
        "too dark: mean brightness",
    ),
    (
        "blurred fundus",
        FUNDUS,
        lambda: _with_pixels(d := _fundus(), _blurred(_pixels(d), 0.03)),
        "blurred: variance of the Laplacian",
    ),
    (
        "small field",
        FUNDUS,
        lambda: _small_field(_fundus()),
        "field of view too small: field of view 46% (at least 60%)",
    ),
    (
        "burnt-out chest",
        CHEST_XRAY,
        lambda: _with_pixels(d := _chest(), _pixels(d) * 3.0),
        "overexposed:",
    ),
    (
        "blurred chest",
        CHEST_XRAY,
        lambda: _with_pixels(d := _chest(), _blurred(_pixels(d), 0.03)),
        "blurred: variance of the Laplacian",
    ),
    (
        "flat mammogram",
        MAMMOGRAPHY,
        lambda: _with_pixels(
            d := mammography(Rng(6), PATIENT, 0.1, "20260101", "M")[0],
            _pixels(d) * 0.02 + 1200,
        ),
        "too little contrast: intensity standard deviation",
    ),
]


@pytest.mark.parametrize(("name", "task", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_image_is_not_assessable_with_what_was_measured(
    name: str, task: Task, make: Callable[[], Dataset], reason: str
) -> None:
    with pytest.raises(NotAssessable) as refused:
        _gate(make(), task)
    message = str(refused.value)
    assert message.startswith("not assessable: ")
    assert reason in message, message


def test_without_a_gate_the_same_image_is_preprocessed() -> None:
    """Manifests without thresholds (older ones, imported ones) screen as before."""
    dark = _with_pixels(d := _fundus(), _pixels(d) * 0.3)
    stream = io.BytesIO()
    dark.save_as(stream, enforce_file_format=True)
    stream.seek(0)
    assert preprocess(stream, FUNDUS.preprocessing).shape == (3, 512, 512)


def test_the_field_of_view_of_a_photograph() -> None:
    photo = _pixels(_fundus())
    assert 0.85 < field_of_view(photo, 255) < 1.0
    assert field_of_view(np.zeros((100, 80, 3), np.uint8), 255) == 0.0
    assert field_of_view(np.full((100, 80, 3), 200, np.uint8), 255) == 1.0


def _quality_group(sr: Dataset) -> Dataset:
    """The one TID 1501 group of a not-assessable report (under Imaging Measurements)."""
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    (group,) = measurements.ContentSequence
    assert isinstance(group, Dataset)
    return group


def _items(group: Dataset, value_type: str) -> list[Dataset]:
    return [item for item in group.ContentSequence if item.ValueType == value_type]


def test_the_report_of_an_image_not_assessable_says_so_in_standard_codes(tmp_path: Path) -> None:
    """TID 1501 with Image Quality (DCM 111101) = "Unusable - Quality renders image
    unusable" (DCM 111235), every measure as a number and the one outside its limit
    named, and no finding at all; dciodvfy finds no error in it."""
    dark = _with_pixels(d := _fundus(), _pixels(d) * 0.3)
    with pytest.raises(NotAssessable) as refused:
        _gate(dark, FUNDUS)
    exc = refused.value
    from inference.report import not_assessable_report  # noqa: PLC0415
    from tests.support.zoo import manifest_of  # noqa: PLC0415

    sr = not_assessable_report(
        manifest_of(FUNDUS),
        [dark],
        exc.measures.named(),
        [s.measure for s in exc.shortfalls],
        job="quality-1",
        device_uid="1.2.3",
    )
    group = _quality_group(sr)
    codes_said = {
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeValue)
        for item in _items(group, "CODE")
    }
    assert ("Image Quality", "111235") in codes_said
    assert ("mean brightness", "OUTSIDE-ITS-LIMI") in codes_said
    numbers = {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(
            item.MeasuredValueSequence[0].NumericValue
        )
        for item in _items(group, "NUM")
    }
    assert set(numbers) == {
        "mean brightness",
        "fraction at black",
        "fraction at white",
        "intensity standard deviation",
        "variance of the Laplacian",
        "field of view",
    }
    assert numbers["mean brightness"] == pytest.approx(exc.measures.brightness, rel=1e-5)
    assert numbers["mean brightness"] < 0.15
    called = {item.ConceptCodeSequence[0].CodeValue for item in _items(group, "CODE")}
    assert not called & {"52101004", "2667000"}  # SCT Present, Absent: nothing called
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools not installed")
    errors = dciodvfy.errors(sr, tmp_path / "sr.dcm")
    assert errors == [], "\n".join(errors)


@pytest.mark.slow
def test_a_photograph_too_dark_to_grade_gets_no_result_but_the_reason(
    archive: Archive, demo_models: Path
) -> None:
    """Through the scheduler and the worker, as ``filmless serve`` runs them: the exam's
    report reads the good eye, gradable, and says the dark one is ungradable with what
    was measured and no grade; the job (``filmless jobs list``) keeps the reason."""
    queue, worker = pipeline(archive, demo_models, name="gate")
    right, left = fundus_op(Rng(7), PATIENT, 0.1, "20260101", "Q")
    _with_pixels(left, _pixels(left) * 0.3)
    for ds in (right, left):
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    worker.close()
    (job,) = [j for j in queue.jobs() if j.model == FUNDUS.name]
    assert job.state == JobState.DONE, job.reason
    assert job.reason.startswith("left eye not assessable: too dark: mean brightness 0.1")
    stored = {r.SOPInstanceUID for r in archive.index.records(right.StudyInstanceUID)}
    assert stored == {right.SOPInstanceUID, left.SOPInstanceUID, job.result}
    (record,) = archive.index.records(right.StudyInstanceUID, SOPInstanceUID=job.result)
    with archive.open(record) as stream:
        sr = pydicom.dcmread(stream)
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for r in s.ReferencedSeriesSequence
        for i in r.ReferencedSOPSequence
    }
    assert referenced == {right.SOPInstanceUID, left.SOPInstanceUID}
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    groups = {
        str(_items(g, "TEXT")[0].TextValue).split(":")[0]: g for g in measurements.ContentSequence
    }

    def quality(group: Dataset) -> str:
        return next(
            str(i.ConceptCodeSequence[0].CodeValue)
            for i in _items(group, "CODE")
            if i.ConceptNameCodeSequence[0].CodeValue == "111101"
        )

    assert quality(groups["right eye"]) == "111237"  # "Usable - Meets the QC standard"
    assert quality(groups["left eye"]) == "111235"  # "Unusable - Quality renders ..."
    numbers = {
        str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in _items(groups["left eye"], "NUM")
    }
    assert "mean brightness" in numbers
    assert not any("probability" in n for n in numbers)  # no grade, nothing negative


@pytest.mark.slow
def test_a_mammogram_with_one_flat_view_is_not_assessable_naming_the_view(
    archive: Archive, demo_models: Path
) -> None:
    queue, worker = pipeline(archive, demo_models, name="gate")
    views = mammography(Rng(8), PATIENT, 0.05, "20260101", "QM")
    flat = views[0]
    _with_pixels(flat, _pixels(flat) * 0.02 + 1200)
    for ds in views:
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    worker.close()
    (job,) = [j for j in queue.jobs() if j.model == MAMMOGRAPHY.name]
    assert job.state == JobState.SKIPPED
    side_view = f"{flat.ImageLaterality}-{flat.ViewPosition}"
    assert job.reason.startswith(f"not assessable: the {side_view} view: too little contrast")
    assert job.result
