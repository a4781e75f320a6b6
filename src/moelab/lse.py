"""Least-squares estimation of regression mixtures of experts, batched over problems and starts.

:func:`fit_lse` minimises the residual sum of squares Σ_n (y_n − f_G(x_n))² of
f_G(x) = Σ_k g_k(x) h(x, η_k) (:class:`moelab.regression.RegressionMoE`) by
**Levenberg–Marquardt** with Marquardt's diagonal scaling (Moré 1978), with the
Jacobian in closed form:

* experts: ∂f/∂(a_k, b_k) = g_k(x) σ'(a_kᵀφ(x) + b_k) [φ(x), 1];
* sigmoid gate: ∂f/∂(β_{1k}, β_{0k}) = g_k (1 − g_k) h_k [x, 1] (every row free);
* softmax gate: ∂f/∂(β_{1k}, β_{0k}) = g_k (h_k − f) [x, 1] for k < K; the
  reference expert K's gate row is fixed at 0 (softmax is translation
  invariant, so only differences of rows are identified).

A trial step is accepted only if it lowers the RSS; otherwise the damping λ
grows and the step is retried. So the objective never increases, iteration by
iteration (``history``). All B·S problems (B problems × S starts) iterate in
one batch; a problem leaves the batch when it converges.

Stopping: after an accepted step whose relative decrease of the RSS is below
``tol``, or when no step decreases the RSS any more (λ above 1e16 — a local
minimum at the working precision). x is standardised inside (the fitted model
is mapped back exactly); y is not (a shift or scale of y cannot be absorbed by
sigmoid gates or by the one-neuron experts).

Sources: the model and the estimator of Nguyen, Ho & Rinaldo (arXiv 2402.02952,
softmax; NeurIPS 2024, arXiv 2405.13997, sigmoid); Levenberg (1944),
Marquardt (1963), Moré (1978) for the algorithm.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .threads import fit_threads, using_threads
from ._scaling import Scaling
from .fitcore import ConvergenceWarning, check_n_experts, design, prepare_xy
from .gates import gate_spec
from .init import INIT_METHODS, init_responsibilities
from .mstep import expert_m_step, softmax_gate_newton_step
from .regression import RegressionExperts, RegressionMoE, check_expert_kind, expert_activation, polynomial_features

__all__ = ["fit_lse", "LSEResult", "LSE_GATES"]

#: gate families fit_lse takes
LSE_GATES = ("sigmoid", "softmax")
#: start strategies of fit_lse (``init``); "auto" cycles through the four
LSE_INITS = ("auto",) + INIT_METHODS
_LAMBDA0, _LAMBDA_UP, _LAMBDA_DOWN, _LAMBDA_MAX = 1e-3, 4.0, 1.0 / 3.0, 1e16


@dataclass
class LSEResult:
    """What :func:`fit_lse` returns (leading dimensions = the problems' batch shape B).

    Attributes
    ----------
    model : RegressionMoE
        Fitted regression function in the original units of x, batch shape B.
    objective : tensor of shape B
        Mean squared error RSS / n_samples at ``model`` (units of y²).
    noise_variance : tensor of shape B
        RSS / (n_samples − free parameters), the usual estimate of Var(ε).
    n_iter : tensor of shape B (int64)
        Levenberg–Marquardt iterations (trial steps) of the selected start.
    converged : tensor of shape B (bool)
    history : tensor of shape B + (T,)
        Mean squared error after each iteration of the selected start (non-increasing; NaN-padded).
    start_objective : tensor of shape B + (n_init,)
        Final mean squared error of every start.
    seconds : float
    n_samples : int
    settings : dict
    """

    model: RegressionMoE
    objective: torch.Tensor
    noise_variance: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    history: torch.Tensor
    start_objective: torch.Tensor
    seconds: float = 0.0
    n_samples: int = 0
    settings: dict = field(default_factory=dict)


# ------------------------------------------------------------------ the model on flat parameters
@dataclass
class _Setup:
    sigmoid: bool  # gate kind
    K: int
    d: int
    m: int  # expert features
    kind: str
    degree: int

    @property
    def n_gate_rows(self) -> int:
        return self.K if self.sigmoid else self.K - 1

    @property
    def n_params(self) -> int:
        return self.n_gate_rows * (self.d + 1) + self.K * (self.m + 1)

    def split(self, theta):
        """flat (R, P) → gate rows (R, K, d+1) (softmax: zero reference row appended), experts (R, K, m+1)."""
        R = theta.shape[0]
        G = self.n_gate_rows * (self.d + 1)
        g = theta[:, :G].reshape(R, self.n_gate_rows, self.d + 1)
        if not self.sigmoid:
            g = torch.cat([g, torch.zeros(R, 1, self.d + 1, dtype=theta.dtype, device=theta.device)], 1)
        return g, theta[:, G:].reshape(R, self.K, self.m + 1)

    def flat(self, g, e):
        g = g if self.sigmoid else g[:, : self.K - 1]
        return torch.cat([g.reshape(g.shape[0], -1), e.reshape(e.shape[0], -1)], -1)


def _forward(st: _Setup, theta, x1, phi1, jacobian: bool):
    """f (R, n) and, with ``jacobian``, J = ∂f/∂θ (R, n, P) in closed form (module docstring)."""
    g_rows, e_rows = st.split(theta)
    logits = x1 @ g_rows.transpose(-1, -2)  # [R, n, K]
    z = phi1 @ e_rows.transpose(-1, -2)  # [R, n, K]
    act, grad = expert_activation(st.kind)
    h = act(z)
    g = torch.sigmoid(logits) if st.sigmoid else torch.softmax(logits, -1)
    f = (g * h).sum(-1)
    if not jacobian:
        return f, None
    R, n, _ = x1.shape
    dgate = g * (1 - g) * h if st.sigmoid else (g * (h - f.unsqueeze(-1)))[..., : st.K - 1]
    dexp = g * grad(z)
    Jg = (dgate.unsqueeze(-1) * x1.unsqueeze(-2)).reshape(R, n, -1)
    Je = (dexp.unsqueeze(-1) * phi1.unsqueeze(-2)).reshape(R, n, -1)
    return f, torch.cat([Jg, Je], -1)


#: problems per chunk are chosen so that a chunk's Jacobian holds at most this many numbers
_CHUNK_ELEMENTS = 2 ** 24


def _normal_equations(st: _Setup, theta, x1, phi1, y):
    """JᵀJ (R, P, P), Jᵀr (R, P) and RSS (R,) at θ, in chunks of problems (bounded memory)."""
    R, n, _ = x1.shape
    step = max(1, _CHUNK_ELEMENTS // max(n * st.n_params, 1))
    As, gs, rss = [], [], []
    for s in range(0, R, step):
        sl = slice(s, s + step)
        f, J = _forward(st, theta[sl], x1[sl], phi1[sl], True)
        r = f - y[sl]
        As.append(J.transpose(-1, -2) @ J)
        gs.append((J.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1))
        rss.append(r.square().sum(-1))
    return torch.cat(As), torch.cat(gs), torch.cat(rss)


def _rss(st, theta, x1, phi1, y):
    f, _ = _forward(st, theta, x1, phi1, False)
    return torch.nan_to_num((f - y).square().sum(-1), nan=math.inf)


def _levenberg_marquardt(st: _Setup, theta, x1, phi1, y, max_iter: int, tol: float, history):
    """Iterate until every problem stops; returns θ, RSS (R,), iterations (R,), converged (R,).

    The active problems are kept compacted (data, θ, JᵀJ, Jᵀr, λ), re-indexed only when some stop.
    """
    R = theta.shape[0]
    n = y.shape[-1]
    dev, dt = theta.device, theta.dtype
    theta_out = theta.clone()
    A, grad, rss = _normal_equations(st, theta_out, x1, phi1, y)
    rss = torch.nan_to_num(rss, nan=math.inf)
    rss_out = rss.clone()
    history[:, 0] = rss / n
    n_iter = torch.zeros(R, dtype=torch.long, device=dev)
    converged = torch.zeros(R, dtype=torch.bool, device=dev)
    active = torch.arange(R, device=dev)
    th, xa, pa, ya = theta_out.clone(), x1, phi1, y
    lam = torch.full((R,), _LAMBDA0, dtype=dt, device=dev)
    eye = torch.eye(st.n_params, dtype=dt, device=dev)
    for it in range(1, max_iter + 1):
        diag = A.diagonal(dim1=-2, dim2=-1)
        D = torch.maximum(diag, 1e-12 * diag.amax(-1, keepdim=True) + 1e-300)
        M = A + lam[:, None, None] * torch.diag_embed(D) + 1e-14 * D.amax(-1)[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(M)
        delta = -torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
        bad = (info > 0) | ~torch.isfinite(delta).all(-1)
        trial = th + torch.where(bad[:, None], torch.zeros_like(delta), delta)
        new = _rss(st, trial, xa, pa, ya)
        ok = (new < rss) & ~bad
        lam = torch.where(ok, (lam * _LAMBDA_DOWN).clamp_min(1e-12), lam * _LAMBDA_UP)
        done = ok & ((rss - new) <= tol * rss)
        if bool(ok.any()):
            idx = ok.nonzero().squeeze(-1)
            th[idx] = trial[idx]
            A_new, g_new, rss_new = _normal_equations(st, th[idx], xa[idx], pa[idx], ya[idx])
            A[idx], grad[idx], rss[idx] = A_new, g_new, torch.nan_to_num(rss_new, nan=math.inf)
        n_iter[active] += 1
        history[active, it] = rss / n
        stop = done | (lam > _LAMBDA_MAX)
        if it == max_iter or bool(stop.all()):
            theta_out[active], rss_out[active] = th, rss
            converged[active[stop]] = True
            break
        if bool(stop.any()):
            theta_out[active[stop]], rss_out[active[stop]] = th[stop], rss[stop]
            converged[active[stop]] = True
            keep = ~stop
            active, th, lam, A, grad, rss = active[keep], th[keep], lam[keep], A[keep], grad[keep], rss[keep]
            xa, pa, ya = xa[keep], pa[keep], ya[keep]
    return theta_out, rss_out, n_iter, converged


# ------------------------------------------------------------------ starts
def _targets(kind: str, y: torch.Tensor) -> torch.Tensor:
    """Pre-activation targets for a start's weighted least squares: σ⁻¹ of y clipped into σ's range."""
    if kind == "tanh":
        return torch.atanh(y.clamp(-0.95, 0.95))
    if kind == "sigmoid":
        return torch.logit(y.clamp(0.025, 0.975))
    return y


def _starts_from_responsibilities(st: _Setup, xs, ys, phi1, init: str, S: int, gen):
    """S starts per problem: responsibilities → weighted least squares per expert, gate fitted to them."""
    B, n, d = xs.shape
    methods = INIT_METHODS if init == "auto" else (init,)
    per = [S // len(methods) + (1 if i < S % len(methods) else 0) for i in range(len(methods))]
    resp = []
    for b in range(B):
        parts = [init_responsibilities(m, xs[b], ys[b], st.K, c, gen) for m, c in zip(methods, per) if c > 0]
        resp.append(torch.cat(parts, 0))
    resp = torch.cat(resp, 0).to(xs.device).transpose(-1, -2).contiguous()  # [B*S, K, n]
    resp = 0.9 * resp + 0.1 / st.K
    x1 = design(xs).repeat_interleave(S, 0)
    ph = phi1.repeat_interleave(S, 0)
    t = _targets(st.kind, ys).repeat_interleave(S, 0)
    e_rows, _ = expert_m_step(ph, t, resp, 1e-6)  # [R, K, m+1]
    R = x1.shape[0]
    if st.sigmoid:  # one-vs-rest: each expert's gate is a two-class softmax fit of (r_k, 1 - r_k)
        r2 = torch.stack([resp, 1 - resp], -2).reshape(R * st.K, 2, n)
        th = torch.zeros(R * st.K, 2, d + 1, dtype=xs.dtype, device=xs.device)
        g_rows = softmax_gate_newton_step(x1.repeat_interleave(st.K, 0), r2, th, 5)[:, 0].reshape(R, st.K, d + 1)
    else:
        th = torch.zeros(R, st.K, d + 1, dtype=xs.dtype, device=xs.device)
        g_rows = softmax_gate_newton_step(x1, resp, th, 5)
    return st.flat(g_rows, e_rows)


def _user_starts(st: _Setup, model: RegressionMoE, gate_name: str, batch, scaling: Scaling, B: int):
    """θ (B·S, P) in standardised units from a user RegressionMoE of batch shape (), B or B + (S,); and S."""
    if not isinstance(model, RegressionMoE):
        raise TypeError(f"init_model must be a moelab.RegressionMoE, got {type(model).__name__}")
    if model.n_experts != st.K or model.n_features != st.d:
        raise ValueError(f"init_model has {model.n_experts} experts and {model.n_features} features; expected {st.K} and {st.d}")
    if model.gate.name != gate_name:
        raise ValueError(f"init_model has a {model.gate.name!r} gate but gate={gate_name!r}")
    if model.experts.kind != st.kind or model.experts.degree != st.degree:
        raise ValueError(f"init_model has {model.experts.describe()} experts but expert={st.kind!r}"
                         + (f", degree={st.degree}" if st.kind == "polynomial" else ""))
    mb = tuple(model.batch_shape)
    if mb == ():
        S, rows = 1, lambda t: t.expand(B, *t.shape)  # noqa: E731
    elif mb == tuple(batch):
        S, rows = 1, lambda t: t.reshape(B, *t.shape[len(mb):])  # noqa: E731
    elif len(mb) == len(batch) + 1 and mb[:-1] == tuple(batch):
        S, rows = mb[-1], lambda t: t.reshape(B * mb[-1], *t.shape[len(mb):])  # noqa: E731
    else:
        raise ValueError(f"init_model batch shape {mb} does not match the data's batch shape {tuple(batch)} "
                         f"(one start per problem) or {tuple(batch)} + (S,) (S starts per problem)")
    m = model.to(dtype=scaling.x_loc.dtype, device=scaling.x_loc.device).map_tensors(rows)
    sc = scaling if S == 1 else scaling.expand(S)
    gate = sc.gate_to_scaled(m.gate)
    experts = m.experts.to_scaled(sc.x_loc, sc.x_scale)
    g_rows = gate.logit_coefficients()
    if not st.sigmoid:
        g_rows = g_rows - g_rows[:, -1:]  # re-reference to the last expert (softmax translation invariance)
    e_rows = torch.cat([experts.slope, experts.intercept.unsqueeze(-1)], -1)
    return st.flat(g_rows, e_rows), S


def _threads_for(work: int):
    """One intra-op thread for small problems (below ~10^7 Jacobian entries), and never more than the
    cores without another runnable task (:func:`moelab.threads.fit_threads`); a context manager:
    thread synchronisation dominates there, badly so on a busy machine."""
    return using_threads(1 if work < 10_000_000 else fit_threads(10**9, torch.get_num_threads()))


# ------------------------------------------------------------------ entry point
def fit_lse(
    x,
    y,
    n_experts: int,
    *,
    gate: str = "sigmoid",
    expert: str = "linear",
    degree: Optional[int] = None,
    n_init: int = 20,
    init: str = "auto",
    init_model: Optional[RegressionMoE] = None,
    max_iter: int = 1000,
    tol: float = 1e-10,
    random_state=None,
    dtype=torch.float64,
    device=None,
    warn: bool = True,
) -> LSEResult:
    """Fit a regression mixture of experts y = Σ_k g_k(x) h(x, η_k) + ε by least squares.

    Parameters
    ----------
    x : array-like of shape (n_samples,), (n_samples, n_features) or (..., n_samples, n_features)
        Inputs; leading dimensions are independent problems fitted together.
    y : array-like of shape (..., n_samples)
        Responses (broadcast against x's leading dimensions).
    n_experts : int
        K ≥ 1.
    gate : {"sigmoid", "softmax"}, default "sigmoid"
        g_k = sigmoid(β_{1k}ᵀx + β_{0k}) (not normalised; every row free) or
        softmax_k(β_{1k}ᵀx + β_{0k}) (reference expert K fixed at 0).
    expert : {"linear", "polynomial", "relu", "gelu", "tanh", "sigmoid"}, default "linear"
        h(x, (a, b)) = σ(aᵀφ(x) + b); see :mod:`moelab.regression`.
    degree : int, optional
        p ≥ 1, required for ``expert="polynomial"`` (no other kind takes it).
    n_init : int, default 20
        Starts per problem (ignored with ``init_model``), all iterated in one batch; the
        one with the smallest RSS is returned.
    init : {"auto", "kmeans", "random", "segments", "lines"}, default "auto"
        Initial responsibilities (as :func:`moelab.fit_em`'s strategies; "auto" cycles
        through the four), then each expert by weighted least squares on its share and
        the gate fitted to the shares.
    init_model : RegressionMoE, optional
        User starting values: batch shape (), B, or B + (S,) for S starts per problem.
    max_iter : int, default 1000
        Levenberg–Marquardt iterations per start.
    tol : float, default 1e-10
        Stop after an accepted step whose relative decrease of the RSS is ≤ tol.
    random_state : int, torch.Generator or None
    dtype : torch.dtype, default torch.float64
    device : torch device, optional
    warn : bool, default True
        Emit :class:`moelab.ConvergenceWarning` when the selected start of a problem
        stopped at ``max_iter``.

    Returns
    -------
    LSEResult

    Raises
    ------
    ValueError
        Bad shapes, NaN/inf, constant columns or constant y, n_experts < 1, fewer
        samples than parameters, a gate other than sigmoid/softmax, unknown expert or
        init, a bad degree, n_init/max_iter not positive integers, tol < 0, an
        init_model of another gate, expert kind, size or batch shape.
    TypeError
        init_model not a RegressionMoE.

    Notes
    -----
    Objective: RSS(θ) = Σ_n (y_n − f_θ(x_n))², minimised by Levenberg–Marquardt;
    the RSS never increases from one iteration to the next (see the module docstring).
    """
    t0 = time.perf_counter()
    K = check_n_experts(n_experts)
    spec = gate_spec(gate, None, n_experts=K)
    if spec.name not in LSE_GATES:
        raise ValueError(f"fit_lse fits gate 'sigmoid' or 'softmax', got {spec.name!r}; fit the {spec.name} gate's "
                         "Gaussian mixture of experts with moelab.fit_em")
    p = check_expert_kind(expert, degree)
    for nm, v in (("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive integer, got {v!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0):
        raise ValueError(f"tol must be a number >= 0 (0 runs until no step decreases the RSS or max_iter), got {tol!r}")
    if init not in LSE_INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(LSE_INITS)}, or pass init_model")
    xb, yb, batch = prepare_xy(x, y, dtype=dtype, device=device)
    B, n, d = xb.shape
    st = _Setup(spec.name == "sigmoid", K, d, p * d, expert, p)
    if n < st.n_params:
        raise ValueError(f"{n} samples are fewer than the {st.n_params} free parameters of a {K}-expert model with "
                         f"{d} feature(s); use fewer experts or more data")
    scaling = Scaling.fit(xb, yb, center_x=True)  # validates constant columns / constant y
    xs = scaling.transform(xb)
    phi1 = design(polynomial_features(xs, p))
    if isinstance(random_state, torch.Generator):
        gen = random_state
    else:
        seed = int(random_state) if random_state is not None else int(torch.randint(2**31 - 1, (1,)))
        gen = torch.Generator(device="cpu").manual_seed(seed)
    if init_model is not None:
        theta0, S = _user_starts(st, init_model, spec.name, batch, scaling, B)
    else:
        S = n_init
        theta0 = _starts_from_responsibilities(st, xs, yb, phi1, init, S, gen)
    x1r, phir, yr = (design(xs), phi1, yb) if S == 1 else (design(xs).repeat_interleave(S, 0),
                                                           phi1.repeat_interleave(S, 0), yb.repeat_interleave(S, 0))
    history = torch.full((B * S, max_iter + 1), math.nan, dtype=dtype, device=xb.device)
    with _threads_for(B * S * n * st.n_params):
        theta, rss, n_iter, conv = _levenberg_marquardt(st, theta0, x1r, phir, yr, max_iter, float(tol), history)
    score = torch.nan_to_num(rss, nan=math.inf).reshape(B, S)
    pick = score.argmin(-1) + torch.arange(B, device=xb.device) * S
    g_rows, e_rows = st.split(theta[pick])
    gate_s = spec.build(g_rows[..., :-1], g_rows[..., -1])
    experts_s = RegressionExperts(e_rows[..., :-1], e_rows[..., -1], expert, degree if expert == "polynomial" else None)
    model = RegressionMoE(scaling.gate_to_original(gate_s), experts_s.to_original(scaling.x_loc, scaling.x_scale))
    shape = lambda t: t.reshape(tuple(batch) + tuple(t.shape[1:]))  # noqa: E731
    model = model.map_tensors(shape)
    hist = history[pick]
    last = int((~torch.isnan(hist)).sum(-1).max()) if hist.numel() else 0
    n_free = model.n_free_parameters()
    result = LSEResult(
        model=model, objective=(rss[pick] / n).reshape(batch),
        noise_variance=(rss[pick] / max(n - n_free, 1)).reshape(batch),
        n_iter=n_iter[pick].reshape(batch), converged=conv[pick].reshape(batch),
        history=hist[:, :last].reshape(*batch, last), start_objective=(score / n).reshape(*batch, S),
        seconds=time.perf_counter() - t0, n_samples=n,
        settings=dict(gate=spec.name, expert=expert, degree=p, n_init=S, init="user" if init_model is not None else init,
                      max_iter=max_iter, tol=tol, estimator="lse"),
    )
    if warn and not bool(result.converged.all()):
        warnings.warn(f"LSE (Levenberg-Marquardt) did not converge in {max_iter} iterations for "
                      f"{int((~result.converged).sum())} of {B} problem(s) (tol={tol:g} on the relative decrease "
                      "of the residual sum of squares); raise max_iter or tol.", ConvergenceWarning, stacklevel=2)
    return result
