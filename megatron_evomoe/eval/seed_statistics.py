"""Statistics for comparing training variants over seeds and over evaluation questions.

A multi-seed ablation asks two questions of each variant against a baseline:
- over seeds: is the mean of the paired differences (same seed, same data order) away from zero?
  `paired_t_test` answers with Student's t on the differences; its p-value comes from the t
  distribution's CDF, written here through the regularized incomplete beta function so that no SciPy is
  needed (I_x(a, b) evaluated by its continued fraction, modified Lentz's method).
- over questions: is an accuracy gap larger than the questions' sampling noise? `paired_bootstrap`
  resamples question indices with replacement, keeping each question's answers of both variants and all
  seeds together, and returns the two-sided bootstrap p-value and the 95% percentile interval.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class MeanStd(NamedTuple):
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for a single value
    num_values: int


class PairedTest(NamedTuple):
    mean_difference: float  # mean of (a - b)
    t: float
    p_value: float  # two-sided
    num_pairs: int


class BootstrapTest(NamedTuple):
    difference: float  # accuracy of a - accuracy of b on the questions as they are
    low: float  # 2.5th percentile of the resampled differences
    high: float  # 97.5th percentile
    p_value: float  # two-sided; 0.0 means below 1 / num_resamples
    num_resamples: int


def mean_std(values: Sequence[float]) -> MeanStd:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std: no values")
    return MeanStd(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


def _beta_continued_fraction(x: float, a: float, b: float, max_terms: int = 300, eps: float = 1e-15) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1, a, b > 0."""
    assert 0.0 <= x <= 1.0 and a > 0 and b > 0
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b  # the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Student's paired t-test of mean(a - b) = 0; a[i] and b[i] come from the same seed."""
    if len(a) != len(b):
        raise ValueError(f"paired_t_test: {len(a)} values against {len(b)}; each seed needs both")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size < 2:
        raise ValueError(f"paired_t_test: needs at least 2 pairs, got {d.size}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:  # every seed gives the same difference: certain if it is not zero, no evidence if it is
        return PairedTest(mean, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0, int(d.size))
    t = mean / (sd / math.sqrt(d.size))
    return PairedTest(mean, t, t_two_sided_p(t, d.size - 1), int(d.size))


def paired_bootstrap(correct_a, correct_b, num_resamples: int = 10000, seed: int = 0) -> BootstrapTest:
    """Bootstrap over questions of an accuracy difference.

    correct_a, correct_b: [num_seeds, num_questions] (or [num_questions]) of 0/1, the same questions in
    the same order. Each resample draws num_questions question indices with replacement; a drawn question
    brings its answers from every seed of both variants.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: answers of shape {a.shape} against {b.shape}")
    per_question = (a - b).mean(axis=0)  # [num_questions]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_question.size, size=(num_resamples, per_question.size))
    resampled = per_question[idx].mean(axis=1)  # [num_resamples]
    tail = min(float((resampled <= 0).mean()), float((resampled >= 0).mean()))
    low, high = np.percentile(resampled, [2.5, 97.5])
    return BootstrapTest(float(per_question.mean()), float(low), float(high), min(1.0, 2.0 * tail), num_resamples)
