"""Predictions of a fitted Gaussian mixture of experts: mean, sd, prediction intervals, experts, gate weights.

The predictive distribution of y at x is the mixture

    F(y | x) = Σ_k g_k(x) Φ((y − a_kᵀx − b_k) / σ_k),

whose mean is Σ_k g_k m_k and whose variance follows from the law of total
variance (Jordan & Jacobs 1994). Its q-quantile Q(q | x) has no closed form
and is found by root-finding on F, which is continuous and strictly
increasing: the bracket [min_k (m_k + σ_k z_q), max_k (m_k + σ_k z_q)] with
z_q = Φ⁻¹(q) always holds the root (at its left end every Φ_k ≤ q, at its
right end every Φ_k ≥ q), and SciPy's Chandrupatla solver
(:func:`scipy.optimize.elementwise.find_root`) converges to float64 precision
inside it. Quantiles above the median are found on the survival function
1 − F, so upper tails keep their relative precision.

**Interval reported.** The level-L prediction interval is the equal-tailed
one, [Q((1 − L)/2), Q((1 + L)/2)]: a single interval holding probability L
with (1 − L)/2 in each tail. When the experts at x are far apart, the mixture
is multimodal and its highest-density region at level L is a union of
intervals; the equal-tailed interval then also covers the low-density gap
between the modes. moelab reports the equal-tailed interval only; the gate
weights and the experts' means and σ_k (in the model) describe the modes.

**Most likely expert.** Prediction uses x only, so the ``expert`` column is
argmax_k g_k(x), the expert the gate favours (numbered 1..K, as the
``gate_k`` columns). With y observed, the posterior P(k | x, y)
(:meth:`moelab.GaussianMoE.responsibilities`) can differ from it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import special
from scipy.optimize import elementwise

__all__ = ["mixture_cdf", "mixture_quantile", "prediction_interval", "predict_table"]


def _check_mixture(weights, means, sds):
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    sds = np.broadcast_to(np.asarray(sds, dtype=np.float64), means.shape)
    if weights.shape != means.shape or weights.ndim != 2:
        raise ValueError(f"weights and means must both have shape (n_samples, n_experts), got {weights.shape} "
                         f"and {means.shape}")
    for name, a in (("weights", weights), ("means", means), ("sds", sds)):
        if not np.isfinite(a).all():
            rows = np.flatnonzero(~np.isfinite(a).all(-1))
            raise ValueError(f"{name} has non-finite values (first in row {rows[0]}); the model overflows at "
                             "those inputs — check them for extreme values")
    if (sds <= 0).any():
        raise ValueError("sds must be > 0 (expert standard deviations)")
    return weights, means, sds


def mixture_cdf(weights, means, sds, y, *, upper: bool = False) -> np.ndarray:
    """F(y_n | x_n) = Σ_k w_nk Φ((y_n − m_nk)/s_k) of a Gaussian mixture per row.

    Parameters
    ----------
    weights : array-like of shape (n_samples, n_experts)
        Mixture weights per row (gate weights g_k(x_n)); rows sum to 1.
    means : array-like of shape (n_samples, n_experts)
        Expert means m_nk = a_kᵀx_n + b_k, in units of y.
    sds : array-like of shape (n_experts,) or (n_samples, n_experts)
        Expert standard deviations σ_k > 0, in units of y.
    y : array-like of shape (n_samples,)
    upper : bool, default False
        Return the survival function 1 − F instead (accurate in the upper tail).

    Returns
    -------
    ndarray of shape (n_samples,)

    Raises
    ------
    ValueError
        Mismatched shapes, non-finite values or σ_k ≤ 0.
    """
    weights, means, sds = _check_mixture(weights, means, sds)
    z = (np.asarray(y, dtype=np.float64)[:, None] - means) / sds
    return (weights * special.ndtr(-z if upper else z)).sum(-1)


def mixture_quantile(weights, means, sds, q) -> np.ndarray:
    """The q-quantile Q(q) of a Gaussian mixture per row, by bracketed root-finding on its CDF.

    Solves F(y) = q (q < 1/2) or 1 − F(y) = 1 − q (q ≥ 1/2) with
    :func:`scipy.optimize.elementwise.find_root` (Chandrupatla's method) in
    the bracket [min_k (m_k + σ_k z_q), max_k (m_k + σ_k z_q)], z_q = Φ⁻¹(q),
    which always contains the root (see the module docstring).

    Parameters
    ----------
    weights : array-like of shape (n_samples, n_experts)
    means : array-like of shape (n_samples, n_experts)
    sds : array-like of shape (n_experts,) or (n_samples, n_experts)
    q : float
        Probability, 0 < q < 1.

    Returns
    -------
    ndarray of shape (n_samples,), in units of y

    Raises
    ------
    ValueError
        q outside (0, 1), mismatched shapes, non-finite values or σ_k ≤ 0.
    RuntimeError
        If the solver did not converge (not expected: the bracket is exact).
    """
    if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0 < q < 1:
        raise ValueError(f"q must be a probability strictly between 0 and 1, got {q!r}")
    weights, means, sds = _check_mixture(weights, means, sds)
    q = float(q)
    upper = q >= 0.5
    target = 1.0 - q if upper else q
    ends = means + sds * special.ndtri(q)  # each expert's own q-quantile  [n, K]
    lo, hi = ends.min(-1), ends.max(-1)
    pad = 1e-9 * np.maximum(np.abs(ends).max(-1), sds.max(-1) if sds.ndim == 2 else sds.max())
    lo, hi = lo - pad, hi + pad  # a strict bracket also where every expert agrees (K = 1)

    def f(yv, w, m, s):  # increasing in y; zero at the quantile. Shapes: yv (n,), w/m/s (n, K)
        z = (yv[..., None] - m) / s
        if upper:
            return target - (w * special.ndtr(-z)).sum(-1)
        return (w * special.ndtr(z)).sum(-1) - target

    sd_rows = np.broadcast_to(sds, means.shape)
    # find_root broadcasts args against x; keep the expert axis out of its way by closing over it
    idx = np.arange(means.shape[0])
    res = elementwise.find_root(lambda yv, i: f(yv, weights[i.astype(int)], means[i.astype(int)],
                                                sd_rows[i.astype(int)]),
                                (lo, hi), args=(idx.astype(np.float64),), tolerances=dict(xatol=0.0))
    if not np.all(res.success):
        bad = int(np.flatnonzero(~res.success)[0])
        raise RuntimeError(f"the quantile solver did not converge in row {bad} (status {int(res.status[bad])})")
    return np.asarray(res.x, dtype=np.float64)


def _moments(model, x: torch.Tensor):
    """Gate weights (n, K), expert means (n, K), σ (K,), mixture mean and variance (n,) as numpy."""
    if len(model.batch_shape):
        raise ValueError(f"prediction needs a single model (batch shape ()), got batch shape "
                         f"{tuple(model.batch_shape)}")
    with torch.no_grad():
        g = model.gate_weights(x).numpy()
        m = model.expert_means(x).numpy()
        mean = model.mean(x).numpy()
        var = model.variance(x).numpy()
    s = model.experts.variance.sqrt().numpy()
    bad = ~(np.isfinite(g).all(-1) & np.isfinite(m).all(-1) & np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"the prediction is not finite for {rows.size} input row(s) (first: row {rows[0] + 1}, "
                         f"x = {x[rows[0]].tolist()}); those inputs are too extreme for this model — check them")
    return g, m, s, mean, var


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not (
            math.isfinite(level) and 0 < level < 1):
        raise ValueError(f"level must be a probability strictly between 0 and 1 (e.g. 0.9), got {level!r}")
    return float(level)


def _as_x(model, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float64).clone()
    else:
        x = torch.as_tensor(np.array(x, dtype=np.float64))
    if x.dim() == 1 and model.n_features == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2 or x.shape[-1] != model.n_features:
        raise ValueError(f"x must have shape (n_samples, {model.n_features}), got {tuple(x.shape)}")
    return x


def prediction_interval(model, x, level: float = 0.9):
    """Equal-tailed prediction interval of y given x: [Q((1 − L)/2 | x), Q((1 + L)/2 | x)].

    Parameters
    ----------
    model : moelab.GaussianMoE
        A single fitted model (batch shape ()), in the units of x and y.
    x : array-like of shape (n_samples, n_features)
    level : float, default 0.9
        Probability L of the interval, 0 < L < 1.

    Returns
    -------
    (lower, upper) : tuple of ndarray of shape (n_samples,), in units of y

    Raises
    ------
    ValueError
        level outside (0, 1), x of the wrong shape, a batched model, or inputs
        where the model overflows (the row is named).
    """
    level = _check_level(level)
    x = _as_x(model, x)
    g, m, s, _, _ = _moments(model, x)
    return mixture_quantile(g, m, s, (1 - level) / 2), mixture_quantile(g, m, s, (1 + level) / 2)


def predict_table(model, x, level: float = 0.9) -> pd.DataFrame:
    """Per-row predictions: mean, sd, equal-tailed interval, most likely expert, gate weights.

    Parameters
    ----------
    model : moelab.GaussianMoE
        A single fitted model (batch shape ()).
    x : array-like of shape (n_samples, n_features)
    level : float, default 0.9
        Probability of the prediction interval, 0 < level < 1.

    Returns
    -------
    DataFrame of shape (n_samples, 5 + n_experts)
        ``mean`` E[y | x]; ``sd`` √Var[y | x] (law of total variance);
        ``lower``, ``upper`` the equal-tailed level-``level`` interval of the
        mixture (see the module docstring); ``expert`` argmax_k g_k(x),
        numbered 1..K; ``gate_1`` … ``gate_K`` the gate weights g_k(x).

    Raises
    ------
    ValueError
        As :func:`prediction_interval`.
    """
    level = _check_level(level)
    x = _as_x(model, x)
    g, m, s, mean, var = _moments(model, x)
    table = pd.DataFrame({
        "mean": mean,
        "sd": np.sqrt(var),
        "lower": mixture_quantile(g, m, s, (1 - level) / 2),
        "upper": mixture_quantile(g, m, s, (1 + level) / 2),
        "expert": g.argmax(-1) + 1,
    })
    for k in range(g.shape[1]):
        table[f"gate_{k + 1}"] = g[:, k]
    return table
