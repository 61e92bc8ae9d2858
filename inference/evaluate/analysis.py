"""The metrics of an evaluation, as the versioned ``metrics.json`` holds them.

Per model and label: counts and prevalence; AUROC with DeLong's and a patient-clustered
bootstrap interval; AUPRC; partial AUC at 90-100% specificity and the sensitivity at 90%
and 95% specificity (the best threshold keeping it, as AIROGS scores referable glaucoma);
sensitivity, specificity, PPV and NPV at each operating point with Wilson intervals;
Brier score and calibration; the same per subgroup with its n and a flag when it is too
small to say much. For two scorers of the same units: the paired DeLong test and
McNemar's test at their operating points. Pure: the same inputs and seed give the same
dictionary, value for value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.evaluate import metrics as m
from inference.evaluate.points import Point
from inference.evaluate.units import Unit

SCHEMA = "filmless.evaluate/1"
SMALL = 10  # a subgroup with fewer positives or negatives than this is flagged
MAX_FPR = 0.1  # partial AUC: specificity from 90%
SPECIFICITIES = (0.9, 0.95)  # the best sensitivity that keeps these (AIROGS: 0.95)
PLACES = 6  # decimals kept in metrics.json


@dataclass
class Scorer:
    """One model (or a file of predictions made elsewhere) and its scored units."""

    name: str
    version: str
    units: list[Unit]
    points: dict[str, Point]
    labels: list[str]


@dataclass
class Series:
    """One scorer's cases of one label: what the plots need besides the numbers."""

    scores: np.ndarray
    truths: np.ndarray
    clusters: np.ndarray
    keys: list[str]  # the units'
    units: list[Unit]
    label_keys: list[str] = field(default_factory=list)  # their keys in the labels file


@dataclass
class Truth:
    """The reference standard by unit key: each label 1, 0 or None (unknown), and the
    labels file's own subgroup columns."""

    values: dict[str, dict[str, int | None]]
    groups: dict[str, dict[str, str]] = field(default_factory=dict)
    subgroup_columns: tuple[str, ...] = ()
    label_like: tuple[str, ...] = ()  # columns of 1/0 that are no label of the model


def series(scorer: Scorer, label: str, truth: Truth, keys: Mapping[str, str]) -> Series:
    """The units of ``scorer`` with a known value of ``label`` (``keys``: unit key ->
    its key in the labels file)."""
    chosen = [
        u
        for u in scorer.units
        if u.key in keys
        and truth.values.get(keys[u.key], {}).get(label) is not None
        and label in u.scores
        and not math.isnan(u.scores[label])
    ]
    return Series(
        np.array([u.scores[label] for u in chosen], dtype=np.float64),
        np.array([truth.values[keys[u.key]][label] for u in chosen], dtype=np.int64),
        np.array([u.patient for u in chosen]),
        [u.key for u in chosen],
        chosen,
        [keys[u.key] for u in chosen],
    )


def label_metrics(
    s: Series, points: Sequence[Point], *, seed: int, resamples: int
) -> dict[str, Any]:
    n, positives = len(s.truths), int(s.truths.sum())
    found: dict[str, Any] = {
        "n": n,
        "positives": positives,
        "negatives": n - positives,
        "patients": int(np.unique(s.clusters).size) if n else 0,
        "prevalence": _interval(m.wilson(positives, n)) if n else None,
    }
    found["auroc"] = _try(lambda: _auroc(s, seed, resamples))
    found["auprc"] = _try(lambda: m.average_precision(s.scores, s.truths))
    found["partial_auroc"] = _try(
        lambda: {
            "max_fpr": MAX_FPR,
            "value": m.partial_auroc(s.scores, s.truths, MAX_FPR),
            "standardised": m.partial_auroc(s.scores, s.truths, MAX_FPR, standardised=True),
        }
    )
    found["sensitivity_at_specificity"] = _try(
        lambda: {
            str(level): m.sensitivity_at_specificity(s.scores, s.truths, level)
            for level in SPECIFICITIES
        }
    )
    found["operating_points"] = [_at(s, p) for p in points]
    found["brier"] = m.brier(s.scores, s.truths) if n else None
    found["calibration"] = _try(lambda: _calibration(s))
    return found


def _auroc(s: Series, seed: int, resamples: int) -> dict[str, Any]:
    interval, variance = m.delong(s.scores, s.truths)
    boot = m.bootstrap_auroc(s.scores, s.truths, s.clusters, resamples=resamples, seed=seed)
    return {
        "value": interval.value,
        "delong": {"low": interval.low, "high": interval.high, "se": math.sqrt(variance)},
        "bootstrap": {
            "low": boot.low,
            "high": boot.high,
            "resamples": resamples,
            "clustered_by": "patient",
        },
    }


def _at(s: Series, point: Point) -> dict[str, Any]:
    found: dict[str, Any] = {"threshold": point.threshold, "source": point.source}
    try:
        at = m.at_threshold(s.scores, s.truths, point.threshold)
    except m.NotEstimable as exc:
        return found | {"not_estimable": str(exc)}
    return found | {
        "sensitivity": _interval(at.sensitivity),
        "specificity": _interval(at.specificity),
        "ppv": None if at.ppv is None else _interval(at.ppv),
        "npv": None if at.npv is None else _interval(at.npv),
        "counts": at.counts,
    }


def _calibration(s: Series) -> dict[str, Any]:
    error, bins = m.calibration(s.scores, s.truths)
    return {
        "ece": error,
        "bins": [
            {
                "low": b.low,
                "high": b.high,
                "count": b.count,
                "mean_probability": None if b.count == 0 else b.mean_probability,
                "observed": None if b.observed is None else _interval(b.observed),
            }
            for b in bins
        ],
    }


def subgroup_metrics(
    s: Series, groups: Mapping[str, Sequence[str]], points: Sequence[Point]
) -> dict[str, Any]:
    """Per subgroup column, per value: n, positives, AUROC (DeLong) and the calls at
    the operating points; ``small`` when either class has fewer than :data:`SMALL`."""
    found: dict[str, Any] = {}
    for column, values in groups.items():
        per: dict[str, Any] = {}
        for value in sorted(set(values)):
            inside = np.array([v == value for v in values], dtype=bool)
            part = Series(
                s.scores[inside],
                s.truths[inside],
                s.clusters[inside],
                [k for k, keep in zip(s.keys, inside, strict=True) if keep],
                [u for u, keep in zip(s.units, inside, strict=True) if keep],
                [k for k, keep in zip(s.label_keys, inside, strict=True) if keep],
            )
            positives = int(part.truths.sum())
            negatives = int(part.truths.size) - positives
            per[value] = {
                "n": int(part.truths.size),
                "positives": positives,
                "negatives": negatives,
                "small": positives < SMALL or negatives < SMALL,
                "auroc": _try(functools.partial(_delong_only, part)),
                "operating_points": [_at(part, p) for p in points],
            }
        found[column] = per
    return found


def _delong_only(s: Series) -> dict[str, float]:
    interval, _ = m.delong(s.scores, s.truths)
    return {"value": interval.value, "low": interval.low, "high": interval.high}


def compare(
    first: Series, second: Series, first_point: Point | None, second_point: Point | None
) -> dict[str, Any]:
    """Two scorers on the units both scored with a known label: paired by their key in
    the labels file (a model's images and a file of scores made elsewhere), or by the
    unit when labels name several units (two models on the same images)."""
    by_labels = all(len(set(s.label_keys)) == len(s.label_keys) for s in (first, second))
    first_keys = first.label_keys if by_labels else first.keys
    second_keys = second.label_keys if by_labels else second.keys
    common = sorted(set(first_keys) & set(second_keys))
    a = dict(zip(first_keys, first.scores, strict=True))
    b = dict(zip(second_keys, second.scores, strict=True))
    truth = dict(zip(first_keys, first.truths, strict=True))
    x = np.array([a[k] for k in common])
    y = np.array([b[k] for k in common])
    t = np.array([truth[k] for k in common])
    found: dict[str, Any] = {"n": len(common)}

    def paired() -> dict[str, Any]:
        test = m.paired_delong(x, y, t)
        return {"difference": _interval(test.difference), "z": test.z, "p": test.p}

    found["auroc_difference"] = _try(paired)
    if first_point is not None and second_point is not None and common:
        only_first, only_second, p = m.mcnemar(
            x >= first_point.threshold, y >= second_point.threshold, t
        )
        found["mcnemar"] = {
            "thresholds": [first_point.threshold, second_point.threshold],
            "only_first_right": only_first,
            "only_second_right": only_second,
            "p": p,
        }
    return found


def _interval(i: m.Interval) -> dict[str, float]:
    return {"value": i.value, "low": i.low, "high": i.high}


def _try(compute: Callable[[], Any]) -> Any:
    try:
        return compute()
    except m.NotEstimable as exc:
        return {"not_estimable": str(exc)}


def rounded(value: Any) -> Any:
    """Floats to :data:`PLACES` decimals (NaN and infinities as None), recursively: what
    ``metrics.json`` holds, the same on every machine that computes the same values."""
    if isinstance(value, float | np.floating):
        number = float(value)
        return None if not math.isfinite(number) else round(number, PLACES) + 0.0
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value
