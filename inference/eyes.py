"""A fundus exam read as screening programmes read it: each eye, then the patient; for
diabetic retinopathy and for glaucoma alike.

An exam has one or more photographs of each eye. Each eye's result is that of its
gradable photograph with the most evidence of referable disease (a second photograph of
an eye can only add evidence); an eye with no gradable photograph is ungradable, with
what its photograph measured. The exam is referable when either eye is; when neither
is and an eye is ungradable, the exam is ungradable, never "not referable": the
ungradable eye still needs to be seen (NHS Diabetic Eye Screening, "R U").

Pure functions of the model outputs and the image headers, tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.geometry import Box
from inference.readings import SIDES, Reading, View, eye_reading, inscribed, laterality
from inference.report import Finding
from models.codes import EYE, LATERALITY
from models.manifest import Manifest


@dataclass(frozen=True)
class Ungradable:
    """A photograph outside the quality limits: what was measured, and what failed."""

    header: Dataset
    measured: tuple[tuple[str, float], ...]
    missed: tuple[str, ...]


@dataclass(frozen=True)
class Exam:
    """Per eye, its reading; the exam's referable finding (none when no eye could be
    graded); and the eyes that could not be."""

    readings: list[Reading]
    found: list[Finding]
    ungradable: list[str]


def referable(manifest: Manifest, view: View) -> float:
    """The photograph's referable-disease probability (the manifest's second output)."""
    spec = manifest.outputs[1]
    return float(np.asarray(view.outputs[spec.name]).reshape(-1)[0])


def exam(manifest: Manifest, views: Sequence[View], unreadable: Sequence[Ungradable]) -> Exam:
    """``views`` are the gradable photographs (named by their eye, ``L`` or ``R``)."""
    spec = manifest.outputs[1]
    point = manifest.threshold(spec.name)
    threshold = 0.5 if point is None else point
    readings: list[Reading] = []
    scores: list[float] = []
    ungradable: list[str] = []
    chosen = worst_per_eye(manifest, views)
    for side in ("R", "L"):
        worst = chosen.get(side)
        if worst is not None:
            readings.append(eye_reading(manifest, worst.outputs, worst.header, worst.box))
            scores.append(referable(manifest, worst))
            continue
        failed = [u for u in unreadable if laterality(u.header) == side]
        if failed:
            readings.append(ungradable_reading(failed[0], FINDINGS[manifest.task]))
            ungradable.append(f"{SIDES[side]} eye")
    found = []
    if scores:
        found.append(Finding(spec.name, spec.labels[0], max(scores), threshold))
    return Exam(readings, found, ungradable)


def worst_per_eye(manifest: Manifest, views: Sequence[View]) -> dict[str, View]:
    """Per eye (``R``, ``L``), its gradable photograph with the most evidence of
    referable disease: the one that stands for the eye."""
    chosen: dict[str, View] = {}
    for side in ("R", "L"):
        own = [v for v in views if v.name == side]
        if own:
            chosen[side] = max(own, key=lambda v: referable(manifest, v))
    return chosen


FINDINGS = {"fundus": "Diabetic retinopathy", "glaucoma": "Glaucoma"}


def ungradable_reading(photo: Ungradable, finding: str = FINDINGS["fundus"]) -> Reading:
    """An eye whose photograph failed the quality gate: drawn on that photograph, with
    the measures and "Unusable - Quality renders image unusable" (DCM 111235), and no
    grade or call that could be read as negative."""
    side = laterality(photo.header)
    rows, columns = int(photo.header.Rows), int(photo.header.Columns)
    return Reading(
        identifier=f"{SIDES.get(side, 'unknown')} eye: ungradable: {', '.join(photo.missed)}",
        finding=finding,
        site=EYE,
        laterality=LATERALITY.get(side),
        source=photo.header,
        box=inscribed(Box(0.0, 0.0, float(rows), float(columns))),
        measurements=photo.measured,
        evaluations=(("Image Quality", codes.DCM.UnusableQualityRendersImageUnusable),),
    )
