"""Paired bootstrap of metric differences (mimjax.evaluators.bootstrap)."""

import numpy as np
import pytest

from mimjax.evaluators import bootstrap, classification

NAMES = ("a", "b", "c", "d")


def _single_label(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    signal = np.eye(4)[labels]
    return labels, signal, rng


def test_estimate_is_the_full_set_difference_single_and_multilabel():
    labels, signal, rng = _single_label()
    a = signal + rng.normal(0, 0.8, signal.shape)
    b = signal + rng.normal(0, 1.5, signal.shape)
    diff = bootstrap.paired_difference(labels, a, b, multilabel=False, num_resamples=50)
    metric = lambda s: classification.classification_metrics(
        labels, s, multilabel=False, class_names=NAMES)["auc_macro"]
    assert diff.estimate == pytest.approx(metric(a) - metric(b), abs=1e-12)

    multi = (rng.random((150, 5)) < 0.3).astype(int)
    a = multi + rng.normal(0, 0.5, multi.shape)
    b = multi + rng.normal(0, 2.0, multi.shape)
    diff = bootstrap.paired_difference(multi, a, b, multilabel=True, metric="ap_macro",
                                       num_resamples=50)
    ap = lambda s: classification.classification_metrics(
        multi, s, multilabel=True, class_names=tuple("vwxyz"))["ap_macro"]
    assert diff.estimate == pytest.approx(ap(a) - ap(b), abs=1e-12)


def test_identical_arms_give_a_zero_interval():
    labels, signal, rng = _single_label()
    scores = signal + rng.normal(0, 1.0, signal.shape)
    diff = bootstrap.paired_difference(labels, scores, scores.copy(), multilabel=False,
                                       num_resamples=100)
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.excludes_zero()


def test_a_clearly_better_arm_excludes_zero_and_equal_arms_do_not():
    labels, signal, rng = _single_label(n=300)
    better = signal + rng.normal(0, 0.7, signal.shape)
    worse = signal + rng.normal(0, 3.0, signal.shape)
    diff = bootstrap.paired_difference(labels, better, worse, multilabel=False)
    assert diff.low > 0.05 and diff.excludes_zero() and diff.low < diff.estimate < diff.high
    assert diff.num_resamples == 1000 and diff.confidence == 0.95
    # Two scorers of the same quality, independent noise: the interval straddles zero.
    twin = signal + rng.normal(0, 0.7, signal.shape)
    same = bootstrap.paired_difference(labels, better, twin, multilabel=False)
    assert same.low < 0 < same.high
    # Pairing is what makes the interval tight: shared noise cancels.
    shared = rng.normal(0, 1.0, signal.shape)
    paired = bootstrap.paired_difference(labels, signal + shared, 0.9 * signal + shared,
                                         multilabel=False)
    assert paired.high - paired.low < 0.5 * (same.high - same.low)


def test_deterministic_for_a_seed():
    labels, signal, rng = _single_label()
    a, b = signal + rng.normal(0, 1, signal.shape), signal + rng.normal(0, 1, signal.shape)
    first = bootstrap.paired_difference(labels, a, b, multilabel=False, seed=3)
    assert first == bootstrap.paired_difference(labels, a, b, multilabel=False, seed=3)
    assert str(first).startswith(f"{first.estimate:+.3f} [")


def test_bad_inputs_are_named():
    labels, signal, _ = _single_label(n=20)
    with pytest.raises(ValueError, match="same examples"):
        bootstrap.paired_difference(labels, signal, signal[:10], multilabel=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        bootstrap.paired_difference(labels, signal, signal, multilabel=False, metric="f1")
    with pytest.raises(ValueError, match="labels for"):
        bootstrap.paired_difference(labels[:5], signal, signal, multilabel=False)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap.paired_difference(labels, signal, signal, multilabel=False, confidence=95)
    with pytest.raises(ValueError, match="undefined on every resample"):
        bootstrap.paired_difference(np.zeros(20, int), signal, signal, multilabel=False)
