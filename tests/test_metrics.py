"""The evaluation statistics against independent references: scikit-learn for AUROC,
AUPRC, ROC curves, partial AUC and the Brier score; statsmodels for Wilson and
Clopper-Pearson intervals and McNemar's exact test; Hanley & McNeil's (1982) 109 CT
ratings for the AUROC; and DeLong's (1988) structural components computed the long
way, pair by pair."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint

from inference.evaluate import metrics as m

# Hanley & McNeil (1982), Table 1: 109 CT images rated 1 (definitely normal) to 5
# (definitely abnormal); the area under the ROC curve is 0.893.
_NORMAL = [1] * 33 + [2] * 6 + [3] * 6 + [4] * 11 + [5] * 2
_ABNORMAL = [1] * 3 + [2] * 2 + [3] * 2 + [4] * 11 + [5] * 33
CT_SCORES = np.asarray(_NORMAL + _ABNORMAL, dtype=np.float64)
CT_LABELS = np.asarray([0] * len(_NORMAL) + [1] * len(_ABNORMAL))


def _cases(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(labels * 1.2, 1.0)
    if ties:
        scores = np.round(scores, 1)
    return scores, labels


def test_the_auroc_of_hanley_and_mcneils_ct_ratings_is_0_893() -> None:
    assert m.auroc(CT_SCORES, CT_LABELS) == pytest.approx(0.893, abs=5e-4)
    interval, variance = m.delong(CT_SCORES, CT_LABELS)
    # Hanley & McNeil give a standard error of 0.032 by their approximation; DeLong's
    # estimate of the same area is within a few thousandths of it.
    assert math.sqrt(variance) == pytest.approx(0.032, abs=0.004)
    assert interval.low < 0.893 < interval.high


def _delong_long_way(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988): psi(X, Y) = 1 if X > Y, 1/2 if equal, 0 below; V10 and V01
    the mean psi of each case against the other class."""
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (
        positives[:, None] == negatives[None, :]
    )
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / positives.size + v01.var(ddof=1) / negatives.size
    return float(psi.mean()), float(variance)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_auroc_and_delong_variance_match_references(seed: int, ties: bool) -> None:
    scores, labels = _cases(seed, ties=ties)
    assert m.auroc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    area, variance = _delong_long_way(scores[labels == 1], scores[labels == 0])
    interval, got = m.delong(scores, labels)
    assert interval.value == pytest.approx(area, abs=1e-12)
    assert got == pytest.approx(variance, rel=1e-9)
    half = 1.959963984540054 * math.sqrt(variance)
    assert (interval.low, interval.high) == pytest.approx((area - half, area + half), abs=1e-9)


def test_paired_delong_matches_its_definition_and_finds_a_better_model() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 400)
    strong = rng.normal(labels * 2.0, 1.0)
    weak = strong + rng.normal(0, 2.0, labels.size)
    test = m.paired_delong(strong, weak, labels)
    # The long way: the covariance of the two models' structural components.
    pos, neg = labels == 1, labels == 0
    comps = []
    for s in (strong, weak):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    s10 = np.cov(np.vstack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    cov = s10 / pos.sum() + s01 / neg.sum()
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert test.difference.value == pytest.approx(comps[0][2] - comps[1][2], abs=1e-12)
    assert test.z == pytest.approx((comps[0][2] - comps[1][2]) / se, rel=1e-9)
    assert test.p < 1e-3
    # The same model against itself: no difference.
    same = m.paired_delong(strong, strong, labels)
    assert (same.difference.value, same.p) == (0.0, 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_average_precision_partial_auc_and_brier_match_scikit_learn(seed: int) -> None:
    scores, labels = _cases(seed, ties=True)
    fpr, tpr, thresholds = m.roc_curve(scores, labels)
    want_fpr, want_tpr, want_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)
    np.testing.assert_allclose(thresholds[1:], want_thresholds[1:])
    assert m.average_precision(scores, labels) == pytest.approx(
        sk.average_precision_score(labels, scores), abs=1e-12
    )
    for max_fpr in (0.1, 0.25, 0.5):
        assert m.partial_auroc(scores, labels, max_fpr, standardised=True) == pytest.approx(
            sk.roc_auc_score(labels, scores, max_fpr=max_fpr), abs=1e-12
        )
    assert m.partial_auroc(scores, labels, 1.0) == pytest.approx(m.auroc(scores, labels))
    probabilities = 1 / (1 + np.exp(-scores))
    assert m.brier(probabilities, labels) == pytest.approx(
        sk.brier_score_loss(labels, probabilities), abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 500), fraction=st.floats(0, 1), level=st.sampled_from([0.9, 0.95]))
def test_wilson_and_clopper_pearson_match_statsmodels(
    total: int, fraction: float, level: float
) -> None:
    successes = round(total * fraction)
    for ours, method in ((m.wilson, "wilson"), (m.clopper_pearson, "beta")):
        interval = ours(successes, total, level)
        low, high = proportion_confint(successes, total, alpha=1 - level, method=method)
        assert interval.value == pytest.approx(successes / total)
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-9)


def test_calls_at_an_operating_point() -> None:
    scores = np.asarray([0.9, 0.8, 0.4, 0.7, 0.2, 0.1, 0.6, 0.3])
    labels = np.asarray([1, 1, 1, 0, 0, 0, 0, 1])
    called = m.at_threshold(scores, labels, 0.5)
    assert called.counts == {"TP": 2, "FN": 2, "FP": 2, "TN": 2}
    assert called.sensitivity.value == 0.5
    assert called.specificity.value == 0.5
    assert called.ppv is not None
    assert called.ppv.value == 0.5
    nothing = m.at_threshold(scores, labels, 2.0)
    assert nothing.ppv is None  # nothing called positive: no PPV, not 0
    assert nothing.sensitivity.value == 0.0


def test_mcnemar_matches_statsmodels() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    first = np.where(rng.random(200) < 0.85, labels, 1 - labels)
    second = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    only_first, only_second, p = m.mcnemar(first, second, labels)
    right1, right2 = first == labels, second == labels
    table = [
        [int((right1 & right2).sum()), only_first],
        [only_second, int((~right1 & ~right2).sum())],
    ]
    assert p == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-9)


def test_the_bootstrap_resamples_patients_not_images() -> None:
    """Every case copied three times under the same patient is the same evidence as the
    case once: the patient bootstrap gives the same interval (the same draws), where an
    image bootstrap would be three times too sure."""
    scores, labels = _cases(11, n=120)
    patients = np.arange(scores.size).astype(str)
    once = m.bootstrap_auroc(scores, labels, patients, resamples=300, seed=5)
    thrice = m.bootstrap_auroc(
        np.repeat(scores, 3), np.repeat(labels, 3), np.repeat(patients, 3), resamples=300, seed=5
    )
    assert (thrice.value, thrice.low, thrice.high) == pytest.approx(
        (once.value, once.low, once.high), abs=1e-12
    )
    assert once.low < once.value < once.high
    images = m.bootstrap_auroc(
        np.repeat(scores, 3),
        np.repeat(labels, 3),
        np.arange(scores.size * 3).astype(str),
        resamples=300,
        seed=5,
    )
    assert images.high - images.low < 0.75 * (once.high - once.low)


def test_calibration_bins_and_expected_error() -> None:
    rng = np.random.default_rng(1)
    probabilities = rng.random(5000)
    labels = (rng.random(5000) < probabilities).astype(int)  # calibrated by construction
    error, bins = m.calibration(probabilities, labels, bins=10)
    assert error < 0.03
    assert sum(b.count for b in bins) == 5000
    for b in bins:
        assert b.observed is not None
        assert b.observed.low <= (b.low + b.high) / 2 + 0.06
        assert b.observed.high >= (b.low + b.high) / 2 - 0.06
    overconfident, _ = m.calibration(np.where(probabilities > 0.5, 0.99, 0.01), labels)
    assert overconfident > 0.2


def test_what_cannot_be_estimated_says_so() -> None:
    with pytest.raises(m.NotEstimable):
        m.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        m.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(m.NotEstimable):
        m.wilson(0, 0)


def test_sensitivity_at_a_specificity_is_the_best_threshold_that_keeps_it() -> None:
    """AIROGS's definition: the highest sensitivity among thresholds with specificity at
    least the target. Ten negatives: 95% allows no false positive, 90% allows one."""
    negatives = [0.05 * n for n in range(10)]  # 0.0 .. 0.45
    positives = [0.42, 0.5, 0.6, 0.7]
    scores = negatives + positives
    labels = [0] * 10 + [1] * 4
    assert m.sensitivity_at_specificity(scores, labels, 1.0) == pytest.approx(0.75)
    assert m.sensitivity_at_specificity(scores, labels, 0.95) == pytest.approx(0.75)
    assert m.sensitivity_at_specificity(scores, labels, 0.9) == pytest.approx(1.0)
    fpr, tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    for target in (0.8, 0.9, 0.95):
        wanted = tpr[1 - fpr >= target - 1e-12].max()
        assert m.sensitivity_at_specificity(scores, labels, target) == pytest.approx(wanted)
