"""Per-image predictions to the units an evaluation scores: image, study, eye or breast.

A study is scored as screening scores it, with the same code: a mammography exam and
each breast by the manifest's aggregation (:func:`inference.aggregation.aggregate`), a
fundus exam and each eye by its photograph with the most evidence of referable disease
(:func:`inference.eyes.worst_per_eye`). A model read image by image (chest) has one
report per image in screening; its study is positive when any image is (the highest
score), as a study-level reading of image-level calls is. What cannot be scored (no
usable image, a required view missing) is listed with the reason, never dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from inference.aggregation import aggregate
from inference.evaluate.cache import Prediction
from inference.eyes import worst_per_eye
from inference.readings import View
from inference.report import Finding
from inference.routing import missing_views, view
from models.manifest import Manifest
from models.zoo import EYE_TASKS

UnitKind = Literal["image", "study", "eye", "breast"]
UNITS: tuple[UnitKind, ...] = ("image", "study", "eye", "breast")
# Subgroups read from the images' headers (besides the labels file's own columns).
HEADER_SUBGROUPS = (
    "Manufacturer",
    "ManufacturerModelName",
    "PatientSex",
    "age band",
    "ViewPosition",
    "InstitutionName",
)
SIDES = {"R": "right", "L": "left"}


class UnitError(ValueError):
    """The unit asked for does not fit the model."""


@dataclass
class Unit:
    """What is scored: its key, the keys a labels file may name it by, the patient
    (the cluster of the bootstrap), a score per label, its subgroups, its images."""

    key: str
    keys: dict[str, str]
    patient: str
    scores: dict[str, float]
    groups: dict[str, str]
    images: list[str]
    study: str = ""
    side: str = ""
    in_archive: bool = False
    seconds: float = 0.0


@dataclass
class Excluded:
    key: str
    reason: str


@dataclass
class Units:
    units: list[Unit]
    excluded: list[Excluded] = field(default_factory=list)


def label_names(manifest: Manifest) -> list[str]:
    """Every label the model scores (its score outputs'), each once; a label found in
    two outputs is named ``output/label``."""
    seen: dict[str, int] = defaultdict(int)
    for output in manifest.outputs:
        if output.kind == "scores":
            for label in output.labels:
                seen[label] += 1
    names = []
    for output in manifest.outputs:
        if output.kind == "scores":
            names += [lbl if seen[lbl] == 1 else f"{output.name}/{lbl}" for lbl in output.labels]
    return names


def scores(manifest: Manifest, outputs: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each label's score from a prediction's outputs."""
    names = iter(label_names(manifest))
    found = {}
    for output in manifest.outputs:
        if output.kind == "scores":
            for value in outputs[output.name]:
                found[next(names)] = float(value)
    return found


def check_unit(manifest: Manifest, kind: UnitKind) -> None:
    if kind == "eye" and manifest.task not in EYE_TASKS:
        raise UnitError(f"the eye is a unit of fundus models only, not of {manifest.name}")
    if kind == "breast" and manifest.task != "mammography":
        raise UnitError(f"the breast is a unit of mammography models only, not of {manifest.name}")


def build(
    manifest: Manifest,
    predictions: Sequence[Prediction],
    kind: UnitKind,
    in_archive: Sequence[bool],
) -> Units:
    """The units of ``kind`` from one prediction per image (in the images' order)."""
    check_unit(manifest, kind)
    excluded = [
        Excluded(_image_key(p, archived), p.reason)
        for p, archived in zip(predictions, in_archive, strict=True)
        if p.outputs is None and p.reason
    ]
    if kind == "image":
        images = [
            _image_unit(manifest, p, archived)
            for p, archived in zip(predictions, in_archive, strict=True)
            if p.outputs is not None
        ]
        return Units(images, excluded)
    studies: dict[str, list[tuple[Prediction, bool]]] = defaultdict(list)
    for p, archived in zip(predictions, in_archive, strict=True):
        study = p.attributes.get("StudyInstanceUID")
        if study is None:
            if p.outputs is not None:
                reason = f"no StudyInstanceUID: not in a {kind}"
                excluded.append(Excluded(_image_key(p, archived), reason))
            continue
        studies[study].append((p, archived))
    units: list[Unit] = []
    for study, members in studies.items():
        usable = [(p, a) for p, a in members if p.outputs is not None]
        if not usable:
            excluded.append(Excluded(study, "no usable image in the study"))
            continue
        found, why = _study_units(manifest, study, usable, kind, members)
        units += found
        excluded += [Excluded(study, w) for w in why]
    return Units(units, excluded)


def _image_key(p: Prediction, archived: bool) -> str:
    """An archived image by its SOP Instance UID (unique there); a file by its path: a
    folder may hold one instance twice (in two transfer syntaxes, say), each counted."""
    if archived and "SOPInstanceUID" in p.attributes:
        return p.attributes["SOPInstanceUID"]
    return p.attributes["path"]


def _image_unit(manifest: Manifest, p: Prediction, archived: bool) -> Unit:
    assert p.outputs is not None
    a = p.attributes
    keys = {k: a[k] for k in _KEYS if k in a}
    key = _image_key(p, archived)
    return Unit(
        key,
        keys,
        a.get("PatientID") or a.get("StudyInstanceUID") or key,
        scores(manifest, p.outputs),
        _groups([a]),
        [key],
        study=a.get("StudyInstanceUID", ""),
        side=_side(a),
        in_archive=archived,
        seconds=_seconds(p),
    )


_KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "path")
_STUDY_KEYS = ("StudyInstanceUID", "PatientID")


def _seconds(p: Prediction) -> float:
    return p.decode_seconds + p.preprocess_seconds + p.infer_seconds


def _side(a: Mapping[str, str]) -> str:
    return (a.get("ImageLaterality") or a.get("Laterality") or "").upper()


def _study_units(
    manifest: Manifest,
    study: str,
    usable: list[tuple[Prediction, bool]],
    kind: UnitKind,
    members: list[tuple[Prediction, bool]],
) -> tuple[list[Unit], list[str]]:
    first = usable[0][0].attributes
    archived = any(a for _, a in usable)

    def unit(key: str, side: str, chosen: Sequence[Prediction], values: dict[str, float]) -> Unit:
        keys: dict[str, str] = {
            k: first[k] for k in ("StudyInstanceUID", "PatientID") if k in first
        }
        return Unit(
            key,
            keys,
            first.get("PatientID") or study,
            values,
            _groups([p.attributes for p in chosen]),
            [_image_key(p, archived) for p in chosen],
            study=study,
            side=side,
            in_archive=archived,
            seconds=sum(_seconds(p) for p, _ in members),
        )

    predictions = [p for p, _ in usable]
    if manifest.task == "mammography":
        unassessable = [p for p, _ in members if p.not_assessable]
        if unassessable:
            # Screening reports such an exam as not assessable: no score to count.
            return [], [f"not assessable: {unassessable[0].reason}"]
        views = [_view(p, view(p.attributes)) for p in predictions]
        missing = missing_views([p.attributes for p in predictions], manifest)
        if missing:
            return [], [f"views missing from the study: {', '.join(missing)}"]
        if kind == "study":
            found, _ = aggregate(manifest, views)
            return [unit(study, "", predictions, _exam_scores(manifest, found))], []
        units = []
        for side in ("R", "L"):
            own = [v for v in views if v.name.startswith(f"{side}-")]
            if own:
                found, _ = aggregate(manifest, own)
                chosen = [p for p in predictions if _side(p.attributes) == side]
                units.append(unit(f"{study}/{side}", side, chosen, _exam_scores(manifest, found)))
        return units, []
    if manifest.task in EYE_TASKS:
        views = [_view(p, _side(p.attributes)) for p in predictions]
        chosen_views = worst_per_eye(manifest, views)
        by_view = {id(v): p for v, p in zip(views, predictions, strict=True)}
        eyes = {side: by_view[id(v)] for side, v in chosen_views.items()}
        if not eyes:
            return [], ["no photograph with its eye (ImageLaterality or Laterality)"]
        if kind == "eye":
            return [
                unit(f"{study}/{side}", side, [p], scores(manifest, p.outputs or {}))
                for side, p in sorted(eyes.items(), reverse=True)
            ], []
        referable = manifest.outputs[1].name
        worse = max(eyes.values(), key=lambda p: (p.outputs or {})[referable][0])
        return [unit(study, "", list(eyes.values()), scores(manifest, worse.outputs or {}))], []
    # An image-level model: the study's score for a label is its highest image's.
    per_image = [scores(manifest, p.outputs or {}) for p in predictions]
    values = {label: max(s[label] for s in per_image) for label in per_image[0]}
    return [unit(study, "", predictions, values)], []


def _view(p: Prediction, name: str) -> View:
    outputs = {o: np.asarray(v, np.float32) for o, v in (p.outputs or {}).items()}
    return View(name, Dataset(), outputs, None)


def _exam_scores(manifest: Manifest, found: Sequence[Finding]) -> dict[str, float]:
    """The exam-level values of :func:`aggregate` by label: "malignancy exam" for
    malignancy, "density A" for density A (a breast's, when given one breast's views)."""
    values: dict[str, float] = {}
    for finding in found:
        if finding.label == f"{finding.output} exam":
            values[finding.output] = finding.probability
        elif finding.output == "density":
            values[finding.label.removeprefix("density ")] = finding.probability
    return {
        n: values[n.split("/")[-1]] for n in label_names(manifest) if n.split("/")[-1] in values
    }


def _groups(attributes: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The header subgroups of a unit: a value its images share, else "mixed"."""
    found = {}
    for name in HEADER_SUBGROUPS:
        values = {_group_value(a, name) for a in attributes}
        found[name] = values.pop() if len(values) == 1 else "mixed"
    return found


def _group_value(a: Mapping[str, str], name: str) -> str:
    if name == "age band":
        return age_band(a)
    return a.get(name, "") or "unknown"


def age_band(a: Mapping[str, str]) -> str:
    """A decade of age from PatientAge (PS3.5 AS: ``045Y``), else from the birth and
    study dates; "unknown" without them (an anonymised image often has neither)."""
    years = _years(a)
    if years is None:
        return "unknown"
    low = min(years // 10 * 10, 90)
    return "90+" if low == 90 else f"{low}-{low + 9}"


def _years(a: Mapping[str, str]) -> int | None:
    age = a.get("PatientAge", "")
    if len(age) == 4 and age[:3].isdigit():
        count, unit = int(age[:3]), age[3].upper()
        return {"Y": count, "M": count // 12, "W": count // 52, "D": count // 365}.get(unit)
    born, seen = a.get("PatientBirthDate", ""), a.get("StudyDate", "")
    try:
        b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))
        s = date(int(seen[:4]), int(seen[4:6]), int(seen[6:8]))
    except ValueError:
        return None
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return years if years >= 0 else None
