"""Operating points, declared before the test set is scored.

From the model's manifest, from a file (JSON or TOML ``{label = threshold}``, or a CSV
of ``label,threshold``), or derived on a separate validation set by a rule: Youden's J
(the highest sensitivity + specificity - 1), or the highest threshold that reaches a
sensitivity, or the lowest one that keeps a specificity. Never tuned on the test set:
the caller keeps the validation units and patients apart from it. A call is positive at
score >= threshold, as in screening.
"""

from __future__ import annotations

import csv
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.evaluate.metrics import NotEstimable, roc_curve
from inference.evaluate.units import label_names
from models.manifest import Manifest

_RULE = re.compile(r"^(youden|(sensitivity|specificity)>=(0?\.\d+|1(\.0*)?))$")


class PointsError(ValueError):
    """Operating points that cannot be used; the message says why."""


@dataclass(frozen=True)
class Point:
    label: str
    threshold: float
    source: str


def from_manifest(manifest: Manifest) -> dict[str, Point]:
    names = label_names(manifest)
    by_output: dict[tuple[str, str], str] = {}
    position = iter(names)
    for output in manifest.outputs:
        if output.kind == "scores":
            for label in output.labels:
                by_output[(output.name, label)] = next(position)
    source = f"manifest of {manifest.name} {manifest.version}"
    return {
        by_output[(p.output, p.label)]: Point(by_output[(p.output, p.label)], p.threshold, source)
        for p in manifest.operating_points
        if (p.output, p.label) in by_output
    }


def from_file(path: Path, labels: Sequence[str]) -> dict[str, Point]:
    """Thresholds by label from a file; a label the model does not score is an error."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        elif path.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        else:
            values = {r[0].strip(): r[1] for r in csv.reader(text.splitlines()) if len(r) >= 2}
            values.pop("label", None)
        found = {str(k): float(v) for k, v in dict(values).items()}
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise PointsError(f"{path}: {exc}") from exc
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise PointsError(f"{path}: thresholds for labels the model does not score: {unknown}")
    outside = [k for k, v in found.items() if not 0 <= v <= 1]
    if outside:
        raise PointsError(f"{path}: thresholds outside [0, 1]: {outside}")
    return {k: Point(k, v, f"file {path.name}") for k, v in found.items()}


def check_rule(rule: str) -> str:
    if not _RULE.match(rule.replace(" ", "")):
        raise PointsError(
            f"--derive {rule!r}: youden, sensitivity>=X or specificity>=X (X in (0, 1]) expected"
        )
    return rule.replace(" ", "")


def derive(
    rule: str, validation: Mapping[str, tuple[Sequence[float], Sequence[int]]]
) -> tuple[dict[str, Point], dict[str, str]]:
    """A threshold per label from its validation scores and truths by ``rule``; and
    for each label where none can be derived, why."""
    rule = check_rule(rule)
    points: dict[str, Point] = {}
    problems: dict[str, str] = {}
    for label, (scores, truths) in validation.items():
        try:
            fpr, tpr, thresholds = roc_curve(scores, truths)
        except NotEstimable as exc:
            problems[label] = f"validation set: {exc}"
            continue
        fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # not the "call nothing" point
        if rule == "youden":
            chosen = int(np.argmax(tpr - fpr))
        else:
            kind, target = rule.split(">=")
            wanted = float(target)
            if kind == "sensitivity":
                reaching = np.flatnonzero(tpr >= wanted - 1e-12)
                chosen = int(reaching[0])
            else:
                keeping = np.flatnonzero(1 - fpr >= wanted - 1e-12)
                if keeping.size == 0:
                    problems[label] = f"no threshold keeps specificity >= {wanted} on validation"
                    continue
                chosen = int(keeping[-1])
        n = len(truths)
        points[label] = Point(
            label, float(thresholds[chosen]), f"derived: {rule} on the validation set (n={n})"
        )
    return points, problems
