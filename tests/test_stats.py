"""Tests for mtlbench.report.stats against scipy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from mtlbench.report.stats import describe, holm, paired_test


def test_describe_hand_values():
    d = describe([1.0, 2.0, 3.0, 4.0, 10.0])
    # deviations -3,-2,-1,0,6 -> sum of squares 50 -> variance 50/4 = 12.5
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(4.0)
    assert d["std"] == pytest.approx(math.sqrt(12.5))
    half = 2.7764451051977987 * math.sqrt(12.5) / math.sqrt(5)  # t(0.975, 4)
    assert d["ci_low"] == pytest.approx(4.0 - half)
    assert d["ci_high"] == pytest.approx(4.0 + half)


def test_describe_matches_scipy_interval_and_drops_nan():
    x = np.array([0.71, 0.78, np.nan, 0.80, 0.69, 0.75])
    d = describe(x)
    clean = x[~np.isnan(x)]
    lo, hi = st.t.interval(0.95, len(clean) - 1, loc=clean.mean(), scale=st.sem(clean))
    assert d["n"] == 5
    assert d["std"] == pytest.approx(np.std(clean, ddof=1))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi))


def test_describe_small_samples():
    one = describe([0.5])
    assert one["n"] == 1 and one["mean"] == 0.5
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    none = describe([np.nan])
    assert none["n"] == 0 and math.isnan(none["mean"])


def test_paired_test_matches_scipy():
    a = np.array([0.81, 0.77, 0.92, 0.65, 0.70, 0.88, 0.79, 0.84])
    b = np.array([0.78, 0.75, 0.85, 0.66, 0.61, 0.86, 0.70, 0.80])
    r = paired_test(a, b)
    d = a - b
    assert r["n"] == 8
    assert r["mean_diff"] == pytest.approx(d.mean())
    lo, hi = st.t.interval(0.95, 7, loc=d.mean(), scale=st.sem(d))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    assert r["p_wilcoxon"] == pytest.approx(st.wilcoxon(d).pvalue)
    assert r["p_ttest"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    # exact two-sided Wilcoxon with 7 of 8 positive differences, the negative one smallest in rank:
    # W- = 1 -> P(W <= 1) = 2/256 per side -> p = 4/256
    assert r["p_wilcoxon"] == pytest.approx(4 / 256)


def test_paired_test_drops_nan_pairs_and_degenerate_cases():
    r = paired_test([1.0, np.nan, 3.0, 5.0], [0.5, 2.0, np.nan, 4.0])
    assert r["n"] == 2
    assert r["mean_diff"] == pytest.approx(0.75)
    zero = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert zero["n"] == 3 and zero["mean_diff"] == 0.0
    assert math.isnan(zero["p_wilcoxon"]) and math.isnan(zero["p_ttest"])
    single = paired_test([1.0], [0.0])
    assert single["n"] == 1 and math.isnan(single["p_wilcoxon"]) and math.isnan(single["ci_low"])
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0])


def test_holm_hand_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    out = holm([0.01, np.nan, 0.04, 0.03])
    assert math.isnan(out[1])
    assert [out[0], out[2], out[3]] == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_corrected_paired_t_against_its_formula():
    from mtlbench.report.stats import corrected_paired_t

    d = np.array([0.03, 0.01, 0.05, -0.01, 0.02])
    plain = corrected_paired_t(d, 0.0)
    assert plain["p"] == pytest.approx(st.ttest_1samp(d, 0.0).pvalue)  # no correction: the paired t-test
    r = corrected_paired_t(d, 0.25)
    se = np.sqrt((1 / 5 + 0.25) * d.var(ddof=1))
    assert r["p"] == pytest.approx(2 * st.t.sf(d.mean() / se, 4))
    assert r["ci_low"] == pytest.approx(d.mean() - st.t.ppf(0.975, 4) * se)
    assert r["p"] > plain["p"] and r["n"] == 5 and r["mean_diff"] == pytest.approx(d.mean())
    assert math.isnan(corrected_paired_t([0.1], 0.25)["p"]) and math.isnan(corrected_paired_t([0, 0, 0], 0.2)["p"])
