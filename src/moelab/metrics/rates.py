"""Empirical convergence rates: slope of log(loss) on log(n) with a bootstrap interval.

For a sample-size grid n_1 < … < n_L with replicate losses L_{l,r}, the
estimate is the least-squares slope of log(mean_r L_{l,r}) on log(n_l) (the
papers' log-log plots show the mean loss against n); ``statistic="median"``
regresses the log of the per-n median instead, which rare far-off replicates
(e.g. a split expert raised to the power r̄ in D2) cannot dominate. The interval is the
percentile bootstrap over replicates: at every n the replicates are resampled
with replacement (independently across n), the slope refitted, and the
(α/2, 1 − α/2) quantiles of the refits reported. A loss ≈ C n^{-r} gives
slope ≈ −r.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RateFit", "fit_rate"]


@dataclass
class RateFit:
    """Result of :func:`fit_rate`.

    Attributes
    ----------
    slope, intercept : float
        log(loss) ≈ intercept + slope · log(n).
    ci_low, ci_high : float
        Percentile bootstrap interval for the slope (NaN if not computable).
    n_min, n_max : int
        Range of the sample sizes used.
    replicates : int
        Smallest number of finite losses at any n.
    n_levels : int
        Number of sample sizes used.
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    n_min: int
    n_max: int
    replicates: int
    n_levels: int


def _ls_slope(logn: np.ndarray, logy: np.ndarray):
    """Slopes of logy (..., L) on logn (L,) by least squares."""
    xc = logn - logn.mean()
    slope = (logy - logy.mean(-1, keepdims=True)) @ xc / (xc @ xc)
    return slope, logy.mean(-1) - slope * logn.mean()


def fit_rate(n, loss, *, n_boot: int = 1000, level: float = 0.95, statistic: str = "mean", random_state=0) -> RateFit:
    """Fit loss ≈ C n^slope on replicate losses.

    Parameters
    ----------
    n : array-like of shape (N,)
        Sample size of each fit.
    loss : array-like of shape (N,)
        Loss of each fit; NaN/inf and values ≤ 0 are ignored (a loss of exactly
        0 has no logarithm; failed fits are NaN).
    n_boot : int, default 1000
        Bootstrap resamples (0: no interval).
    level : float, default 0.95
        Interval coverage.
    statistic : {"mean", "median", "geomean"}, default "mean"
        Per-n summary whose log is regressed: log of the mean loss, log of the
        median loss, or the mean of log losses.
    random_state : int, default 0

    Returns
    -------
    RateFit
        All NaN fields when fewer than two sample sizes have a finite loss.

    Raises
    ------
    ValueError
        If ``n`` and ``loss`` differ in length, or ``statistic`` is unknown.
    """
    n = np.asarray(n, dtype=float).ravel()
    loss = np.asarray(loss, dtype=float).ravel()
    if n.shape != loss.shape:
        raise ValueError(f"n has {n.size} entries but loss has {loss.size}; pass one n per loss")
    if statistic not in ("mean", "median", "geomean"):
        raise ValueError(f"statistic must be 'mean', 'median' or 'geomean', got {statistic!r}")
    ok = np.isfinite(loss) & (loss > 0) & np.isfinite(n)
    levels = np.unique(n[ok])
    groups = [loss[ok & (n == v)] for v in levels]
    if len(levels) < 2:
        return RateFit(*(float("nan"),) * 4, 0, 0, 0, len(levels))
    logn = np.log(levels)

    def summary(vals: np.ndarray) -> np.ndarray:  # vals (..., c)
        if statistic == "mean":
            return np.log(vals.mean(-1))
        if statistic == "median":
            return np.log(np.median(vals, -1))
        return np.log(vals).mean(-1)

    logy = np.array([summary(g) for g in groups])
    slope, intercept = _ls_slope(logn, logy)
    lo = hi = float("nan")
    if n_boot > 0:
        rng = np.random.default_rng(random_state)
        boot = np.stack([summary(g[rng.integers(0, g.size, size=(n_boot, g.size))]) for g in groups], -1)
        slopes, _ = _ls_slope(logn, boot)
        a = (1 - level) / 2
        lo, hi = (float(v) for v in np.quantile(slopes, [a, 1 - a]))
    return RateFit(float(slope), float(intercept), lo, hi, int(levels[0]), int(levels[-1]), int(min(g.size for g in groups)), len(levels))
