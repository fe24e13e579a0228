"""Paired bootstrap of a metric difference between two scorers of the same examples.

"Is arm A better than arm B on this test split?" On a test split of a few hundred
lesions a macro-AUC moves by several points from one draw of images to another,
so a table of point estimates cannot say whether a gap is real. The paired
bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 16)
resamples the examples with replacement, scores both arms on the same resample and
takes percentiles of the difference: the two arms' errors on shared hard examples
cancel, which makes it much tighter than comparing two separate intervals.

Metrics are macro averages over classes of `classification.roc_auc` or
`classification.average_precision` on class indicators (one-hot for single-label,
multi-hot for multi-label), skipping a class that a resample leaves without
positives (or negatives, for AUC), as `classification_metrics` does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mimjax.evaluators import classification

METRICS = {"auc_macro": classification.roc_auc, "ap_macro": classification.average_precision}


class UndefinedMetricError(ValueError):
    """The metric is undefined on every resample (e.g. a test split without positives)."""


@dataclasses.dataclass(frozen=True)
class Difference:
    """metric(A) - metric(B) on the full set, and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    num_resamples: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_difference(
    labels,
    scores_a,
    scores_b,
    *,
    multilabel: bool,
    metric: str = "auc_macro",
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """metric(scores_a) - metric(scores_b) on (labels, scores) of the same N examples,
    with a `confidence` percentile interval from `num_resamples` paired resamples."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if scores_a.shape != scores_b.shape or scores_a.ndim != 2:
        raise ValueError(
            f"both arms need (N, C) scores of the same examples, got {scores_a.shape} "
            f"and {scores_b.shape}")
    if len(labels) != len(scores_a):
        raise ValueError(f"{len(labels)} labels for {len(scores_a)} scored examples")
    indicator, scores_a = classification.class_indicator(labels, scores_a, multilabel=multilabel)
    _, scores_b = classification.class_indicator(labels, scores_b, multilabel=multilabel)
    fn = METRICS[metric]

    def difference(rows) -> float:
        y = indicator[rows]
        return (classification.macro_average(fn, y, scores_a[rows])
                - classification.macro_average(fn, y, scores_b[rows]))

    n = len(indicator)
    rng = np.random.default_rng(seed)
    resampled = np.array([difference(rng.integers(0, n, n)) for _ in range(int(num_resamples))])
    resampled = resampled[~np.isnan(resampled)]
    if not len(resampled):
        raise UndefinedMetricError(
            f"{metric} is undefined on every resample: the {n} examples have too few "
            "positives (and negatives) per class; evaluate on a larger split")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Difference(difference(np.arange(n)), float(low), float(high), confidence,
                      len(resampled))
