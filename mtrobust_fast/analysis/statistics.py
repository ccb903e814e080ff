"""Uncertainty of the numbers a user reads: bootstrap intervals over images and paired tests between two models
or two attacks evaluated on the same images.

scipy.stats does the resampling (``bootstrap``, percentile intervals), the paired permutation test
(``permutation_test`` with ``permutation_type="samples"``: the sign of each pair's difference is flipped at
random, exact when there are few pairs) and the exact McNemar test (``binomtest`` on the discordant pairs).
Values that are NaN (e.g. an image whose relative vulnerability is undefined) are left out; a pair is kept
only when both of its values are finite. Torch-free.
"""
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def _finite(values):
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def mean_interval(values, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0):
    """(mean, low, high): the mean of the finite ``values`` and its percentile-bootstrap interval. With fewer
    than two values, or values all equal, the interval is the mean itself (NaN when there is no value)."""
    values = _finite(values)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return mean, mean, mean
    result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def statistic_interval(sample_stats, scores, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0):
    """Percentile-bootstrap intervals of dataset-level metrics computed from summed statistics (mIoU from a
    confusion matrix, accuracy from counts): ``sample_stats`` ``[N, K]`` holds each item's statistics,
    ``scores(summed [K] array) -> {metric: float}`` turns a sum into metrics. Resampling draws N items with
    replacement (each draw a multinomial count per item, so a resample's sum is ``counts @ sample_stats``) and
    recomputes every metric. Returns ``{metric: (low, high)}`` (NaN bounds for a metric undefined in over half
    the resamples; an undefined resample is left out otherwise)."""
    sample_stats = np.asarray(sample_stats, dtype=np.float64)
    n = sample_stats.shape[0]
    if n == 0:
        return {}
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    draws = [scores(summed) for summed in counts @ sample_stats.reshape(n, -1)]
    tail = 100 * (1 - confidence) / 2
    out = {}
    for metric in draws[0]:
        values = np.array([d[metric] for d in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[metric] = ((math.nan, math.nan) if values.size * 2 < resamples else
                       (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))))
    return out


def paired_difference(a, b, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0):
    """Compare two measurements of the same items (e.g. per-image relative vulnerabilities of two models):
    ``{"mean_a", "mean_b", "difference" (mean of a - b), "low", "high" (its bootstrap interval), "p" (two-sided
    paired permutation test of a zero mean difference), "pairs"}``, over the pairs where both are finite."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per item each, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {"pairs": int(keep.sum()), "mean_a": float(a.mean()) if a.size else math.nan,
           "mean_b": float(b.mean()) if b.size else math.nan}
    difference, low, high = mean_interval(a - b, confidence, resamples, seed)
    out.update(difference=difference, low=low, high=high)
    if a.size < 2 or np.all(a == b):
        out["p"] = 1.0 if a.size else math.nan
        return out
    test = stats.permutation_test((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), vectorized=True,
                                  permutation_type="samples", n_resamples=resamples, alternative="two-sided",
                                  random_state=np.random.default_rng(seed))
    out["p"] = float(test.pvalue)
    return out


def mcnemar(correct_a, correct_b):
    """Exact McNemar test of two classifiers (or attacks) on the same items: ``{"only_a", "only_b" (items only
    that one gets right), "p"}``, the two-sided binomial test of the discordant pairs."""
    a, b = np.asarray(correct_a, dtype=bool).ravel(), np.asarray(correct_b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must hold one value per item each, got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p": p}


def verdict(comparison, lower_is_better=True, alpha=0.05):
    """One word for a paired comparison of a (the treatment) against b (the reference): "better", "worse" or
    "no significant change" at level ``alpha``."""
    p = comparison["p"]
    if not (p < alpha) or not math.isfinite(comparison["difference"]):
        return "no significant change"
    lower = comparison["difference"] < 0
    return "better" if lower == lower_is_better else "worse"


def format_interval(mean, low, high, digits=3):
    """"0.420 [0.350, 0.500]" ("nan" when undefined)."""
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
