"""Yardstick for ``em_throughput.py``: plain NumPy/SciPy EM for a softmax-gated Gaussian MoE.

Written the way the published simulation scripts are — one replicate at a
time, samples-first arrays (n, K), a Python loop over experts, float64 — but
running *exactly* moelab's algorithm (``src/moelab/em.py`` with the kernels of
``src/moelab/mstep.py``), so both reach the same log-likelihoods from the same
start:

* Data are standardised first, as ``fit_em`` does: x' = (x − mean)/sd,
  y' = (y − mean)/sd (sample sd, ddof = 1); the start is mapped into those
  units (``moelab._scaling.Scaling.model_to_scaled``) and the log-likelihood is
  reported in original units, ll = ll' − n log sd(y).
* E-step in log space: log r_nk = log g_k(x_n) + log N(y_n; θ_kᵀx1_n, ν_k) −
  logsumexp_k(·), x1 = [x', 1].
* Expert M-step (``expert_m_step``): per expert weighted least squares with a
  relative ridge 1e-10·mean(diag A) + 1e-30, Cholesky (least squares if it
  fails), variance Σ r·resid² / Σ r floored at ``reg_variance`` (a fraction of
  var(y), as y' has variance 1); an expert with Σ r < 1e-8·n keeps its old
  parameters.
* Gate M-step (``softmax_gate_newton_step``, one step): one damped Newton /
  IRLS step on Q_gate(θ) = Σ_n Σ_k r_nk log softmax_k(θ_k·x1_n) with the last
  expert as reference (θ_K = 0); ridge 1e-9·mean(diag H) (≥ 1e-12) + 1e-12;
  gradient step if Cholesky fails; the step is scaled so that no logit moves
  by more than ``_MAX_LOGIT_CHANGE``; the full step is kept if it increases
  Q_gate, else the best of the smaller ``_STEP_SIZES`` if that increases
  Q_gate, else θ is kept.
* The loop is ``_run_em``'s with a fixed number of iterations: E-step, then
  (``iters`` times) M-step + E-step; ``iters`` counts M-steps.

The constants are read from ``moelab.mstep`` so the two cannot drift apart
silently; everything else here is NumPy/SciPy only.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from scipy.special import log_softmax, logsumexp

from moelab.mstep import _MAX_LOGIT_CHANGE, _NEGLIGIBLE_GAIN, _STEP_SIZES

__all__ = ["fit_one", "fit_replicates", "standardise", "start_to_scaled"]

_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------ units
def standardise(x, y):
    """x (n, d), y (n,) → x', y' and the scaling (x_loc (d,), x_scale (d,), y_loc, y_scale)."""
    x_loc, x_scale = x.mean(0), x.std(0, ddof=1)
    y_loc, y_scale = y.mean(), y.std(ddof=1)
    return (x - x_loc) / x_scale, (y - y_loc) / y_scale, (x_loc, x_scale, y_loc, y_scale)


def start_to_scaled(start, scaling, var_floor):
    """Parameters in original units → standardised units (mirrors ``Scaling.model_to_scaled``).

    start : dict with gate_slope (K, d), gate_intercept (K,), slope (K, d),
    intercept (K,), variance (K,). Returns theta_g (K, p), theta_e (K, p),
    var (K,) with p = d + 1 (columns [x', 1]).
    """
    x_loc, x_scale, y_loc, y_scale = scaling
    gs = start["gate_slope"] * x_scale
    gi = start["gate_intercept"] + start["gate_slope"] @ x_loc
    es = start["slope"] / y_scale * x_scale
    ei = (start["intercept"] - y_loc + start["slope"] @ x_loc) / y_scale
    var = np.maximum(start["variance"] / y_scale**2, var_floor)
    return np.column_stack([gs, gi]), np.column_stack([es, ei]), var


# ------------------------------------------------------------------ steps
def e_step(theta_g, theta_e, var, x1, y):
    """Responsibilities (n, K) and the log-likelihood Σ_n log p(y_n | x_n)."""
    logw = log_softmax(x1 @ theta_g.T, axis=1)
    mean = x1 @ theta_e.T
    joint = logw - 0.5 * (_LOG_2PI + np.log(var) + (y[:, None] - mean) ** 2 / var)
    lse = logsumexp(joint, axis=1)
    return np.exp(joint - lse[:, None]), lse.sum()


def expert_m_step(x1, y, resp, var_floor, theta_old, var_old):
    """Weighted least squares and variance for each expert."""
    n, p = x1.shape
    K = resp.shape[1]
    theta = np.empty((K, p))
    var = np.empty(K)
    for k in range(K):
        r = resp[:, k]
        nk = r.sum()
        xr = x1 * r[:, None]
        A = xr.T @ x1
        b = xr.T @ y
        scale = max(np.diag(A).mean(), 1e-30)
        A = A + (1e-10 * scale + 1e-30) * np.eye(p)
        try:
            L = np.linalg.cholesky(A)
            th = scipy.linalg.cho_solve((L, True), b)
        except np.linalg.LinAlgError:
            th = np.linalg.lstsq(A, b, rcond=None)[0]
        resid = y - x1 @ th
        v = max((r * resid**2).sum() / max(nk, 1e-300), var_floor)
        if nk < 1e-8 * n:
            th, v = theta_old[k], var_old[k]
        theta[k], var[k] = th, v
    return theta, var


def _gate_q(free, x1, resp, K, p):
    """Q_gate at free coefficients (K-1)·p (reference row appended)."""
    theta = np.vstack([free.reshape(K - 1, p), np.zeros((1, p))])
    with np.errstate(invalid="ignore"):
        return (resp * log_softmax(x1 @ theta.T, axis=1)).sum()


def gate_m_step(x1, resp, theta_g):
    """One damped Newton (IRLS) step on Q_gate, last expert as reference."""
    n, p = x1.shape
    K = resp.shape[1]
    if K == 1:
        return theta_g
    K1, P = K - 1, (K - 1) * p
    free = theta_g[:K1].ravel()
    logg = log_softmax(x1 @ theta_g.T, axis=1)
    q0 = (resp * logg).sum()
    g = np.exp(logg[:, :K1])  # (n, K-1)
    grad = ((resp[:, :K1] - g).T @ x1).ravel()  # (K-1)·p, expert-major
    H = np.empty((P, P))  # minus the Hessian: Σ_n (diag(g) − g gᵀ)_kl x1_n x1_nᵀ
    for k in range(K1):
        for l in range(K1):
            w = g[:, k] * ((k == l) - g[:, l])
            H[k * p:(k + 1) * p, l * p:(l + 1) * p] = (x1 * w[:, None]).T @ x1
    ridge = 1e-9 * max(np.diag(H).mean(), 1e-12) + 1e-12
    try:
        L = np.linalg.cholesky(H + ridge * np.eye(P))
        delta = scipy.linalg.cho_solve((L, True), grad)
        solved = True
    except np.linalg.LinAlgError:
        delta, solved = grad, False
    dl = np.abs(x1 @ delta.reshape(K1, p).T).max()
    delta = delta * min(_MAX_LOGIT_CHANGE / max(dl, 1e-300), 1.0)
    # a step whose predicted gain is below rounding is not taken (as in moelab.mstep)
    if solved and grad @ delta - 0.5 * delta @ H @ delta <= _NEGLIGIBLE_GAIN * (abs(q0) + n):
        return theta_g
    q1 = _gate_q(free + delta, x1, resp, K, p)
    if q1 > q0:
        free = free + delta
    else:
        best_q, best = -math.inf, None
        for a in _STEP_SIZES[1:]:
            q = _gate_q(free + a * delta, x1, resp, K, p)
            q = -math.inf if math.isnan(q) else q
            if q > best_q:
                best_q, best = q, free + a * delta
        if best is not None and best_q > q0:
            free = best
    return np.vstack([free.reshape(K1, p), np.zeros((1, p))])


# ------------------------------------------------------------------ fits
def fit_one(x, y, start, iters, reg_variance=1e-6):
    """EM for one data set from ``start`` (original units), exactly ``iters`` M-steps.

    Parameters
    ----------
    x : array of shape (n,) or (n, d)
    y : array of shape (n,)
    start : dict
        gate_slope (K, d), gate_intercept (K,), slope (K, d), intercept (K,),
        variance (K,), original units; gate row K-1 should be zero.
    iters : int
        M-steps (``fit_em``'s ``max_iter`` with early stopping disabled).

    Returns
    -------
    float
        Log-likelihood in original units after the last M-step.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64)
    xs, ys, scaling = standardise(x, y)
    x1 = np.column_stack([xs, np.ones(len(ys))])
    theta_g, theta_e, var = start_to_scaled(start, scaling, reg_variance)
    resp, ll = e_step(theta_g, theta_e, var, x1, ys)
    for _ in range(iters):
        theta_e, var = expert_m_step(x1, ys, resp, reg_variance, theta_e, var)
        theta_g = gate_m_step(x1, resp, theta_g)
        resp, ll = e_step(theta_g, theta_e, var, x1, ys)
    return ll - len(ys) * math.log(scaling[3])


def fit_replicates(x, y, starts, iters, reg_variance=1e-6):
    """Loop :func:`fit_one` over replicates: x (R, n[, d]), y (R, n), starts with a leading R axis → ll (R,)."""
    out = np.empty(len(y))
    for r in range(len(y)):
        out[r] = fit_one(x[r], y[r], {k: v[r] for k, v in starts.items()}, iters, reg_variance)
    return out
