"""Small statistics for the leaderboard: descriptive t-intervals, paired tests and Holm's correction."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy import stats as _st

NAN = float("nan")


def _finite(values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    return arr[~np.isnan(arr)]


def describe(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """n, mean, std (ddof=1) and a two-sided t confidence interval of the mean; NaNs are dropped.

    ``std`` and the interval are NaN when fewer than two values remain; every
    statistic is NaN when none remains.
    """
    arr = _finite(values)
    n = int(arr.size)
    mean = float(arr.mean()) if n else NAN
    if n < 2:
        return {"n": n, "mean": mean, "std": NAN, "ci_low": NAN, "ci_high": NAN}
    std = float(arr.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Compare paired samples ``a`` and ``b`` (same order, same length).

    Pairs where either value is NaN are dropped. Returns ``n``, ``mean_diff``
    (mean of a - b), a t-interval of the differences (``ci_low``, ``ci_high``),
    the two-sided Wilcoxon signed-rank p-value ``p_wilcoxon`` and the paired
    t-test p-value ``p_ttest`` (both NaN when n < 2 or every difference is zero).
    """
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired_test: a has {x.size} values, b has {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = x - y
    desc = describe(d, confidence)
    n = desc["n"]
    p_w = p_t = NAN
    if n >= 2 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_w = float(_st.wilcoxon(d, alternative="two-sided").pvalue)
            p_t = float(_st.ttest_rel(x, y).pvalue)
    return {
        "n": n,
        "mean_diff": desc["mean"],
        "ci_low": desc["ci_low"],
        "ci_high": desc["ci_high"],
        "p_wilcoxon": p_w,
        "p_ttest": p_t,
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order; NaNs pass through and are not counted."""
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, NAN)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        scaled = p[order] * (m - np.arange(m))
        out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return [float(v) for v in out]


def corrected_paired_t(differences: Sequence[float], test_train_ratio: float, confidence: float = 0.95) -> dict[str, float]:
    """Paired t-test of cross-validation units, corrected for their overlapping training sets.

    ``differences`` holds one value per (fold, seed) unit: the row's metric
    minus the target's, each averaged over that fold's test patients (which
    share one model, so they are one unit, not independent samples). Folds
    share most of their training patients, so the units are positively
    correlated; the corrected resampled t-test (Nadeau & Bengio 2003, in the
    k-fold form of Bouckaert & Frank 2004) widens the variance of the mean
    from s^2 / J to (1 / J + n_test / n_train) s^2 for J units, with J - 1
    degrees of freedom. ``test_train_ratio`` is n_test / n_train (0 gives the
    plain paired t-test). Returns ``n`` (units), ``mean_diff``, ``ci_low``,
    ``ci_high`` (the corrected t-interval) and the two-sided ``p``; NaN when
    n < 2, and p = NaN when every difference is zero.
    """
    d = _finite(differences)
    n = int(d.size)
    mean = float(d.mean()) if n else NAN
    out = {"n": n, "mean_diff": mean, "ci_low": NAN, "ci_high": NAN, "p": NAN}
    if n < 2:
        return out
    var = float(d.var(ddof=1))
    se = math.sqrt((1.0 / n + max(0.0, float(test_train_ratio))) * var)
    tq = float(_st.t.ppf(0.5 + confidence / 2.0, n - 1))
    out["ci_low"], out["ci_high"] = mean - tq * se, mean + tq * se
    if se > 0:
        out["p"] = float(2.0 * _st.t.sf(abs(mean) / se, n - 1))
    elif mean != 0:
        out["p"] = 0.0
    return out
