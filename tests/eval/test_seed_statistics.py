"""The ablation's statistics against values worked out by hand or from printed t tables."""
import math

import numpy as np
import pytest

from megatron_evomoe.eval.seed_statistics import (mean_std, paired_bootstrap, paired_t_test,
                                                  regularized_incomplete_beta, t_two_sided_p)


@pytest.mark.parametrize("t, df, p", [
    (1.0, 1, 0.5),                    # Cauchy: P(|T| > 1) = 2 * (1/2 - atan(1)/pi) = 1/2
    (2.776445, 4, 0.05),              # the t table's two-sided 5% points
    (2.570582, 5, 0.05),
    (4.604095, 4, 0.01),
    (1.959964, 1e7, 0.05),            # df -> infinity: the normal's
])
def test_t_p_value_matches_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, rel=1e-5)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_t_p_value_for_two_degrees_of_freedom_in_closed_form(t):
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


def test_incomplete_beta_special_cases():
    assert regularized_incomplete_beta(0.3, 1.0, 1.0) == pytest.approx(0.3, rel=1e-12)  # uniform CDF
    assert regularized_incomplete_beta(0.3, 2.0, 1.0) == pytest.approx(0.09, rel=1e-12)  # x^a for b = 1
    assert regularized_incomplete_beta(0.8, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.8)))


def test_paired_t_test_by_hand():
    # differences 0.02, 0.01, 0.04: mean 0.07/3, sample sd sqrt(7)/3 * 0.01 -> t = sqrt(7), df 2
    r = paired_t_test([0.70, 0.72, 0.74], [0.68, 0.71, 0.70])
    assert r.mean_difference == pytest.approx(0.07 / 3)
    assert r.t == pytest.approx(math.sqrt(7))
    assert r.p_value == pytest.approx(1 - math.sqrt(7) / 3)  # = 0.1181
    assert r.num_pairs == 3


def test_paired_t_test_constant_differences_and_errors():
    assert paired_t_test([0.5, 0.6], [0.5, 0.6]).p_value == 1.0
    assert paired_t_test([0.6, 0.7], [0.5, 0.6]).p_value == 0.0
    with pytest.raises(ValueError, match="2 values against 3"):
        paired_t_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_test([1], [2])


def test_mean_std():
    r = mean_std([1.0, 2.0, 4.0])
    assert (r.mean, r.num_values) == (pytest.approx(7 / 3), 3)
    assert r.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert math.isnan(mean_std([3.0]).std)


def test_bootstrap_extremes_and_a_known_gap():
    ones, zeros = np.ones((2, 50)), np.zeros((2, 50))
    assert paired_bootstrap(ones, zeros, 500).p_value == 0.0  # every resample favours a
    same = paired_bootstrap(ones, ones, 500)
    assert (same.difference, same.p_value, same.low, same.high) == (0.0, 1.0, 0.0, 0.0)
    # a right on 60 of 100 questions, b on the first 50 of them: the gap is 0.10; per question the
    # difference is 1 on 10 questions, else 0, so a resample's gap is Binomial(100, 0.1) / 100:
    # mean 0.10, sd 0.03, and P(gap <= 0) = 0.9^100 ~ 2.7e-5, i.e. no resample of 4000 at or below zero
    a = np.r_[np.ones(60), np.zeros(40)]
    b = np.r_[np.ones(50), np.zeros(50)]
    r = paired_bootstrap(a, b, 4000, seed=1)
    assert r.difference == pytest.approx(0.10)
    assert r.p_value == 0.0
    # the binomial's own 2.5% and 97.5% points are 5 and 16 of 100 (P(X <= 4) = 0.024, P(X <= 16) = 0.979)
    assert 0.04 <= r.low <= 0.05 and 0.15 <= r.high <= 0.17
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(np.ones((2, 5)), np.ones((3, 5)))
