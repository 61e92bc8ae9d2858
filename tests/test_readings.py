"""Results per eye and per breast, drawn on the image they are about, in standard codes.

Through the scheduler and the worker, as ``filmless serve`` screens: a fundus report
outlines the retina in the photographed eye's field of view and says its ICDR grade,
referable call and gradability; a mammography report outlines each breast on its CC view
with its suspicion score, assessment category (SCT, CID 6026) and density (SCT, CID
6000), draws the region of each view the model calls suspicious, and the exam takes the
highest category. dciodvfy finds no error in either report.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.geometry import Box, Placement, to_image
from inference.readings import View, breast_readings, exam_category, suspicious_regions
from models.codes import DENSITY, NEGATIVE, RECALL
from models.zoo import MAMMOGRAPHY
from pacs.archive import Archive, Origin
from pacs.jobs import Job, JobState
from scripts.synthetic_corpus import Patient, Rng, fundus_op, mammography
from tests.support import dciodvfy
from tests.support.instances import source
from tests.support.pipeline import drain, pipeline
from tests.support.zoo import manifest_of

PATIENT = Patient("RD", "Reading^Side", "ISO_IR 192", "19700101", "F")
LEFT, RIGHT = "7771000", "24028007"  # SCT laterality, CID 244
EYE = "81745001"
BREASTS = {"80248007": "L", "73056007": "R"}  # SCT left breast, right breast (CID 6022)


def _walk(items: object) -> Iterator[Dataset]:
    for item in items or []:  # type: ignore[attr-defined]
        yield item
        yield from _walk(item.get("ContentSequence"))


def _groups(sr: Dataset) -> list[Dataset]:
    return [
        item
        for item in _walk(sr.ContentSequence)
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"
    ]


def _summary(sr: Dataset) -> Dataset:
    """The exam-level group: its tracking identifier says the reading in words."""
    (summary,) = [g for g in _groups(sr) if _text(g, "Tracking Identifier").startswith("AI exam: ")]
    return summary


def _text(group: Dataset, name: str) -> str:
    return next(
        str(i.TextValue)
        for i in group.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == name
    )


def _coded(group: Dataset) -> dict[str, tuple[str, str]]:
    """Each CODE item: concept name meaning -> (code value, code meaning)."""
    return {
        i.ConceptNameCodeSequence[0].CodeMeaning: (
            i.ConceptCodeSequence[0].CodeValue,
            i.ConceptCodeSequence[0].CodeMeaning,
        )
        for i in group.ContentSequence
        if i.ValueType == "CODE"
    }


def _site(group: Dataset) -> tuple[str, str | None]:
    """The finding site (SCT 363698007) and its laterality modifier."""
    site = next(
        i
        for i in group.ContentSequence
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "363698007"
    )
    modifiers = [
        m.ConceptCodeSequence[0].CodeValue
        for m in site.get("ContentSequence", [])
        if m.ConceptNameCodeSequence[0].CodeValue == "272741003"  # Laterality
    ]
    return site.ConceptCodeSequence[0].CodeValue, modifiers[0] if modifiers else None


def _region(group: Dataset) -> tuple[str, np.ndarray]:
    """The referenced image and the outline's (column, row) points."""
    (scoord,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
    image = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return str(image), np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2)


def _report(archive: Archive, study: str, uid: str) -> Dataset:
    (record,) = [r for r in archive.index.records(study) if r.SOPInstanceUID == uid]
    with archive.open(record) as stream:
        return pydicom.dcmread(stream)


def _bright_bounds(ds: Dataset) -> tuple[float, float, float, float]:
    """Top, left, bottom, right of the pixels brighter than the black surround."""
    pixels = ds.pixel_array.astype(np.float64)
    grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    bright = grey > 0.1 * grey.max()
    rows, columns = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    return int(rows[0]), int(columns[0]), int(rows[-1] + 1), int(columns[-1] + 1)


def _screened(archive: Archive, models: Path, datasets: list[Dataset]) -> list[Job]:
    """Store the images and run every job they make, as ``filmless serve`` would."""
    queue, worker = pipeline(archive, models)
    for ds in datasets:
        archive.ingest(source(ds), Origin.DIMSE)
    drain(worker)
    worker.close()
    return queue.jobs()


@pytest.mark.slow
def test_each_eye_is_read_on_its_own_photograph_and_the_exam_on_both(
    archive: Archive, demo_models: Path, tmp_path: Path
) -> None:
    """One report per exam: each eye drawn on its photograph with its grade, referable
    call and gradability, then the exam, referable when either eye is."""
    photographs = fundus_op(Rng(21), PATIENT, 0.1, "20260101", "F1")
    jobs = [j for j in _screened(archive, demo_models, photographs) if j.model.startswith("fundus")]
    (job,) = jobs
    assert job.state == JobState.DONE, job.reason
    sr = _report(archive, job.StudyInstanceUID, job.result)
    by_side = {str(ds.ImageLaterality): ds for ds in photographs}
    eyes = _groups(sr)[:2]  # viewers open a report at its first group: an eye
    calls = []
    for first, side in zip(eyes, ("R", "L"), strict=True):
        photograph = by_side[side]
        eye = {"L": "left", "R": "right"}[side]
        identifier = _text(first, "Tracking Identifier")
        assert identifier.startswith(f"{eye} eye: ICDR grade ")
        assert _site(first) == (EYE, {"L": LEFT, "R": RIGHT}[side])
        called = _coded(first)
        assert called["ICDR grade"][1].startswith(identifier.split("ICDR grade ")[1][0])
        assert called["referable DR"][1] in ("Present", "Absent")
        assert ("not referable" in identifier) == (called["referable DR"][1] == "Absent")
        calls.append(called["referable DR"][1])
        assert called["Image Quality"][0] == "111237"  # gradable
        image, points = _region(first)
        assert image == str(photograph.SOPInstanceUID)
        # The square inscribed in the circular field of view.
        top, left, bottom, right = _bright_bounds(photograph)
        centre = np.array([(left + right) / 2, (top + bottom) / 2])
        half = max(right - left, bottom - top) / 2 / np.sqrt(2)
        assert points.min(axis=0) == pytest.approx(centre - half, abs=3)
        assert points.max(axis=0) == pytest.approx(centre + half, abs=3)
    summary = _text(_summary(sr), "Tracking Identifier")
    expected = "Referable" if "Present" in calls else "Not referable"
    assert summary.startswith(f"AI exam: {expected}")
    if shutil.which("dciodvfy"):
        assert dciodvfy.errors(sr, tmp_path / "exam.dcm") == []


@pytest.mark.slow
def test_an_ungradable_eye_is_said_and_never_read_as_not_referable(
    archive: Archive, demo_models: Path, tmp_path: Path
) -> None:
    """The left photograph too dark to grade: the right eye is read, the left is
    "ungradable" with the measures on its photograph (DCM 111235), and the exam is not
    "not referable" (PS3.16 CID 7031 image quality)."""
    right, left = fundus_op(Rng(23), PATIENT, 0.1, "20260101", "F2")
    pixels = left.pixel_array.astype(np.float64) * 0.2
    left.PixelData = pixels.astype(np.uint8).tobytes()
    (job,) = [
        j for j in _screened(archive, demo_models, [right, left]) if j.model.startswith("fundus")
    ]
    assert job.state == JobState.DONE, job.reason
    sr = _report(archive, job.StudyInstanceUID, job.result)
    seen, unseen = _groups(sr)[:2]
    assert _text(seen, "Tracking Identifier").startswith("right eye: ICDR grade ")
    identifier = _text(unseen, "Tracking Identifier")
    assert identifier.startswith("left eye: ungradable: mean brightness")
    assert _coded(unseen)["Image Quality"][0] == "111235"
    assert "referable DR" not in _coded(unseen)
    image, _ = _region(unseen)
    assert image == str(left.SOPInstanceUID)
    summary = _summary(sr)
    words = _text(summary, "Tracking Identifier")
    referable = _coded(seen)["referable DR"][1] == "Present"
    assert words.startswith("AI exam: Referable" if referable else "AI exam: Ungradable left eye")
    assert _coded(summary)["Image Quality"][0] == "111235"
    if shutil.which("dciodvfy"):
        assert dciodvfy.errors(sr, tmp_path / "ungradable.dcm") == []


@pytest.mark.slow
def test_each_breast_is_read_on_its_cc_view_and_the_exam_takes_the_highest_category(
    archive: Archive, demo_models: Path, tmp_path: Path
) -> None:
    views = mammography(Rng(22), PATIENT, 0.05, "20260101", "M1")
    (job,) = [j for j in _screened(archive, demo_models, views) if j.model.startswith("mammo")]
    assert job.state == JobState.DONE, job.reason
    sr = _report(archive, job.StudyInstanceUID, job.result)
    groups = _groups(sr)
    cc = {str(ds.ImageLaterality): ds for ds in views if ds.ViewPosition == "CC"}
    categories = []
    for group in groups[:2]:  # the breasts come first, each drawn
        site, modifier = _site(group)
        side = BREASTS[site]
        assert modifier is None  # the breast's code says its side
        identifier = _text(group, "Tracking Identifier")
        assert identifier.startswith({"L": "left", "R": "right"}[side] + " breast: category ")
        called = _coded(group)
        category = called["Assessment Category"][0]
        assert category in (NEGATIVE.value, RECALL.value)
        categories.append(category)
        density = identifier.rsplit("density ", 1)[1]
        assert called["Breast composition"][0] == DENSITY[density].value
        image, points = _region(group)
        assert image == str(cc[side].SOPInstanceUID)
        top, left, bottom, right = _bright_bounds(cc[side])
        # The model reads a 1024 x 512 window of the image, from the chest wall (on the
        # right of a right breast, mirrored for the model): the breast as it saw it.
        rows, columns = int(cc[side].Rows), int(cc[side].Columns)
        window = to_image(
            Box(0, 0, *MAMMOGRAPHY.preprocessing.size),
            Placement(rows, columns, 0, 0, rows, columns, flipped=side == "R"),
            MAMMOGRAPHY.preprocessing,
        )
        assert window is not None
        top, left = max(top, window.top), max(left, window.left)
        bottom, right = min(bottom, window.bottom), min(right, window.right)
        # Within a few pixels: the tip of the breast is a sliver that resizing dims.
        tolerance = max(rows, columns) * 0.02 + 2
        assert points.min(axis=0) == pytest.approx([left, top], abs=tolerance)
        assert points.max(axis=0) == pytest.approx([right, bottom], abs=tolerance)
    summary = _summary(sr)
    highest = RECALL.value if RECALL.value in categories else NEGATIVE.value
    assert _coded(summary)["Assessment Category"][0] == highest
    words = {RECALL.value: RECALL.meaning, NEGATIVE.value: NEGATIVE.meaning}[highest]
    assert _text(summary, "Tracking Identifier").startswith(f"AI exam: {words}")
    if shutil.which("dciodvfy"):
        assert dciodvfy.errors(sr, tmp_path / "mammo.dcm") == []


def test_the_exam_category_is_the_highest_of_its_breasts() -> None:
    assert exam_category({"L": 0.1, "R": 0.2}, 0.5) is NEGATIVE
    assert exam_category({"L": 0.1, "R": 0.7}, 0.5) is RECALL
    assert exam_category({}, 0.5) is NEGATIVE


def test_a_breast_density_is_the_mean_over_its_own_views() -> None:
    """Density per breast from that breast's views only; a breast with no usable view
    has no reading."""
    manifest = manifest_of(MAMMOGRAPHY)
    header = Dataset()
    header.SOPClassUID, header.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3.4"
    dense = {"malignancy": np.array([0.1]), "density": np.array([0.0, 0.1, 0.1, 0.8])}
    fatty = {"malignancy": np.array([0.1]), "density": np.array([0.9, 0.1, 0.0, 0.0])}
    views = [
        View("L-CC", header, dense, None),
        View("L-MLO", header, dense, None),
        View("R-MLO", header, fatty, None),
    ]
    found = breast_readings(manifest, views, {"L": 0.1, "R": 0.6, "X": 0.2})
    assert [r.identifier for r in found] == [
        "left breast: category 1, negative, density D",
        "right breast: category 0, recall, density A",
    ]


def test_a_suspicious_region_is_drawn_on_its_view_where_the_map_peaks() -> None:
    """The hottest cell of a positive view's activation map, mirrored back when the view
    was turned to face left; a view below the operating point gets no region."""
    manifest = manifest_of(MAMMOGRAPHY)
    header = Dataset()
    header.SOPClassUID, header.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3.5"
    activation = np.zeros((1, 32, 16))
    activation[0, 10, 3] = 1.0  # rows 320-352, columns 96-128 of the 1024 x 512 input
    hot = {
        "malignancy": np.array([0.9]),
        "density": np.array([0.1, 0.6, 0.2, 0.1]),
        "activation_maps": activation,
    }
    cold = {**hot, "malignancy": np.array([0.2])}
    # 2048 x 1024 images: the input is the image at half size, no padding or crop.
    facing_left = Placement(2048, 1024, 0, 0, 2048, 1024)
    facing_right = Placement(2048, 1024, 0, 0, 2048, 1024, flipped=True)
    views = [
        View("L-CC", header, hot, None, facing_left),
        View("R-CC", header, hot, None, facing_right),
        View("R-MLO", header, cold, None, facing_right),
    ]
    found = suspicious_regions(manifest, views, 0.5)
    assert [r.identifier for r in found] == [
        "left CC: suspicious region",
        "right CC: suspicious region",
    ]
    left, right = (r.box for r in found)
    assert left == Box(640, 192, 704, 256)
    assert right == Box(640, 1024 - 256, 704, 1024 - 192)


@pytest.mark.slow
def test_every_view_above_a_low_operating_point_is_drawn_and_the_exam_is_recalled(
    archive: Archive, demo_models: Path, tmp_path: Path
) -> None:
    """The demo weights score malignancy low; with the operating point at 0.01 every view
    is positive: each gets its suspicious region on its own image, each breast category
    0 (recall), and so does the exam."""
    models = tmp_path / "models"
    shutil.copytree(demo_models / "mammo-efficientnet-b0", models / "mammo-efficientnet-b0")
    manifest = models / "mammo-efficientnet-b0" / "manifest.toml"
    text = manifest.read_text()
    assert "threshold = 0.5 }" in text
    manifest.write_text(text.replace("threshold = 0.5 }", "threshold = 0.01 }"))
    views = mammography(Rng(23), PATIENT, 0.05, "20260101", "M2")
    (job,) = _screened(archive, models, views)
    assert job.state == JobState.DONE, job.reason
    sr = _report(archive, job.StudyInstanceUID, job.result)
    groups = _groups(sr)
    regions = {
        _text(g, "Tracking Identifier"): _region(g)
        for g in groups
        if _text(g, "Tracking Identifier").endswith("suspicious region")
    }
    by_view = {f"{ds.ImageLaterality}-{ds.ViewPosition}": ds for ds in views}
    assert len(regions) == 4
    for name, ds in by_view.items():
        side, position = name.split("-")
        image, points = regions[
            f"{ {'L': 'left', 'R': 'right'}[side] } {position}: suspicious region"
        ]
        assert image == str(ds.SOPInstanceUID)
        assert (points >= 0).all()
        assert (points[:, 0] <= ds.Columns).all()
        assert (points[:, 1] <= ds.Rows).all()
    for group in groups[:2]:
        assert _coded(group)["Assessment Category"][0] == RECALL.value
    assert _coded(_summary(sr))["Assessment Category"][0] == RECALL.value
