"""What a screening programme reads per eye and per breast, drawn on the image it is about.

A fundus report gives, for each eye, the ICDR grade, the referable call and that the
photograph was gradable (the exam: :mod:`inference.eyes`), or for glaucoma the
referable call, its probability and the vertical cup-to-disc ratio, drawn on the optic
disc; a mammography report gives,
per breast, the suspicion score, the assessment category (BI-RADS 1 negative, or 0:
recall) and the density category, then the region of each view the model calls
suspicious (the peak of its class activation map), and the exam's highest category.
Each :class:`Reading` becomes a TID 1410 group whose region outlines the retina in the
eye's field of view, the breast on one of its views or a suspicious region, so that a
viewer draws it and lists it with its tracking identifier, which says the result in
words ("right eye: ICDR grade 0, not referable DR").

Pure functions of the model outputs and the image headers, tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.geometry import Box, Placement, peak_box, to_image
from inference.quality import FIELD_THRESHOLD, extent, intensities
from models.codes import (
    BREAST,
    CATEGORY_RANK,
    DENSITY,
    EYE,
    LATERALITY,
    NEGATIVE,
    OPTIC_DISC,
    RECALL,
)
from models.manifest import Manifest, Preprocessing

SIDES = {"L": "left", "R": "right"}


@dataclass(frozen=True)
class Reading:
    """One eye's or one breast's result, and where on which image it is drawn."""

    identifier: str  # the result in words: the tracking identifier viewers list
    finding: str
    site: Code
    laterality: Code | None
    source: Dataset
    box: Box | None
    measurements: tuple[tuple[str, float], ...]
    evaluations: tuple[tuple[str, Code | str | None], ...]  # None: present


@dataclass(frozen=True)
class View:
    """One image a study-level model read: its name (``L-CC``), header, outputs by name,
    and the outline of the organ on it."""

    name: str
    header: Dataset
    outputs: Mapping[str, np.ndarray]
    box: Box | None
    placement: Placement | None = None


def organ_box(tensor: np.ndarray, placement: Placement | None, p: Preprocessing) -> Box | None:
    """The bright part of a model input (a fundus field of view, a breast against air)
    as a box on the stored image; None when the placement is not known."""
    bright = intensities(tensor, p) > FIELD_THRESHOLD
    found = extent(bright)
    if found is None:
        return None
    rows, columns = found
    return to_image(Box(rows.start, columns.start, rows.stop, columns.stop), placement, p)


def inscribed(box: Box) -> Box:
    """The square inscribed in the circular field of view whose bounding box is ``box``
    (the frame may cut the circle at the top and bottom: its diameter is the wider
    side). Drawn instead of the whole field, it leaves room beside it on the image for
    the label a viewer writes next to it."""
    centre_r, centre_c = (box.top + box.bottom) / 2, (box.left + box.right) / 2
    half = max(box.bottom - box.top, box.right - box.left) / 2 / 2**0.5
    return Box(
        max(box.top, centre_r - half),
        max(box.left, centre_c - half),
        min(box.bottom, centre_r + half),
        min(box.right, centre_c + half),
    )


def laterality(header: Dataset) -> str:
    """ImageLaterality, else the series' Laterality (PS3.3 C.7.3.1.1.1)."""
    value = str(header.get("ImageLaterality") or header.get("Laterality") or "").strip().upper()
    return value if value in SIDES else ""


@dataclass(frozen=True)
class _Referral:
    """An eye's referable call at the model's operating point (its second output)."""

    eye: str  # "right eye"
    side: str
    label: str
    probability: float
    positive: bool

    @property
    def words(self) -> str:
        return self.label if self.positive else f"not {self.label}"

    def evaluations(self, manifest: Manifest) -> list[tuple[str, Code | str | None]]:
        """The call, and that the photograph was gradable when the model has a gate."""
        found: list[tuple[str, Code | str | None]] = [
            (self.label, codes.SCT.Present if self.positive else codes.SCT.Absent)
        ]
        if manifest.quality is not None:
            found.append(("Image Quality", codes.DCM.UsableMeetsTheQualityControlStandard))
        return found


def _referral(manifest: Manifest, outputs: Mapping[str, np.ndarray], header: Dataset) -> _Referral:
    spec = manifest.outputs[1]
    probability = float(np.asarray(outputs[spec.name]).reshape(-1)[0])
    point = manifest.threshold(spec.name)
    threshold = 0.5 if point is None else point
    side = laterality(header)
    eye = f"{SIDES.get(side, 'unknown')} eye"
    return _Referral(eye, side, spec.labels[0], probability, probability >= threshold)


def fundus_reading(
    manifest: Manifest, outputs: Mapping[str, np.ndarray], header: Dataset, box: Box | None
) -> Reading:
    """The photographed eye: ICDR grade (the most probable), referable DR at the
    operating point, and gradable (the image passed the quality gate)."""
    grades_spec = manifest.outputs[0]
    grades = np.asarray(outputs[grades_spec.name], dtype=np.float64).reshape(-1)
    best = int(np.argmax(grades))
    grade = grades_spec.labels[best]
    call = _referral(manifest, outputs, header)
    return Reading(
        identifier=f"{call.eye}: ICDR grade {grade.split()[0]}, {call.words}",
        finding="Diabetic retinopathy",
        site=EYE,
        laterality=LATERALITY.get(call.side),
        source=header,
        box=None if box is None else inscribed(box),
        measurements=(
            (f"ICDR grade {grade.split()[0]} probability", float(grades[best])),
            (f"{call.label} probability", call.probability),
        ),
        evaluations=(("ICDR grade", grade), *call.evaluations(manifest)),
    )


def glaucoma_reading(
    manifest: Manifest, outputs: Mapping[str, np.ndarray], header: Dataset, box: Box | None
) -> Reading:
    """The photographed eye: referable glaucoma at the operating point with its
    probability, the vertical cup-to-disc ratio, and gradable (the quality gate of the
    fundus photographs); drawn on the optic disc (:mod:`inference.disc`)."""
    ratio_spec = manifest.outputs[0]
    ratio = float(np.asarray(outputs[ratio_spec.name]).reshape(-1)[0])
    call = _referral(manifest, outputs, header)
    return Reading(
        identifier=f"{call.eye}: {call.words}, vertical CDR {ratio:.2f}",
        finding="Glaucoma",
        site=OPTIC_DISC,
        laterality=LATERALITY.get(call.side),
        source=header,
        box=box,
        measurements=(
            (f"{call.label} probability", call.probability),
            (ratio_spec.labels[0], ratio),
        ),
        evaluations=tuple(call.evaluations(manifest)),
    )


def eye_reading(
    manifest: Manifest, outputs: Mapping[str, np.ndarray], header: Dataset, box: Box | None
) -> Reading:
    """An eye's reading by the model's task: diabetic retinopathy or glaucoma."""
    if manifest.task == "glaucoma":
        return glaucoma_reading(manifest, outputs, header, box)
    return fundus_reading(manifest, outputs, header, box)


def category(score: float, threshold: float) -> Code:
    """The screening assessment of a suspicion score at the operating point."""
    return RECALL if score >= threshold else NEGATIVE


def breast_readings(
    manifest: Manifest, views: Sequence[View], per_breast: Mapping[str, float]
) -> list[Reading]:
    """Per breast: its suspicion score (the manifest's aggregation over its views), the
    category at the operating point and the density (mean over its views), drawn on its
    CC view (else its first)."""
    point = manifest.threshold("malignancy")
    threshold = 0.5 if point is None else point
    density_spec = next(o for o in manifest.outputs if o.name == "density")
    found = []
    for side, score in per_breast.items():
        own = [v for v in views if v.name.split("-")[0] == side]
        if not own:
            continue
        shown = next((v for v in own if v.name.endswith("-CC")), own[0])
        densities = np.mean(
            [np.asarray(v.outputs["density"], dtype=np.float64).reshape(-1) for v in own], axis=0
        )
        best = int(np.argmax(densities))
        density = density_spec.labels[best]
        assessed = category(score, threshold)
        words = "category 0, recall" if assessed is RECALL else "category 1, negative"
        evaluations: list[tuple[str, Code | str | None]] = [
            ("Assessment Category", assessed),
            ("Breast composition", DENSITY.get(density, density)),
        ]
        if manifest.quality is not None:
            evaluations.append(("Image Quality", codes.DCM.UsableMeetsTheQualityControlStandard))
        found.append(
            Reading(
                identifier=f"{SIDES.get(side, side)} breast: {words}, density {density}",
                finding="Breast assessment",
                site=BREAST.get(side, codes.SCT.Breast),
                laterality=None,
                source=shown.header,
                box=shown.box,
                measurements=(
                    ("Malignancy probability", score),
                    (f"Density {density} probability", float(densities[best])),
                ),
                evaluations=tuple(evaluations),
            )
        )
    return found + suspicious_regions(manifest, views, threshold)


def suspicious_regions(
    manifest: Manifest, views: Sequence[View], threshold: float
) -> list[Reading]:
    """Each view whose own score is at or above the operating point: the cell of its
    class activation map with the most evidence, drawn on that view."""
    spec = next((o for o in manifest.outputs if o.kind == "map"), None)
    if spec is None:
        return []
    found = []
    for view in views:
        score = float(np.asarray(view.outputs["malignancy"]).reshape(-1)[0])
        if score < threshold or spec.name not in view.outputs:
            continue
        activation = np.asarray(view.outputs[spec.name], dtype=np.float64)
        activation = activation.reshape(activation.shape[-2:])
        p = manifest.preprocessing
        box = to_image(peak_box(activation, p.size), view.placement, p)
        side, _, position = view.name.partition("-")
        found.append(
            Reading(
                identifier=f"{SIDES.get(side, side)} {position}: suspicious region",
                finding="malignancy",
                site=BREAST.get(side, codes.SCT.Breast),
                laterality=None,
                source=view.header,
                box=box,
                measurements=(("Malignancy probability", score),),
                evaluations=(("malignancy", None),),
            )
        )
    return found


def exam_category(per_breast: Mapping[str, float], threshold: float) -> Code:
    """The exam's category: the highest of its breasts'."""
    found = [category(score, threshold) for score in per_breast.values()]
    return max(found, key=lambda c: CATEGORY_RANK[c.value], default=NEGATIVE)
