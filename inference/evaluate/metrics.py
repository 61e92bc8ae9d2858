"""Diagnostic accuracy with its uncertainty, as the reporting checklists ask for it.

AUROC with DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988, computed with
midranks as Sun & Xu 2014 do) and with a bootstrap that resamples patients, not images
(images of one patient are not independent); the paired DeLong test of two models on
the same cases; AUPRC (average precision), partial AUC over a false-positive range
(raw, and standardised as McClish 1989 does); sensitivity, specificity, PPV and NPV at an
operating point with Wilson intervals; McNemar's exact test of two models' calls;
Brier score and calibration (expected calibration error, and reliability bins with
Clopper-Pearson intervals).

Pure functions of scores (higher: more likely positive) and 0/1 labels; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats

Array = np.ndarray


class NotEstimable(ValueError):
    """The metric needs what the data do not have (both classes, a positive call)."""


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval."""

    value: float
    low: float
    high: float


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def _split(scores: Sequence[float] | Array, labels: Sequence[int] | Array) -> tuple[Array, Array]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be one value per case")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positives, negatives = s[y == 1], s[y == 0]
    if positives.size == 0 or negatives.size == 0:
        raise NotEstimable("both positive and negative cases are needed")
    return positives, negatives


def _midranks(values: Array) -> Array:
    """Ranks from 1, tied values sharing their mean rank."""
    return np.asarray(stats.rankdata(values, method="average"), dtype=np.float64)


def _components(positives: Array, negatives: Array) -> tuple[float, Array, Array]:
    """AUROC and DeLong's structural components: for each positive, the fraction of
    negatives it outranks (ties half); for each negative, the fraction of positives
    that outrank it."""
    m, n = positives.size, negatives.size
    together = _midranks(np.concatenate([positives, negatives]))
    within_positive = _midranks(positives)
    within_negative = _midranks(negatives)
    v10 = (together[:m] - within_positive) / n
    v01 = 1.0 - (together[m:] - within_negative) / m
    return float(v10.mean()), v10, v01


def auroc(scores: Sequence[float] | Array, labels: Sequence[int] | Array) -> float:
    """Area under the ROC curve: the probability that a positive case scores above a
    negative one, ties counting half (Mann-Whitney)."""
    positives, negatives = _split(scores, labels)
    return _components(positives, negatives)[0]


def delong(
    scores: Sequence[float] | Array, labels: Sequence[int] | Array, level: float = 0.95
) -> tuple[Interval, float]:
    """AUROC with DeLong's confidence interval (normal, clipped to [0, 1]), and its
    variance."""
    positives, negatives = _split(scores, labels)
    area, v10, v01 = _components(positives, negatives)
    variance = _variance(v10, v01)
    half = _z(level) * math.sqrt(variance)
    return Interval(area, max(0.0, area - half), min(1.0, area + half)), variance


def _variance(v10: Array, v01: Array) -> float:
    s10 = float(np.var(v10, ddof=1)) if v10.size > 1 else 0.0
    s01 = float(np.var(v01, ddof=1)) if v01.size > 1 else 0.0
    return s10 / v10.size + s01 / v01.size


@dataclass(frozen=True)
class PairedTest:
    """Two models' AUROC on the same cases: the difference (first minus second), its
    interval, and the two-sided p-value of "no difference"."""

    difference: Interval
    z: float
    p: float


def paired_delong(
    first: Sequence[float] | Array,
    second: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    level: float = 0.95,
) -> PairedTest:
    """DeLong's test for two correlated ROC curves (the same cases, two models)."""
    p1, n1 = _split(first, labels)
    p2, n2 = _split(second, labels)
    a1, v10_1, v01_1 = _components(p1, n1)
    a2, v10_2, v01_2 = _components(p2, n2)
    s10 = np.cov(np.vstack([v10_1, v10_2]))
    s01 = np.cov(np.vstack([v01_1, v01_2]))
    covariance = s10 / v10_1.size + s01 / v01_1.size
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    difference = a1 - a2
    if variance <= 0:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
        p = 1.0 if difference == 0 else 0.0
        return PairedTest(Interval(difference, difference, difference), z, p)
    se = math.sqrt(variance)
    z = difference / se
    p = 2 * (1 - NormalDist().cdf(abs(z)))
    half = _z(level) * se
    return PairedTest(Interval(difference, difference - half, difference + half), z, p)


def bootstrap_auroc(
    scores: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    clusters: Sequence[str] | Array,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """AUROC with a percentile interval from resampling clusters (patients) with
    replacement, each drawn cluster bringing all its cases; resamples without both
    classes are drawn again."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    area = auroc(s, y)
    found = [auroc(s[drawn], y[drawn]) for drawn in _resampled(y, clusters, resamples, seed)]
    if len(found) < resamples:
        raise NotEstimable("too few clusters of each class to resample")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(found, [tail, 100 - tail])
    return Interval(area, float(low), float(high))


def _resampled(
    labels: Array, clusters: Sequence[str] | Array, resamples: int, seed: int
) -> Iterator[Array]:
    """Case indices of up to ``resamples`` draws of clusters with replacement, each
    drawn cluster bringing all its cases; draws without both classes are drawn again,
    up to 20 attempts per resample."""
    keys, index = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(index == k) for k in range(keys.size)]
    rng = np.random.default_rng(seed)
    given = attempts = 0
    while given < resamples and attempts < 20 * resamples:
        attempts += 1
        drawn = np.concatenate([members[k] for k in rng.integers(0, keys.size, keys.size)])
        if labels[drawn].min() == labels[drawn].max():
            continue
        given += 1
        yield drawn


def roc_curve(
    scores: Sequence[float] | Array, labels: Sequence[int] | Array
) -> tuple[Array, Array, Array]:
    """False-positive rates, true-positive rates and thresholds (decreasing, the first
    above every score), one point per distinct score."""
    positives, negatives = _split(scores, labels)
    s = np.concatenate([positives, negatives])
    y = np.concatenate([np.ones(positives.size), np.zeros(negatives.size)])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last case of each score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / positives.size]
    fpr = np.r_[0.0, fp / negatives.size]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def average_precision(scores: Sequence[float] | Array, labels: Sequence[int] | Array) -> float:
    """Area under the precision-recall curve as the step sum of precision at each
    threshold weighted by the gain in recall (no interpolation)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    positives, negatives = _split(scores, labels)
    tp, fp = tpr * positives.size, fpr * negatives.size
    called = tp + fp
    precision = np.divide(tp, called, out=np.ones_like(tp), where=called > 0)
    return float(np.sum(np.diff(tpr) * precision[1:]))


def partial_auroc(
    scores: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    max_fpr: float,
    *,
    standardised: bool = False,
) -> float:
    """Area under the ROC curve for false-positive rates up to ``max_fpr`` (specificity
    from 1 - max_fpr up: 0.1 is AIROGS's 90-100%), the curve interpolated linearly at
    the cut; ``standardised`` maps it to [0.5, 1] as McClish (1989) does."""
    if not 0 < max_fpr <= 1:
        raise ValueError("max_fpr must be in (0, 1]")
    fpr, tpr, _ = roc_curve(scores, labels)
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    x = np.r_[fpr[:stop], max_fpr]
    y = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    if not standardised:
        return area
    least, most = max_fpr**2 / 2, max_fpr
    return 0.5 * (1 + (area - least) / (most - least))


def wilson(successes: int, total: int, level: float = 0.95) -> Interval:
    """A proportion with Wilson's score interval (no continuity correction)."""
    if total <= 0:
        raise NotEstimable("no cases")
    z = _z(level)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson(successes: int, total: int, level: float = 0.95) -> Interval:
    """A proportion with the exact (Clopper-Pearson) interval."""
    if total <= 0:
        raise NotEstimable("no cases")
    alpha = 1 - level
    low = (
        0.0
        if successes == 0
        else float(stats.beta.ppf(alpha / 2, successes, total - successes + 1))
    )
    high = (
        1.0
        if successes == total
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, total - successes))
    )
    return Interval(successes / total, low, high)


@dataclass(frozen=True)
class AtThreshold:
    """The calls at an operating point (score >= threshold is positive)."""

    threshold: float
    sensitivity: Interval
    specificity: Interval
    ppv: Interval | None  # None: nothing called positive
    npv: Interval | None  # None: nothing called negative
    counts: dict[str, int]


def at_threshold(
    scores: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    threshold: float,
    level: float = 0.95,
) -> AtThreshold:
    positives, negatives = _split(scores, labels)
    tp = int((positives >= threshold).sum())
    fn = positives.size - tp
    fp = int((negatives >= threshold).sum())
    tn = negatives.size - fp
    return AtThreshold(
        threshold,
        wilson(tp, tp + fn, level),
        wilson(tn, tn + fp, level),
        wilson(tp, tp + fp, level) if tp + fp else None,
        wilson(tn, tn + fn, level) if tn + fn else None,
        {"TP": tp, "FP": fp, "TN": tn, "FN": fn},
    )


def mcnemar(
    first: Sequence[bool] | Array, second: Sequence[bool] | Array, labels: Sequence[int] | Array
) -> tuple[int, int, float]:
    """McNemar's exact test of two models' calls on the same cases: the cases only the
    first got right, those only the second got right, and the two-sided p-value (a
    binomial test of the discordant cases)."""
    truth = np.asarray(labels).astype(bool)
    right_first = np.asarray(first).astype(bool) == truth
    right_second = np.asarray(second).astype(bool) == truth
    only_first = int((right_first & ~right_second).sum())
    only_second = int((~right_first & right_second).sum())
    discordant = only_first + only_second
    if discordant == 0:
        return only_first, only_second, 1.0
    p = float(stats.binomtest(only_first, discordant, 0.5).pvalue)
    return only_first, only_second, p


def brier(scores: Sequence[float] | Array, labels: Sequence[int] | Array) -> float:
    """Mean squared difference between the probability and the outcome."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean((s - y) ** 2))


@dataclass(frozen=True)
class Bin:
    """Cases whose probability fell in [low, high): their mean probability and the
    observed fraction positive, with its exact interval."""

    low: float
    high: float
    count: int
    mean_probability: float
    observed: Interval | None  # None: an empty bin


def calibration(
    scores: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    bins: int = 10,
    level: float = 0.95,
) -> tuple[float, list[Bin]]:
    """Expected calibration error (the count-weighted mean gap between mean probability
    and observed fraction over equal-width bins; 1.0 falls in the last) and the bins."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    found = []
    error = 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if count == 0:
            found.append(Bin(float(edges[b]), float(edges[b + 1]), 0, float("nan"), None))
            continue
        mean = float(s[inside].mean())
        observed = clopper_pearson(int(y[inside].sum()), count, level)
        error += count / s.size * abs(mean - observed.value)
        found.append(Bin(float(edges[b]), float(edges[b + 1]), count, mean, observed))
    return error, found


def roc_band(
    scores: Sequence[float] | Array,
    labels: Sequence[int] | Array,
    clusters: Sequence[str] | Array,
    grid: Array,
    *,
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[Array, Array]:
    """Pointwise percentile band of the true-positive rate at the false-positive rates
    of ``grid``, from resampling clusters (patients) as :func:`bootstrap_auroc` does."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    _split(s, y)
    curves: list[Array] = []
    for drawn in _resampled(y, clusters, resamples, seed):
        fpr, tpr, _ = roc_curve(s[drawn], y[drawn])
        curves.append(np.interp(grid, fpr, tpr))
    if not curves:
        raise NotEstimable("too few clusters of each class to resample")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.vstack(curves), [tail, 100 - tail], axis=0)
    return low, high


def sensitivity_at_specificity(
    scores: Sequence[float] | Array, labels: Sequence[int] | Array, specificity: float
) -> float:
    """The highest sensitivity of a threshold whose specificity is at least
    ``specificity``: AIROGS's "sensitivity at 95% specificity" (no interpolation)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(tpr[1 - fpr >= specificity - 1e-12].max())
