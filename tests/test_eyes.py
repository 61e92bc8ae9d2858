"""A fundus exam's result from its eyes' (pure: model outputs and headers, no model).

Screening programmes refer a patient when either eye is referable, and an ungradable eye
is an outcome of its own ("R U" in the NHS Diabetic Eye Screening Programme), never a
negative.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.eyes import Ungradable, exam
from inference.readings import View
from inference.report import summary_calls, summary_identifier
from models.manifest import Manifest
from models.zoo import FUNDUS
from tests.support.zoo import manifest_of


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return manifest_of(FUNDUS)


def _photo(side: str, referable: float, grade: int = 0) -> View:
    header = Dataset()
    header.ImageLaterality = side
    header.Rows, header.Columns = 100, 120
    grades = np.full(5, 0.05, np.float32)
    grades[grade] = 0.8
    outputs = {
        "grade_probabilities": grades[None],
        "referable": np.asarray([[referable]], np.float32),
    }
    return View(side, header, outputs, None)


def _ungradable(side: str) -> Ungradable:
    header = Dataset()
    header.ImageLaterality = side
    header.Rows, header.Columns = 100, 120
    return Ungradable(header, (("mean brightness", 0.05),), ("mean brightness",))


def _words(manifest: Manifest, views: list[View], failed: list[Ungradable]) -> str:
    result = exam(manifest, views, failed)
    calls = summary_calls(result.found, gated=True, task="fundus", ungradable=result.ungradable)
    return summary_identifier(calls)


def test_the_exam_is_referable_when_either_eye_is(manifest: Manifest) -> None:
    result = exam(manifest, [_photo("R", 0.1), _photo("L", 0.9, grade=3)], [])
    assert [r.identifier.split(":")[0] for r in result.readings] == ["right eye", "left eye"]
    (found,) = result.found
    assert found.probability == pytest.approx(0.9)
    assert found.positive
    assert _words(manifest, [_photo("R", 0.1), _photo("L", 0.9)], []).startswith(
        "AI exam: Referable"
    )
    assert _words(manifest, [_photo("R", 0.1), _photo("L", 0.2)], []) == "AI exam: Not referable"


def test_an_eye_with_two_photographs_is_read_on_the_one_with_more_evidence(
    manifest: Manifest,
) -> None:
    result = exam(manifest, [_photo("R", 0.2), _photo("R", 0.7, grade=2), _photo("L", 0.1)], [])
    right = result.readings[0]
    assert right.identifier.startswith("right eye: ICDR grade 2, referable DR")
    assert result.found[0].probability == pytest.approx(0.7)


def test_an_ungradable_eye_is_never_read_as_not_referable(manifest: Manifest) -> None:
    result = exam(manifest, [_photo("R", 0.1)], [_ungradable("L")])
    assert result.ungradable == ["left eye"]
    left = result.readings[1]
    assert left.identifier == "left eye: ungradable: mean brightness"
    assert left.evaluations == (("Image Quality", codes.DCM.UnusableQualityRendersImageUnusable),)
    assert left.box is not None  # drawn on its photograph
    calls = summary_calls(result.found, gated=True, task="fundus", ungradable=result.ungradable)
    assert calls[0] == ("Image Quality", codes.DCM.UnusableQualityRendersImageUnusable)
    assert summary_identifier(calls) == "AI exam: Ungradable left eye"
    # A referable eye still refers the patient.
    assert _words(manifest, [_photo("R", 0.95)], [_ungradable("L")]).startswith(
        "AI exam: Referable"
    )


def test_a_gradable_photograph_of_an_eye_outweighs_an_ungradable_one(manifest: Manifest) -> None:
    result = exam(manifest, [_photo("L", 0.1), _photo("R", 0.1)], [_ungradable("L")])
    assert result.ungradable == []
    assert len(result.readings) == 2
