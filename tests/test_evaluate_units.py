"""Units of analysis and operating points, without a model: pure functions over
predictions and header values.

A study is scored as screening scores it: a mammography exam and each breast by the
manifest's aggregation (a breast the mean of its views, the exam the worse breast), a
fundus exam and each eye by the photograph with the most referable evidence (NHS
Diabetic Eye Screening reads the patient by the worse eye), a chest study by its
highest image.
"""

from __future__ import annotations

import numpy as np
import pytest

from filmless import evaluate_cli
from inference.evaluate import points, units
from inference.evaluate.cache import Prediction
from models.zoo import CHEST_XRAY, DENSITY, FUNDUS, GLAUCOMA, MAMMOGRAPHY, MG_FOR_PRESENTATION
from tests.support.zoo import manifest_of

MAMMO = manifest_of(MAMMOGRAPHY)
EYES = manifest_of(FUNDUS)
CHEST = manifest_of(CHEST_XRAY)


def _p(sop: str, study: str, outputs: dict[str, list[float]] | None, **header: str) -> Prediction:
    attributes = {"SOPInstanceUID": sop, "StudyInstanceUID": study, "PatientID": "P1", "path": sop}
    return Prediction(sop, outputs, "" if outputs else "not assessable: dark", attributes | header)


def _mammo(study: str, malignancy: dict[str, float]) -> list[Prediction]:
    density = {"R-CC": [0.1, 0.2, 0.3, 0.4], "R-MLO": [0.3, 0.3, 0.2, 0.2]}
    return [
        _p(
            f"{study}.{n}",
            study,
            {"malignancy": [score], "density": density.get(view, [0.25, 0.25, 0.25, 0.25])},
            ImageLaterality=view[0],
            ViewPosition=view[2:],
            Modality="MG",
            SOPClassUID=MG_FOR_PRESENTATION[0],
            PresentationIntentType="FOR PRESENTATION",
        )
        for n, (view, score) in enumerate(malignancy.items())
    ]


def test_a_mammography_exam_and_its_breasts_are_scored_by_the_manifests_aggregation() -> None:
    views = _mammo("1.1", {"R-CC": 0.2, "R-MLO": 0.7, "L-CC": 0.1, "L-MLO": 0.3})
    assert MAMMO.aggregation is not None
    # A breast is the mean of its views, the exam the worse breast.
    assert (MAMMO.aggregation.per_breast, MAMMO.aggregation.exam) == ("mean", "max")
    (exam,) = units.build(MAMMO, views, "study", [True] * 4).units
    assert exam.key == "1.1"
    assert exam.scores["malignancy"] == pytest.approx(0.45)
    # Density over every view, by the manifest's rule (mean).
    assert MAMMO.aggregation.density == "mean"
    mean = np.mean([[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2], [0.25] * 4, [0.25] * 4], axis=0)
    assert [exam.scores[d] for d in DENSITY] == pytest.approx(mean.tolist())
    breasts = units.build(MAMMO, views, "breast", [True] * 4).units
    assert [(b.key, b.side) for b in breasts] == [("1.1/R", "R"), ("1.1/L", "L")]
    assert [b.scores["malignancy"] for b in breasts] == pytest.approx([0.45, 0.2])
    assert breasts[0].scores["A"] == pytest.approx(0.2)  # the right breast's two views


def test_an_exam_screening_would_not_score_is_listed_with_the_reason() -> None:
    three = _mammo("2.1", {"R-CC": 0.2, "R-MLO": 0.7, "L-CC": 0.1})
    built = units.build(MAMMO, three, "study", [False] * 3)
    assert built.units == []
    assert [e.reason for e in built.excluded] == ["views missing from the study: L-MLO"]
    dark = _mammo("3.1", {"R-CC": 0.2, "R-MLO": 0.7, "L-CC": 0.1, "L-MLO": 0.3})
    dark[0].outputs = None
    dark[0].not_assessable = True
    dark[0].reason = "not assessable: mean brightness"
    built = units.build(MAMMO, dark, "study", [False] * 4)
    assert built.units == []
    assert any(e.reason.startswith("not assessable") for e in built.excluded)


def _photo(sop: str, side: str, referable: float) -> Prediction:
    grades = [1 - referable, 0.0, referable, 0.0, 0.0]
    outputs = {"grade_probabilities": grades, "referable": [referable]}
    return _p(sop, "9.1", outputs, ImageLaterality=side, Modality="OP")


def test_each_eye_is_its_worst_photograph_and_the_exam_its_worse_eye() -> None:
    photos = [_photo("a", "R", 0.2), _photo("b", "R", 0.6), _photo("c", "L", 0.4)]
    eyes = units.build(EYES, photos, "eye", [False] * 3).units
    assert [(e.key, e.images) for e in eyes] == [("9.1/R", ["b"]), ("9.1/L", ["c"])]
    assert [e.scores["referable DR"] for e in eyes] == pytest.approx([0.6, 0.4])
    (exam,) = units.build(EYES, photos, "study", [False] * 3).units
    assert exam.scores["referable DR"] == pytest.approx(0.6)


def test_a_chest_study_is_its_highest_image_and_units_fit_the_model() -> None:
    labels = units.label_names(CHEST)
    first = dict.fromkeys(labels, 0.1) | {"Effusion": 0.8}
    second = dict.fromkeys(labels, 0.3)
    images = [
        _p("x", "5.1", {"probabilities": list(first.values())}),
        _p("y", "5.1", {"probabilities": list(second.values())}),
        _p("z", "5.1", None),
    ]
    built = units.build(CHEST, images, "study", [True] * 3)
    (study,) = built.units
    assert study.scores["Effusion"] == pytest.approx(0.8)
    assert study.scores["Atelectasis"] == pytest.approx(0.3)
    assert [e.key for e in built.excluded] == ["z"]  # its own reason, listed
    with pytest.raises(units.UnitError, match="fundus"):
        units.build(CHEST, images, "eye", [True] * 3)


@pytest.mark.parametrize(
    ("header", "band"),
    [
        ({"PatientAge": "045Y"}, "40-49"),
        ({"PatientAge": "018M"}, "0-9"),
        ({"PatientAge": "097Y"}, "90+"),
        ({"PatientBirthDate": "19600302", "StudyDate": "20240301"}, "60-69"),
        ({"PatientBirthDate": "19600301", "StudyDate": "20240301"}, "60-69"),
        ({"StudyDate": "20240301"}, "unknown"),  # anonymised: no age, not a guess
    ],
)
def test_age_bands_from_patient_age_or_the_dates(header: dict[str, str], band: str) -> None:
    assert units.age_band(header) == band


def test_operating_points_are_derived_by_each_rule() -> None:
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    truths = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1]  # negatives 0.1, 0.2, 0.3 and 0.5
    found, problems = points.derive("youden", {"x": (scores, truths)})
    assert problems == {}
    # J at 0.6: sensitivity 5/6, specificity 1 -> 0.83; at 0.4 only 1 - 1/4 -> 0.75.
    assert found["x"].threshold == pytest.approx(0.6)
    found, _ = points.derive("sensitivity>=0.9", {"x": (scores, truths)})
    assert found["x"].threshold == pytest.approx(0.4)  # every positive: down to 0.4
    found, _ = points.derive("specificity>=0.8", {"x": (scores, truths)})
    assert found["x"].threshold == pytest.approx(0.6)  # no FP allowed (1 of 4 is 0.25)
    _, problems = points.derive("youden", {"x": ([0.1, 0.2], [1, 1])})
    assert "both positive and negative" in problems["x"]
    with pytest.raises(points.PointsError):
        points.check_rule("accuracy>=0.9")


def test_the_command_line_offers_every_unit() -> None:
    """The CLI spells the units out (so that parsing it imports no torch)."""
    assert evaluate_cli.UNITS == units.UNITS


def test_glaucoma_is_scored_per_eye_as_retinopathy_is() -> None:
    """The same exam logic (AIROGS scores each eye's referable-glaucoma probability)."""
    glaucoma = manifest_of(GLAUCOMA)

    def disc(sop: str, side: str, referable: float, ratio: float) -> Prediction:
        outputs = {"vertical_cdr": [ratio], "referable": [referable]}
        return _p(sop, "9.2", outputs, ImageLaterality=side, Modality="OP")

    photos = [disc("a", "R", 0.1, 0.3), disc("b", "R", 0.8, 0.7), disc("c", "L", 0.2, 0.4)]
    eyes = units.build(glaucoma, photos, "eye", [False] * 3).units
    assert units.label_names(glaucoma) == ["vertical cup-to-disc ratio", "referable glaucoma"]
    assert [e.images for e in eyes] == [["b"], ["c"]]
    assert [e.scores["referable glaucoma"] for e in eyes] == pytest.approx([0.8, 0.2])
    assert eyes[0].scores["vertical cup-to-disc ratio"] == pytest.approx(0.7)
