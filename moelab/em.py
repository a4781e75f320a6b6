"""EM for Gaussian mixtures of experts with any gate, batched over problems and restarts.

One call fits B independent problems (x of shape (B, n, d)) with S starts each
as a single batch of B·S problems:

1. E-step in log space: log r_nk = log g_k(x_n) + log f_k(y_n|x_n) − logsumexp_k(·).
2. Expert M-step in closed form (weighted least squares, variance floor).
3. Gate M-step: damped Newton/IRLS for linear-logit gates (softmax, fixed
   temperature); a damped Newton generalised-EM step with autograd derivatives
   for the others (estimated temperature, activation, top-K), accepted only if
   it does not decrease the gate part of Q. Hence the observed
   log-likelihood never decreases.

Convergence: the change of the *mean* log-likelihood per sample below ``tol``
(so ``tol`` does not depend on n), or with ``convergence="relative"`` its
relative change (meteorits' rule). Problems that converge leave the batch.

Start strategy (``init="auto"``): ``n_init`` starts (default 160) run to
convergence in one batch: plain starts from k-means on (x, y), random lines,
contiguous segments along x and random soft responsibilities, plus the best
of ``n_candidates`` (default 2000) segment starts ranked by the likelihood of
their *initial* fit. Some optima are rare basins: on mcycle with 4 experts
about 1 plain start in 100 finds the best, while ranking 1000 segment starts
by their initial (segmented-regression) likelihood finds it reliably. Ranking
after a few EM iterations does not: the best basins creep up slowly as their
gate switches harden, so early EM likelihoods mislead.

A fit is *collapsed* (degenerate) when an expert's effective size Σ_n r_nk is
below ``min_expert_size`` or its standard deviation below ``min_expert_sd``
times the standard deviation of y: its likelihood can be made arbitrarily
large and is not a better fit. Collapsed starts are rejected.

Sources: Jordan & Jacobs (1994); Dempster, Laird & Rubin (1977);
scikit-learn's ``BaseMixture`` for the restart/convergence conventions.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning

from ._scaling import Scaling
from ._validation import as_tensor, check_xy
from .experts import GaussianExperts
from .gates import GATES, Gate, GateSpec, gate_spec
from .gates.identifiability import warn_if_temperature_not_identified
from .init import INIT_METHODS, init_responsibilities
from .model import GaussianMoE
from . import _fused
from .mstep import expert_m_step, gate_newton_step, outer_design, softmax_gate_newton_step

__all__ = ["fit_em", "EMResult", "ConvergenceWarning", "DegenerateFitWarning", "prepare_xy", "CONVERGENCE_RULES"]

#: fit_em's stopping rules (``convergence``): change of the mean log-likelihood, or relative change
CONVERGENCE_RULES = ("mean", "relative")


class ConvergenceWarning(_SklearnConvergenceWarning):
    """EM (or L-BFGS) stopped at ``max_iter`` before the log-likelihood settled.

    A subclass of scikit-learn's ``sklearn.exceptions.ConvergenceWarning``, so
    ``warnings.filterwarnings(..., category=sklearn.exceptions.ConvergenceWarning)``
    covers moelab's fits too.
    """


class DegenerateFitWarning(UserWarning):
    """Every start collapsed an expert (tiny variance or almost no samples)."""


@dataclass
class EMResult:
    """What :func:`fit_em` returns (leading dimensions = the problems' batch shape).

    Attributes
    ----------
    model : GaussianMoE
        Fitted model in the original units of x and y, batch shape B.
    loglik : tensor of shape B
        Total log-likelihood Σ_n log p(y_n | x_n) at ``model``.
    n_iter : tensor of shape B (int64)
        EM iterations (M-steps) of the selected start.
    converged : tensor of shape B (bool)
    history : tensor of shape B + (T,)
        Log-likelihood after each iteration of the selected start (NaN-padded).
    expert_size : tensor of shape B + (n_experts,)
        Effective sizes Σ_n r_nk at the fit.
    degenerate : tensor of shape B (bool)
        True when every start collapsed and the best collapsed fit is returned.
    start_loglik : tensor of shape B + (n_init,)
        Final log-likelihood of every start run to the end (−inf: collapsed).
    seconds : float
        Wall time of the whole call.
    """

    model: GaussianMoE
    loglik: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    history: torch.Tensor
    expert_size: torch.Tensor
    degenerate: torch.Tensor
    start_loglik: torch.Tensor
    seconds: float = 0.0
    n_samples: int = 0
    settings: dict = field(default_factory=dict)


# ------------------------------------------------------------------ helpers
def prepare_xy(x, y, dtype=torch.float64, device=None):
    """Validate and convert x, y to tensors x (B, n, d), y (B, n) with B flattened.

    Returns x, y, batch_shape. Accepts x of shape (n,), (n, d) or (..., n, d).

    Raises
    ------
    ValueError
        On NaN/inf, mismatched lengths or wrong ranks.
    """
    x = as_tensor(x, "x", dtype=dtype, device=device)
    y = as_tensor(y, "y", dtype=dtype, device=device)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    check_xy(x, y)
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-1])
    n, d = x.shape[-2:]
    x = x.expand(*batch, n, d).reshape(-1, n, d)
    y = y.expand(*batch, n).reshape(-1, n)
    return x, y, batch


def _gate_theta(gate: Gate) -> torch.Tensor:
    """Linear-logit gate → logit coefficients θ (R, K, d+1) on [x, 1] (the gate's own map)."""
    return gate.logit_coefficients()


def _theta_gate(gate: Gate, theta: torch.Tensor) -> Gate:
    return gate.with_logit_coefficients(theta)


def _gate_step(gate: Gate, x, x1, resp, n_steps, xx=None):
    if gate.linear_logits:
        return _theta_gate(gate, softmax_gate_newton_step(x1, resp, _gate_theta(gate), n_steps, xx))
    return gate_newton_step(gate, x, resp, n_steps)


def _linear_kn(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """θ_k·[x_n, 1] for every expert and sample: theta (R, K, d+1), x (R, n, d) → (R, K, n).

    A batched matmul with inner dimension d (baddbmm), or one fused multiply-add when
    d = 1: matmuls with an inner dimension of 1–2 are slow on CPU.
    """
    if x.shape[-1] == 1:
        return torch.addcmul(theta[..., 1:], theta[..., :1], x.transpose(-1, -2))
    return torch.baddbmm(theta[..., -1:], theta[..., :-1], x.transpose(-1, -2))


def _log_gate_kn(gate, x, x1):
    """log g in the experts-first layout (R, K, n)."""
    if gate.linear_logits:
        return torch.log_softmax(_linear_kn(_gate_theta(gate), x), -2)
    return gate.log_weights(x).transpose(-1, -2)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _e_step(gate, theta_e, var, x, x1, y):
    """log g + log f, then logsumexp over experts: resp (R, K, n) and loglik (R,)."""
    logw = _log_gate_kn(gate, x, x1)
    mean = _linear_kn(theta_e, x)  # [R, K, n]
    if torch.is_grad_enabled() and (logw.requires_grad or mean.requires_grad or var.requires_grad):
        v = var.unsqueeze(-1)  # autograd path (fit_mle): no in-place updates
        joint = logw - (_HALF_LOG_2PI + 0.5 * v.log() + 0.5 * (y.unsqueeze(-2) - mean).square() / v)
        lse = torch.logsumexp(joint, -2)
        return (joint - lse.unsqueeze(-2)).exp(), lse.sum(-1)
    # in place on the one (R, K, n) temporary: joint = logw − ½log(2πν) − (y − mean)²/(2ν)
    joint = mean.sub_(y.unsqueeze(-2)).square_().mul_((-0.5 / var).unsqueeze(-1))
    joint.add_(logw).sub_((_HALF_LOG_2PI + 0.5 * var.log()).unsqueeze(-1))
    lse = torch.logsumexp(joint, -2)  # [R, n]
    return joint.sub_(lse.unsqueeze(-2)).exp_(), lse.sum(-1)


def _index_gate(gate: Gate, idx) -> Gate:
    return gate.map_tensors(lambda t: t[idx])


def _scatter_gate(full: Gate, idx, part: Gate) -> Gate:
    new = full.map_tensors(lambda t: t.clone())
    for a in full.batched_attrs:
        getattr(new, a)[idx] = getattr(part, a)
    return new


@dataclass
class _State:
    gate: Gate
    theta: torch.Tensor  # [R, K, p] experts [a, b]
    var: torch.Tensor  # [R, K]

    def take(self, idx):
        return _State(_index_gate(self.gate, idx), self.theta[idx], self.var[idx])


def _m_step(state, x, x1, y, resp, var_floor, gate_steps, xx):
    theta, var = expert_m_step(x1, y, resp, var_floor, state.theta, state.var, xx)
    gate = _gate_step(state.gate, x, x1, resp, gate_steps, xx)
    return _State(gate, theta, var)


def _run_em(state: _State, x, x1, y, max_iter, tol, var_floor, gate_steps, history, fused: bool = False, sizes=None,
            ll_offset=None):
    """Iterate EM on all R problems until each converges or max_iter M-steps.

    history (R, max_iter + 1) receives the log-likelihood per iteration; returns the final state,
    loglik (R,), M-steps done (R,), converged (R,). ``fused=True`` runs each iteration as the
    compiled one-pass kernel of :mod:`moelab._fused` (linear-logit gates, one gate step);
    then ``sizes`` (R, K), if given, receives the effective expert sizes Σ_n r_nk at the final state.

    Stopping: |Δℓ| / n < tol (``ll_offset`` None), or, with ``ll_offset`` (R,) = ℓ_scaled − ℓ_original,
    the relative rule |Δℓ| < tol · |ℓ_prev − ll_offset| on the log-likelihood in the original units of y.
    """
    R, n = y.shape
    dev = y.device
    xx_all = None if fused else outer_design(x1)
    active = torch.arange(R, device=dev)
    ll = torch.full((R,), -math.inf, dtype=y.dtype, device=dev)
    n_iter = torch.zeros(R, dtype=torch.long, device=dev)
    converged = torch.zeros(R, dtype=torch.bool, device=dev)
    prev = None
    pending = None  # fused path: the gate step proposed by the last M-step, checked by this pass
    x_range = (x[..., 0].amin(-1), x[..., 0].amax(-1)) if fused and x.shape[-1] == 1 else None
    for it in range(max_iter + 1):
        full = active.numel() == R
        st = state if full else state.take(active)
        if fused:
            xa, ya = (x, y) if full else (x[active], y[active])
            gth = _gate_theta(st.gate)
            stats = _fused.statistics(gth, st.theta, st.var, xa, ya)
            if pending is not None:
                # Q_gate at the proposed step uses this pass's Σ logsumexp; where it did not
                # increase, search smaller steps and redo the pass for those problems
                gth, redo = _fused.gate_verify(stats["lse_gate"], pending, xa)
                pending = None
                if redo is not None:
                    sub = _fused.statistics(gth[redo], st.theta[redo], st.var[redo], xa[redo], ya[redo])
                    for k, v in sub.items():
                        stats[k][redo] = v
                    st = _State(_theta_gate(st.gate, gth), st.theta, st.var)
                    state = st if full else _State(_scatter_gate(state.gate, active, st.gate), state.theta, state.var)
            lla = stats["loglik"]
            if sizes is not None:
                sizes[active] = stats["S"][..., -1]
        else:
            xa, x1a, ya, xxa = (x, x1, y, xx_all) if full else (x[active], x1[active], y[active], xx_all[active])
            resp, lla = _e_step(st.gate, st.theta, st.var, xa, x1a, ya)
        ll[active] = lla
        history[active, it] = lla
        if prev is not None:
            if ll_offset is None:
                done = (lla - prev).abs() / n < tol
            else:  # relative change of the log-likelihood in the original units of y
                off = ll_offset if active.numel() == R else ll_offset[active]
                done = (lla - prev).abs() < tol * (prev - off).abs()
            done |= ~torch.isfinite(lla)
            converged[active] = done
        else:
            done = ~torch.isfinite(lla)
        if it == max_iter:
            break
        keep = ~done
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, st, prev = active[keep], st.take(keep), lla[keep]
            if fused:
                xa, ya, gth = xa[keep], ya[keep], gth[keep]
                stats = {k: v[keep] for k, v in stats.items()}
            else:
                resp, xa, x1a, ya, xxa = resp[keep], xa[keep], x1a[keep], ya[keep], xxa[keep]
            full = False
        else:
            prev = lla
        if fused:
            theta, var = _fused.expert_update(stats, st.theta, st.var, n, var_floor)
            xr_a = None if x_range is None else (x_range[0][active], x_range[1][active])
            gth, pending = _fused.gate_proposal(stats, gth, xa, x_range=xr_a)
            new = _State(_theta_gate(st.gate, gth), theta, var)
        else:
            new = _m_step(st, xa, x1a, ya, resp, var_floor, gate_steps, xxa)
        n_iter[active] += 1
        if full and active.numel() == R:
            state = new
        else:
            state = _State(_scatter_gate(state.gate, active, new.gate), state.theta.index_put((active,), new.theta), state.var.index_put((active,), new.var))
    return state, ll, n_iter, converged


#: compile="auto" compiles when the work per iteration (starts · n · K) reaches _AUTO_COMPILE_MIN and
#: the most work the fit may do (· max_iter) reaches _AUTO_COMPILE_WORK: about a minute of eager EM
#: (~15·10^6 sample·expert·iterations/s), so a cold compile (20–60 s) pays for itself
_AUTO_COMPILE_MIN = 1_000_000
_AUTO_COMPILE_WORK = 1_000_000_000


def _check_compile(compile, gate: Optional[GateSpec] = None, gate_steps: int = 1, dtype=torch.float64) -> None:
    """Validate fit_em's ``compile``; for compile=True also that the fused kernel covers the fit
    (the gate family declares it: ``"fused" in Gate.kernels``)."""
    if not (compile is True or compile is False or (isinstance(compile, str) and compile == "auto")):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if compile is True and gate is not None:
        why = None
        if not gate.supports("fused"):
            fams = " or ".join(n for n, c in GATES.items() if "fused" in c.kernels)
            why = f"a {fams} gate (got gate={gate.name!r})"
        elif gate_steps != 1:
            why = f"gate_steps=1 (got {gate_steps})"
        elif dtype != torch.float64:
            why = f"dtype=torch.float64 (got {dtype}; its step checks cannot be resolved in lower precision)"
        if why is not None:
            raise ValueError(f"compile=True (CLI --compile on) runs a fused kernel that needs {why}; "
                             "use compile='auto' or False (--compile auto|off)")


def _use_fused(compile, gate: Gate, R: int, n: int, gate_steps: int, dtype, device, max_iter: int = 0) -> bool:
    """Whether the EM loop runs the compiled one-pass kernel (see fit_em's ``compile``)."""
    if compile is False:
        return False
    K, d = gate.n_experts, gate.n_features
    ok = _fused.supported(gate, K, d) and gate_steps == 1 and dtype == torch.float64
    if compile is True:
        if not ok:
            raise ValueError(
                f"compile=True (CLI --compile on) runs a fused kernel for models with 2 or more experts and at most "
                f"{_fused.MAX_SUMS} sums per pass ({K} experts, {d} features need {_fused.n_sums(K, d)}); "
                "use compile='auto' or False (--compile auto|off)"
            )
        return _fused.available(K, d, dtype, device, strict=True)
    if not ok or R * n * K < _AUTO_COMPILE_MIN or R * n * K * max_iter < _AUTO_COMPILE_WORK:
        return False
    return _fused.available(K, d, dtype, device)


def _init_state(gate_template: Gate, resp, x, x1, y, var_floor) -> _State:
    """Parameters from initial responsibilities: expert M-step, then gate Newton steps from zero."""
    K = resp.shape[-2]
    resp = 0.95 * resp + 0.05 / K  # soften hard starts so no expert starts empty
    theta, var = expert_m_step(x1, y, resp, var_floor)
    if gate_template.sparse_routing:
        # A top-K gate at its all-equal start would give every expert positive
        # responsibility, and every sparse move would then make Q_gate = -inf:
        # start from the dense softmax fit of the same linear logits instead.
        th = softmax_gate_newton_step(x1, resp, _gate_theta(gate_template), 3)
        gate = gate_template.replace(slope=th[..., :-1], intercept=th[..., -1])
    else:
        gate = _gate_step(gate_template, x, x1, resp, 3)
    return _State(gate, theta, var)


def _template(spec: GateSpec, K, d, R, dtype, device) -> Gate:
    return spec.template(K, d, (R,), dtype=dtype, device=device)


def _collapsed(resp_sizes, var, min_size, min_sd):
    """(R,) bool: any expert with size < min_size or sd < min_sd (standardised y)."""
    return (resp_sizes < min_size).any(-1) | (var.sqrt() < min_sd).any(-1)


@dataclass
class _Problem:
    """Validated data and settings shared by the EM and gradient estimators."""

    x: torch.Tensor  # [B, n, d] original units
    y: torch.Tensor  # [B, n]
    xs: torch.Tensor  # standardised
    ys: torch.Tensor
    batch: tuple
    scaling: Scaling
    n_experts: int
    gate: GateSpec
    min_size: float
    generator: torch.Generator
    dtype: torch.dtype

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.x.shape[1]

    @property
    def d(self) -> int:
        return self.x.shape[2]


def check_n_experts(n_experts) -> int:
    """n_experts as an int; ValueError unless it is an integer >= 1 (bool rejected)."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an integer >= 1, got {n_experts!r}")
    return n_experts


def _setup(x, y, n_experts, gate: GateSpec, min_expert_size, random_state, dtype, device) -> _Problem:
    """Validate the data and the data-dependent settings; standardise the data.

    ``gate`` is the validated gate family of the fit (:func:`moelab.gates.gate_spec`).
    """
    K = check_n_experts(n_experts)
    x, y, batch = prepare_xy(x, y, dtype=dtype, device=device)
    B, n, d = x.shape
    n_params = gate.n_free_parameters(K, d) + K * (d + 2)
    if n < n_params:
        raise ValueError(
            f"{n} samples are fewer than the {n_params} free parameters of a {K}-expert model with "
            f"{d} feature(s); use fewer experts or more data"
        )
    if min_expert_size == "auto":
        min_size = min(10.0, n / (4.0 * K))
    else:
        try:
            min_size = float(min_expert_size)
        except (TypeError, ValueError):
            raise ValueError(f"min_expert_size must be a number >= 0 or 'auto', got {min_expert_size!r}") from None
        if not min_size >= 0:
            raise ValueError(f"min_expert_size must be >= 0 or 'auto', got {min_expert_size!r}")
    if isinstance(random_state, torch.Generator):
        gen = random_state
    else:
        seed = int(random_state) if random_state is not None else int(torch.randint(2**31 - 1, (1,)))
        gen = torch.Generator(device="cpu").manual_seed(seed)
    scaling = Scaling.fit(x, y, center_x=gate.family.affine_invariant)
    xs, ys = scaling.transform(x, y)
    return _Problem(x, y, xs, ys, tuple(batch), scaling, K, gate, min_size, gen, dtype)


@contextlib.contextmanager
def _threads_for(prob: _Problem):
    """Run small problems on one intra-op thread (restored afterwards).

    Per-iteration work below ~10^6 elements is dominated by thread
    synchronisation; on a busy 2-core machine two threads made small fits up
    to 70x slower than one.
    """
    before = torch.get_num_threads()
    small = prob.B * prob.n * prob.n_experts * 100 < 1_000_000
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and before > 1:
            torch.set_num_threads(before)


def _design(xr):
    return torch.cat([xr, torch.ones(*xr.shape[:-1], 1, dtype=xr.dtype, device=xr.device)], -1)


def _starts(prob: _Problem, S: int, init: str, init_model, var_floor, n_candidates=None):
    """Starting parameters for S starts per problem (problem-major), in standardised units.

    Returns state, xr (B·S, n, d), x1r (B·S, n, d+1), yr (B·S, n).
    """
    B, n, d, K = prob.B, prob.n, prob.d, prob.n_experts
    dtype, dev = prob.dtype, prob.x.device
    if init_model is not None:
        if not isinstance(init_model, GaussianMoE):
            raise TypeError(f"init_model must be a GaussianMoE, got {type(init_model).__name__}")
        if init_model.n_experts != K or init_model.n_features != d:
            raise ValueError(
                f"init_model has {init_model.n_experts} experts and {init_model.n_features} features; "
                f"expected {K} and {d}"
            )
        if init_model.gate.name != prob.gate.name:
            raise ValueError(f"init_model has a {init_model.gate.name!r} gate but gate={prob.gate.name!r}")
        m0 = init_model.to(dtype=dtype, device=dev)
        mb = tuple(m0.batch_shape)
        if mb == ():
            expand = lambda t: t.expand(B * S, *t.shape).clone()  # noqa: E731
        elif mb == prob.batch + (S,) or (S == 1 and mb == prob.batch):
            expand = lambda t: t.reshape(B * S, *t.shape[len(mb):])  # noqa: E731
        else:
            raise ValueError(f"init_model batch shape {mb} does not match the data's batch shape {prob.batch} "
                             f"(one start per problem) or {prob.batch + (S,)} ({S} starts per problem)")
        scaling = prob.scaling if S == 1 else prob.scaling.expand(S)
        m0 = scaling.model_to_scaled(GaussianMoE(m0.gate.map_tensors(expand), m0.experts.map_tensors(expand)))
        theta = torch.cat([m0.experts.slope, m0.experts.intercept.unsqueeze(-1)], -1)
        state = _State(m0.gate, theta, m0.experts.variance.clamp_min(var_floor))
        if S == 1:
            return state, prob.xs, _design(prob.xs), prob.ys
        xr, yr = prob.xs.repeat_interleave(S, 0), prob.ys.repeat_interleave(S, 0)  # problem-major
        return state, xr, _design(xr), yr
    plan = _start_plan(init, S, n_candidates, n)
    states, xrs, x1rs, yrs = [], [], [], []
    for method, n_cand, n_keep in plan:
        resp_parts = [init_responsibilities(method, prob.xs[b], prob.ys[b], K, n_cand, prob.generator) for b in range(B)]
        resp0 = torch.cat(resp_parts, 0).to(dev).transpose(-1, -2).contiguous()  # [B*n_cand, K, n]
        xr = prob.xs.repeat_interleave(n_cand, 0)
        yr = prob.ys.repeat_interleave(n_cand, 0)
        x1r = _design(xr)
        template = _template(prob.gate, K, d, B * n_cand, dtype, dev)
        state = _init_state(template, resp0, xr, x1r, yr, var_floor)
        if n_keep < n_cand:
            # screen by the likelihood of the initial fit (for segment starts this is the
            # segmented-regression likelihood, which ranks rare hard-switch basins well)
            # Each kept start is the best of its own group of candidates, so the kept
            # starts stay diverse (a plain top-k concentrates on near-duplicates).
            _, ll = _e_step(state.gate, state.theta, state.var, xr, x1r, yr)
            group = n_cand // n_keep
            ll = torch.nan_to_num(ll, nan=-math.inf).reshape(B, n_cand)[:, : group * n_keep].reshape(B, n_keep, group)
            top = ll.argmax(-1) + torch.arange(n_keep, device=dev) * group  # [B, n_keep]
            idx = (top + torch.arange(B, device=dev).unsqueeze(-1) * n_cand).reshape(-1)
            state, xr, x1r, yr = state.take(idx), xr[idx], x1r[idx], yr[idx]
        states.append(state)
        xrs.append(xr.reshape(B, n_keep, n, d))
        x1rs.append(x1r.reshape(B, n_keep, n, d + 1))
        yrs.append(yr.reshape(B, n_keep, n))
    # problem-major order: all starts of problem 0, then problem 1, ...
    counts = [k for _, _, k in plan]
    offsets = torch.tensor([0] + counts[:-1], device=dev).cumsum(0)
    order = torch.cat([(torch.arange(B, device=dev).unsqueeze(-1) * c + torch.arange(c, device=dev)) + B * off for c, off in zip(counts, offsets.tolist())], 1).reshape(-1)
    state = _cat_states(states).take(order)
    xr = torch.cat(xrs, 1).reshape(-1, n, d)
    x1r = torch.cat(x1rs, 1).reshape(-1, n, d + 1)
    yr = torch.cat(yrs, 1).reshape(-1, n)
    return state, xr, x1r, yr


#: share of the "auto" starts by strategy: (method, share, screened)
_AUTO_MIX = (("segments", 0.3, True), ("segments", 0.35, False), ("kmeans", 0.15, False), ("lines", 0.1, False), ("random", 0.1, False))


def _start_plan(init: str, n_init: int, n_candidates: Optional[int], n_samples: int = 0):
    """[(method, candidates generated, starts kept)] per problem, summing to n_init kept starts."""
    if init != "auto":
        cand = n_init if n_candidates is None else max(int(n_candidates), n_init)
        return [(init, cand, n_init)]
    # default: 2000 segment candidates, fewer for large n so screening stays within
    # ~4·10^6 sample-candidates (each candidate materialises (K, n) responsibilities)
    cand = min(2000, int(4_000_000 // max(n_samples, 1))) if n_candidates is None else int(n_candidates)
    keeps = [int(round(share * n_init)) for _, share, _ in _AUTO_MIX]
    keeps[1] += n_init - sum(keeps)  # rounding remainder to plain segments
    plan = []
    for (method, _, screened), k in zip(_AUTO_MIX, keeps):
        if k > 0:
            plan.append((method, max(cand, k) if screened else k, k))
    return plan


def _cat_states(states):
    if len(states) == 1:
        return states[0]
    g0 = states[0].gate
    gate = g0.map_tensors(lambda t: t)
    for a in g0.batched_attrs:
        setattr(gate, a, torch.cat([getattr(st.gate, a) for st in states], 0))
    return _State(gate, torch.cat([st.theta for st in states], 0), torch.cat([st.var for st in states], 0))


def fit_em(
    x,
    y,
    n_experts: int,
    *,
    gate: str = "softmax",
    gate_options: Optional[dict] = None,
    n_init: int = 160,
    init: str = "auto",
    init_model: Optional[GaussianMoE] = None,
    n_candidates: Optional[int] = None,
    max_iter: int = 2000,
    tol: float = 1e-8,
    reg_variance: float = 1e-6,
    min_expert_size="auto",
    min_expert_sd: float = 0.01,
    gate_steps: int = 1,
    random_state=None,
    dtype=torch.float64,
    device=None,
    warn: bool = True,
    compile="auto",
    convergence: str = "mean",
) -> EMResult:
    """Fit a Gaussian mixture of experts by EM, batched over problems and restarts.

    Parameters
    ----------
    x : array-like of shape (n_samples,), (n_samples, n_features) or (..., n_samples, n_features)
        Inputs; leading dimensions are independent problems fitted together.
    y : array-like of shape (..., n_samples)
        Responses (broadcast against x's leading dimensions).
    n_experts : int
        K ≥ 1.
    gate : {"softmax", "temperature", "activation", "topk"}, default "softmax"
    gate_options : dict, optional
        ``temperature`` (float > 0), ``learn_temperature`` (bool), ``activation``
        (name or callable), ``top_k`` (int) as the family takes them.
    n_init : int, default 160
        Starts per problem run to convergence, all in one batch (the best
        valid one is returned).
    init : {"auto", "kmeans", "random", "segments", "lines"}, default "auto"
        Start strategy. "auto" mixes: 30% the best of ``n_candidates``
        contiguous-segment starts ranked by the likelihood of their initial
        fit, 35% plain segment starts, 15% k-means on (x, y), 10% random lines,
        10% random soft responsibilities.
    init_model : GaussianMoE, optional
        User starting values; overrides ``init``. Batch shape () or the
        problems' batch shape B: that single start per problem. Batch shape
        B + (S,): S user starts per problem, all run in one batch, and the
        best valid one is returned as for ``n_init`` starts (``start_loglik``
        holds all S; ``n_init`` is ignored). For ``gate="topk"``
        without it, the dense softmax model is fitted first (with these start
        settings) and its top-K sparsification is the start: EM keeps each
        sample's routing set, so the start decides it.
    n_candidates : int, optional
        Candidates screened by their initial likelihood: for "auto" the
        segment candidates (default 2000, or 4·10^6 / n_samples when smaller);
        for a single method, that many
        starts of which the best ``n_init`` run (default ``n_init``).
    max_iter : int, default 2000
        Maximum EM iterations per start.
    tol : float, default 1e-8
        Stopping threshold of the ``convergence`` rule; 0 disables early
        stopping (exactly ``max_iter`` iterations, e.g. for benchmarks).
    convergence : {"mean", "relative"}, default "mean"
        "mean": stop when |Δ mean log-likelihood per sample| < tol (does not
        depend on n). "relative": stop when |Δℓ| < tol·|ℓ_prev|, the relative
        change of the total log-likelihood ℓ in the original units of y (the
        rule of the R packages meteorits/meteoritsSim, ``threshold``); it
        depends on the units of y, since rescaling y by c shifts ℓ by −n log c.
        Either way each EM step is the same and ℓ never decreases; only where
        the iterations stop changes.
    reg_variance : float, default 1e-6
        Variance floor as a fraction of var(y).
    min_expert_size : float or "auto", default "auto"
        Starts where an expert's effective size Σ_n r_nk falls below this are
        rejected as collapsed; "auto" = min(10, n_samples / (4 n_experts)).
    min_expert_sd : float, default 0.01
        Starts where an expert's σ falls below this fraction of sd(y) are rejected.
    gate_steps : int, default 1
        Newton steps per gate M-step.
    random_state : int, torch.Generator or None
    dtype : torch.dtype, default torch.float64
    device : torch device, optional
    warn : bool, default True
        Emit :class:`ConvergenceWarning` / :class:`DegenerateFitWarning`.
    compile : {"auto", True, False}, default "auto"
        Run each EM iteration as one fused pass over the data compiled with
        ``torch.compile`` (:mod:`moelab._fused`; softmax and temperature gates,
        ``gate_steps=1``, float64, small K and d). Same updates as the eager loop, so
        the fits agree to rounding. Compiling takes seconds to a minute once
        per process and model shape (Inductor caches it on disk), then an
        iteration is 4–40× faster at large R·n. "auto" compiles when
        starts × n_samples × n_experts ≥ 10^6 and that × max_iter ≥ 10^9
        (a minute or more of eager EM), and falls back to the eager loop with
        a RuntimeWarning if compilation fails (CPU needs a C++ compiler);
        True requires it (RuntimeError if it fails).

    Returns
    -------
    EMResult

    Raises
    ------
    ValueError
        Bad shapes, NaN/inf, constant columns, n_experts < 1, fewer samples than
        parameters, unknown gate/init/options, non-positive temperature;
        compile=True for a model the fused kernel does not cover.
    RuntimeError
        compile=True and torch.compile fails.
    """
    t0 = time.perf_counter()
    _check_compile(compile)
    for nm, v in (("n_init", n_init), ("max_iter", max_iter), ("gate_steps", gate_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if nm == "max_iter" else 1):
            raise ValueError(f"{nm} must be a positive integer, got {v!r}")
    if not (tol >= 0):
        raise ValueError(f"tol must be >= 0 (0 runs exactly max_iter iterations), got {tol!r}")
    if not (isinstance(convergence, str) and convergence in CONVERGENCE_RULES):
        raise ValueError(f"convergence must be one of {', '.join(map(repr, CONVERGENCE_RULES))} (the stopping rule "
                         f"on the change of the log-likelihood), got {convergence!r}")
    if not (reg_variance > 0):
        raise ValueError(f"reg_variance must be > 0, got {reg_variance!r}")
    if init not in ("auto",) + INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; choose one of auto, {', '.join(INIT_METHODS)}, or pass init_model")
    spec = gate_spec(gate, gate_options, n_experts=check_n_experts(n_experts))
    _check_compile(compile, spec, gate_steps, dtype)
    if spec.family.sparse_routing and init_model is None:
        # EM cannot change which experts a sample is routed to (dropping an expert with
        # positive responsibility makes Q = -inf), so a top-K fit is only as good as its
        # routing at the start: fit the dense softmax model first, then sparsify it.
        dense = fit_em(x, y, n_experts, gate="softmax", n_init=n_init, init=init, n_candidates=n_candidates,
                       max_iter=max_iter, tol=tol, reg_variance=reg_variance, min_expert_size=min_expert_size,
                       min_expert_sd=min_expert_sd, gate_steps=gate_steps, random_state=random_state, dtype=dtype,
                       device=device, warn=False, compile=compile, convergence=convergence)
        init_model = GaussianMoE(spec.family.from_dense(dense.model.gate, **spec.options), dense.model.experts)
    prob = _setup(x, y, n_experts, spec, min_expert_size, random_state, dtype, device)
    if n_candidates is not None and int(n_candidates) < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    var_floor = reg_variance
    with _threads_for(prob):
        n_keep = n_init if init_model is None else _user_starts(init_model, prob.batch)
        state, xr, x1r, yr = _starts(prob, n_keep, init, init_model, var_floor, n_candidates)
        R = xr.shape[0]
        history = torch.full((R, max_iter + 1), math.nan, dtype=prob.dtype, device=xr.device)
        fused = _use_fused(compile, state.gate, R, prob.n, gate_steps, prob.dtype, xr.device, max_iter)
        sizes = torch.zeros(R, prob.n_experts, dtype=prob.dtype, device=xr.device) if fused else None
        # ℓ_scaled − ℓ_original = n log s_y per start, for the relative rule
        offset = (prob.n * prob.scaling.y_scale.log()).repeat_interleave(n_keep) if convergence == "relative" else None
        state, ll, it, conv = _run_em(state, xr, x1r, yr, max_iter, tol, var_floor, gate_steps, history, fused, sizes,
                                      ll_offset=offset)
    settings = dict(gate=gate, gate_options=dict(gate_options or {}), n_init=n_keep if init_model is not None else n_init,
                    init=init if init_model is None else "user", n_candidates=n_candidates, max_iter=max_iter, tol=tol,
                    convergence=convergence, estimator="em", compiled=fused)
    return _finish(state, xr, x1r, yr, conv, it, history, prob.batch, n_keep, prob.scaling, prob.min_size,
                   min_expert_sd, settings, t0, warn, max_iter, tol, final=(sizes, ll) if fused else None)


def _user_starts(init_model, batch) -> int:
    """Starts per problem given by ``init_model``: S when its batch shape is batch + (S,), else 1."""
    mb = tuple(getattr(init_model, "batch_shape", ()))
    if len(mb) == len(batch) + 1 and mb[:-1] == tuple(batch):
        return int(mb[-1])
    return 1


def _finish(state, xr, x1r, yr, conv, iters, history, batch, n_keep, scaling, min_size, min_expert_sd,
            settings, t0, warn, max_iter, tol, final=None) -> "EMResult":
    """Pick the best valid start per problem, map it back to original units, warn.

    ``final`` = (sizes (R, K), loglik (R,)) at ``state`` if the EM loop already has them.
    """
    B = int(torch.tensor(batch).prod()) if len(batch) else 1
    n = yr.shape[-1]
    K = state.theta.shape[-2]
    if final is not None:
        sizes, ll = final
    else:
        with torch.no_grad():
            resp, ll = _e_step(state.gate, state.theta, state.var, xr, x1r, yr)
        sizes = resp.sum(-1)
    bad = _collapsed(sizes, state.var, min_size, min_expert_sd) | ~torch.isfinite(ll)
    llB = ll.reshape(B, n_keep)
    badB = bad.reshape(B, n_keep)
    score = torch.where(badB, torch.full_like(llB, -math.inf), llB)
    all_bad = badB.all(-1)
    best = torch.where(all_bad, torch.nan_to_num(llB, nan=-math.inf).argmax(-1), score.argmax(-1))
    pick = best + torch.arange(B, device=yr.device) * n_keep
    final = state.take(pick)
    shift = n * scaling.y_scale.log()  # ll_original = ll_scaled − n log s_y
    experts_s = GaussianExperts(final.theta[..., :-1], final.theta[..., -1], final.var)
    model = scaling.model_to_original(GaussianMoE(final.gate, experts_s))
    reshape = lambda t: t.reshape(tuple(batch) + tuple(t.shape[1:]))  # noqa: E731
    model = GaussianMoE(model.gate.map_tensors(reshape), model.experts.map_tensors(reshape))
    conv_sel = conv[pick]
    hist = history[pick] - shift.unsqueeze(-1)
    last = int((~torch.isnan(hist)).sum(-1).max()) if hist.numel() else 0
    hist = hist[:, :last]
    result = EMResult(
        model=model,
        loglik=(ll[pick] - shift).reshape(batch),
        n_iter=iters[pick].reshape(batch),
        converged=conv_sel.reshape(batch),
        history=hist.reshape(*batch, last),
        expert_size=sizes[pick].reshape(*batch, K),
        degenerate=all_bad.reshape(batch),
        start_loglik=(score - shift.unsqueeze(-1)).reshape(*batch, n_keep),
        seconds=time.perf_counter() - t0,
        n_samples=n,
        settings=settings,
    )
    if warn:
        warn_if_temperature_not_identified(final.gate, xr[pick], stacklevel=4)
        if bool(all_bad.any()):
            warnings.warn(
                f"every start collapsed an expert in {int(all_bad.sum())} of {B} problem(s) (effective size < "
                f"{min_size:g} or sd < {min_expert_sd:g}·sd(y)); the best collapsed fit is returned. Use fewer "
                "experts, more starts (n_init), or lower min_expert_size.",
                DegenerateFitWarning,
                stacklevel=3,
            )
        if not bool(conv_sel.all()):
            warnings.warn(
                f"{settings.get('estimator', 'EM').upper()} did not converge in {max_iter} iterations for {int((~conv_sel).sum())} of {B} problem(s) "
                f"(tol={tol:g} on the {'relative change of the' if settings.get('convergence') == 'relative' else 'mean'} "
                "log-likelihood); raise max_iter or tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
    return result
