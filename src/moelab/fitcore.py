"""The fitting core shared by :func:`moelab.fit_em` and :func:`moelab.fit_mle`.

One owner for what both estimators do around their iterations:

* **problem set-up** (:func:`setup_problem` → :class:`Problem`): validate the
  data and the data-dependent settings, standardise x and y
  (:class:`moelab._scaling.Scaling`);
* **the E-step** (:func:`e_step`): responsibilities (R, K, n) and the
  log-likelihood (R,) in log space, experts-first layout;
* **starts** (:func:`make_starts`): user models (batch () / B / B + (S,)) or
  the start strategies of :mod:`moelab.init`, screened and planned
  (:func:`start_plan`), as one problem-major batch of :class:`State`;
* **the result** (:func:`finish`): the best valid start per problem, mapped
  back to original units, as an :class:`EMResult`, with the warnings.

Not part of the user API (``moelab`` does not re-export it); the estimators
use these names and nothing private.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning

from ._scaling import Scaling
from .threads import fit_threads, using_threads
from ._validation import as_tensor, check_xy
from .diagnostics import warn_fit
from .exceptions import DegenerateFitWarning, MoelabWarning
from .experts import GaussianExperts
from .gates import Gate, GateSpec
from .gates.identifiability import warn_if_temperature_not_identified
from .init import init_responsibilities
from .model import GaussianMoE
from .options import FitOptions, check_n_experts
from .mstep import expert_m_step, gate_newton_step, softmax_gate_newton_step

__all__ = ["ConvergenceWarning", "DegenerateFitWarning", "EMResult", "prepare_xy", "check_n_experts", "Problem",
           "setup_problem", "State", "e_step", "gate_step", "gate_theta", "theta_gate", "index_gate", "scatter_gate",
           "init_state", "gate_template", "threads_for", "design", "make_starts", "start_plan", "cat_states",
           "user_starts", "collapsed", "loglik_offset", "finish"]


class ConvergenceWarning(MoelabWarning, _SklearnConvergenceWarning):
    """EM (or L-BFGS) stopped at ``max_iter`` before the log-likelihood settled.

    A :class:`moelab.exceptions.MoelabWarning` and a subclass of scikit-learn's
    ``sklearn.exceptions.ConvergenceWarning``, so
    ``warnings.filterwarnings(..., category=sklearn.exceptions.ConvergenceWarning)``
    covers moelab's fits too.
    """


@dataclass
class EMResult:
    """What :func:`fit_em` returns (leading dimensions = the problems' batch shape).

    Attributes
    ----------
    model : GaussianMoE
        Fitted model in the original units of x and y, batch shape B.
    loglik : tensor of shape B
        Total log-likelihood at ``model``, the one the fit maximised:
        Σ_n log p(y_n | x_n), or Σ_n log p(x_n, y_n) for a gate that models x
        (``Gate.models_x``, the Gaussian gate).
    x_loglik : tensor of shape B
        Σ_n log p(x_n) (0 for gates that model only y given x), so
        ``loglik - x_loglik`` is the conditional log-likelihood Σ_n log p(y_n | x_n).
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
    x_loglik: Optional[torch.Tensor] = None


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


def gate_theta(gate: Gate) -> torch.Tensor:
    """Linear-logit gate → logit coefficients θ (R, K, d+1) on [x, 1] (the gate's own map)."""
    return gate.logit_coefficients()


def theta_gate(gate: Gate, theta: torch.Tensor) -> Gate:
    return gate.with_logit_coefficients(theta)


def gate_step(gate: Gate, x, x1, resp, n_steps, xx=None):
    if gate.models_x:  # closed form on the joint likelihood (Gaussian gate)
        return gate.m_step(x, resp)
    if gate.linear_logits:
        return theta_gate(gate, softmax_gate_newton_step(x1, resp, gate_theta(gate), n_steps, xx))
    return gate_newton_step(gate, x, resp, n_steps)


def linear_kn(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """θ_k·[x_n, 1] for every expert and sample: theta (R, K, d+1), x (R, n, d) → (R, K, n).

    ``x`` may also be one design (n, d) shared by all R problems (the starts of one fit):
    then one matrix product over the R·K rows. A batched matmul with inner dimension d
    (baddbmm), or one fused multiply-add when d = 1: matmuls with an inner dimension of
    1–2 are slow on CPU.
    """
    if x.shape[-1] == 1:
        return torch.addcmul(theta[..., 1:], theta[..., :1], x.transpose(-1, -2))
    if x.dim() == 2:
        R, K, p = theta.shape
        return torch.addmm(theta[..., -1:].reshape(R * K, 1), theta[..., :-1].reshape(R * K, p - 1), x.t()).view(R, K, -1)
    return torch.baddbmm(theta[..., -1:], theta[..., :-1], x.transpose(-1, -2))


def log_gate_kn(gate, x, x1):
    """log g in the experts-first layout (R, K, n)."""
    if gate.linear_logits:
        return torch.log_softmax(linear_kn(gate_theta(gate), x), -2)
    return gate.log_weights(x).transpose(-1, -2)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def e_step(gate, theta_e, var, x, x1, y):
    """log g + log f, then logsumexp over experts: resp (R, K, n) and loglik (R,).

    x (R, n, d), x1 (R, n, d+1), y (R, n); for linear logits also one design x (n, d), x1 (n, d+1), y (n,)
    shared by all R problems (see :func:`linear_kn`).

    The loglik is Σ log p(y | x); for gates that model x (``models_x``) it is the joint
    Σ log p(x, y) that their EM maximises (log π_k N(x; c_k, Γ_k) in place of log g_k(x)).
    """
    logw = gate.logits_kn(x) if gate.models_x else log_gate_kn(gate, x, x1)
    mean = linear_kn(theta_e, x)  # [R, K, n]
    if torch.is_grad_enabled() and (logw.requires_grad or mean.requires_grad or var.requires_grad):
        v = var.unsqueeze(-1)  # autograd path (fit_mle): no in-place updates
        joint = logw - (_HALF_LOG_2PI + 0.5 * v.log() + 0.5 * (y.unsqueeze(-2) - mean).square() / v)
        lse = torch.logsumexp(joint, -2)
        return (joint - lse.unsqueeze(-2)).exp(), lse.sum(-1)
    # in place on the one (R, K, n) temporary: joint = logw − ½log(2πν) − (y − mean)²/(2ν)
    joint = mean.sub_(y.unsqueeze(-2)).square_().mul_((-0.5 / var).unsqueeze(-1))
    joint.add_(logw).sub_((_HALF_LOG_2PI + 0.5 * var.log()).unsqueeze(-1))
    # logsumexp over the few experts by hand: max, exp in place, sum; half the passes of
    # torch.logsumexp followed by a subtract and exp (measured 1.7 vs 3.3 ms at (40, 3, 6000))
    top = joint.amax(-2, keepdim=True)  # [R, 1, n]
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    resp = joint.sub_(top).exp_()
    total = resp.sum(-2, keepdim=True)
    return resp.div_(total), (total.log_().add_(top)).sum((-1, -2))


def index_gate(gate: Gate, idx) -> Gate:
    return gate.map_tensors(lambda t: t[idx])


def scatter_gate(full: Gate, idx, part: Gate) -> Gate:
    new = full.map_tensors(lambda t: t.clone())
    for a in full.batched_attrs:
        getattr(new, a)[idx] = getattr(part, a)
    return new


@dataclass
class State:
    gate: Gate
    theta: torch.Tensor  # [R, K, p] experts [a, b]
    var: torch.Tensor  # [R, K]

    def take(self, idx):
        return State(index_gate(self.gate, idx), self.theta[idx], self.var[idx])

    def put(self, idx, part: "State") -> "State":
        """A copy with problems ``idx`` replaced by ``part`` (the inverse of :meth:`take`)."""
        return State(scatter_gate(self.gate, idx, part.gate), self.theta.index_put((idx,), part.theta),
                     self.var.index_put((idx,), part.var))


def init_state(gate_template: Gate, resp, x, x1, y, opts: FitOptions) -> State:
    """Parameters from initial responsibilities resp (R, K, n): expert M-step, then gate Newton steps from zero.

    x (R, n, d), x1 (R, n, d+1), y (R, n), or for linear logits one data set x (n, d), x1 (n, d+1), y (n,) shared
    by the R candidates."""
    K = resp.shape[-2]
    resp = 0.95 * resp + 0.05 / K  # soften hard starts so no expert starts empty
    theta, var = expert_m_step(x1, y, resp, opts.reg_variance)
    if gate_template.sparse_routing:
        # A top-K gate at its all-equal start would give every expert positive
        # responsibility, and every sparse move would then make Q_gate = -inf:
        # start from the dense softmax fit of the same linear logits instead.
        th = softmax_gate_newton_step(x1, resp, gate_theta(gate_template), 3)
        gate = gate_template.replace(slope=th[..., :-1], intercept=th[..., -1])
    else:
        gate = gate_step(gate_template, x, x1, resp, 3)
    return State(gate, theta, var)


def gate_template(spec: GateSpec, K, d, R, dtype, device) -> Gate:
    return spec.template(K, d, (R,), dtype=dtype, device=device)


def collapsed(resp_sizes, var, min_size, min_sd):
    """(R,) bool: any expert with size < min_size or sd < min_sd (standardised y)."""
    return (resp_sizes < min_size).any(-1) | (var.sqrt() < min_sd).any(-1)


@dataclass
class Problem:
    """Validated data and settings shared by the EM and gradient estimators.

    ``options`` holds the fit's settings; ``n_experts``, ``gate`` and
    ``dtype`` repeat three of them, ``min_size`` is ``min_expert_size``
    resolved for n.
    """

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
    options: FitOptions

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.x.shape[1]

    @property
    def d(self) -> int:
        return self.x.shape[2]


def setup_problem(x, y, opts: FitOptions, random_state) -> Problem:
    """Validate the data and the data-dependent settings; standardise the data.

    ``opts`` are the fit's validated settings (its gate family, number of experts, dtype, device).
    """
    K, gate = opts.n_experts, opts.gate
    x, y, batch = prepare_xy(x, y, dtype=opts.dtype, device=opts.device)
    B, n, d = x.shape
    if opts.feature_names is not None and len(opts.feature_names) != d:
        raise ValueError(f"feature_names has {len(opts.feature_names)} names but x has {d} columns; give one name per column")
    n_params = gate.n_free_parameters(K, d) + K * (d + 2)
    if n < n_params:
        raise ValueError(
            f"{n} samples are fewer than the {n_params} free parameters of a {K}-expert model with "
            f"{d} feature(s); use fewer experts or more data"
        )
    min_size = opts.min_size(n)
    if isinstance(random_state, torch.Generator):
        gen = random_state
    else:
        seed = int(random_state) if random_state is not None else int(torch.randint(2**31 - 1, (1,)))
        gen = torch.Generator(device="cpu").manual_seed(seed)
    scaling, xs, ys = Scaling.fit_transform(x, y, center_x=gate.family.affine_invariant)
    return Problem(x, y, xs, ys, tuple(batch), scaling, K, gate, min_size, gen, opts.dtype, opts)


def threads_for(prob: Problem, starts: int = 1):
    """Run the fit on :func:`moelab.threads.fit_threads` intra-op threads (a context manager, restored
    afterwards): one for small problems (below ~10^6 elements per iteration thread synchronisation
    dominates; on a busy 2-core machine two threads made small fits up to 70x slower than one), and never
    more than the cores without another runnable task. ``starts`` per problem."""
    return using_threads(fit_threads(prob.B * starts * prob.n * prob.n_experts * 100, torch.get_num_threads()))


def design(xr):
    return torch.cat([xr, torch.ones(*xr.shape[:-1], 1, dtype=xr.dtype, device=xr.device)], -1)


def make_starts(prob: Problem, S: int, init_model=None, design_matrix: bool = True):
    """Starting parameters for S starts per problem (problem-major), in standardised units.

    From ``init_model`` if given, else from the strategy ``prob.options.init``.

    Returns state, xr (B·S, n, d), x1r (B·S, n, d+1), yr (B·S, n); x1r is None with
    ``design_matrix=False`` (the one-pass EM never reads it, and building it costs more than a pass
    over x at large n: build it with :func:`design` where it is needed).
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
        state = State(m0.gate, theta, m0.experts.variance.clamp_min(prob.options.reg_variance))
        if S == 1:
            return state, prob.xs, design(prob.xs) if design_matrix else None, prob.ys
        xr, yr = prob.xs.repeat_interleave(S, 0), prob.ys.repeat_interleave(S, 0)  # problem-major
        return state, xr, design(xr) if design_matrix else None, yr
    plan = start_plan(prob.options.init, S, prob.options.n_candidates, n)
    states, xrs, yrs = [], [], []
    for method, n_cand, n_keep in plan:
        resp_parts = [init_responsibilities(method, prob.xs[b], prob.ys[b], K, n_cand, prob.generator) for b in range(B)]
        resp0 = torch.cat(resp_parts, 0).to(dev).transpose(-1, -2).contiguous()  # [B*n_cand, K, n]
        template = gate_template(prob.gate, K, d, B * n_cand, dtype, dev)
        if B == 1 and template.linear_logits:  # the candidates share one data set: keep it once
            data = (prob.xs[0], design(prob.xs[0]), prob.ys[0])
        else:
            xr = prob.xs.repeat_interleave(n_cand, 0)
            data = (xr, design(xr), prob.ys.repeat_interleave(n_cand, 0))
        state = init_state(template, resp0, *data, prob.options)
        if n_keep < n_cand:
            # screen by the likelihood of the initial fit (for segment starts this is the
            # segmented-regression likelihood, which ranks rare hard-switch basins well)
            # Each kept start is the best of its own group of candidates, so the kept
            # starts stay diverse (a plain top-k concentrates on near-duplicates).
            _, ll = e_step(state.gate, state.theta, state.var, *data)
            group = n_cand // n_keep
            ll = torch.nan_to_num(ll, nan=-math.inf).reshape(B, n_cand)[:, : group * n_keep].reshape(B, n_keep, group)
            top = ll.argmax(-1) + torch.arange(n_keep, device=dev) * group  # [B, n_keep]
            idx = (top + torch.arange(B, device=dev).unsqueeze(-1) * n_cand).reshape(-1)
            state = state.take(idx)
        xr, yr = prob.xs.repeat_interleave(n_keep, 0), prob.ys.repeat_interleave(n_keep, 0)
        states.append(state)
        xrs.append(xr.reshape(B, n_keep, n, d))
        yrs.append(yr.reshape(B, n_keep, n))
    # problem-major order: all starts of problem 0, then problem 1, ...
    counts = [k for _, _, k in plan]
    offsets = torch.tensor([0] + counts[:-1], device=dev).cumsum(0)
    order = torch.cat([(torch.arange(B, device=dev).unsqueeze(-1) * c + torch.arange(c, device=dev)) + B * off for c, off in zip(counts, offsets.tolist())], 1).reshape(-1)
    state = cat_states(states).take(order)
    xr = torch.cat(xrs, 1).reshape(-1, n, d)
    yr = torch.cat(yrs, 1).reshape(-1, n)
    return state, xr, design(xr) if design_matrix else None, yr


#: share of the "auto" starts by strategy: (method, share, screened)
_AUTO_MIX = (("segments", 0.3, True), ("segments", 0.35, False), ("kmeans", 0.15, False), ("lines", 0.1, False), ("random", 0.1, False))


def start_plan(init: str, n_init: int, n_candidates: Optional[int], n_samples: int = 0):
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


def cat_states(states):
    if len(states) == 1:
        return states[0]
    g0 = states[0].gate
    gate = g0.map_tensors(lambda t: t)
    for a in g0.batched_attrs:
        setattr(gate, a, torch.cat([getattr(st.gate, a) for st in states], 0))
    return State(gate, torch.cat([st.theta for st in states], 0), torch.cat([st.var for st in states], 0))


def user_starts(init_model, batch) -> int:
    """Starts per problem given by ``init_model``: S when its batch shape is batch + (S,), else 1."""
    mb = tuple(getattr(init_model, "batch_shape", ()))
    if len(mb) == len(batch) + 1 and mb[:-1] == tuple(batch):
        return int(mb[-1])
    return 1


def loglik_offset(prob: Problem) -> torch.Tensor:
    """ℓ_standardised − ℓ_original per problem (B,): n log s_y, plus n Σ_j log s_xj for gates that model x."""
    off = prob.n * prob.scaling.y_scale.log()
    if prob.gate.family.models_x:
        off = off + prob.n * prob.scaling.x_scale.log().sum(-1)
    return off


def finish(prob: Problem, state: State, xr, x1r, yr, conv, iters, history, n_keep: int, *, settings: dict, t0: float,
           final=None) -> "EMResult":
    """Pick the best valid start per problem, map it back to original units, warn.

    ``state``, ``xr``, ``x1r`` (None: built here if needed), ``yr``, ``conv`` (R,), ``iters`` (R,) and
    ``history`` (R, T) hold R = B·n_keep starts, problem-major, in standardised
    units; ``final`` = (sizes (R, K), loglik (R,)) at ``state`` if the EM loop
    already has them. Reads ``min_expert_sd``, ``warn``, ``max_iter``, ``tol`` and ``convergence`` from ``prob.options``.
    """
    opts = prob.options
    batch, scaling, min_size, min_expert_sd = prob.batch, prob.scaling, prob.min_size, opts.min_expert_sd
    B = int(torch.tensor(batch).prod()) if len(batch) else 1
    n = yr.shape[-1]
    K = state.theta.shape[-2]
    if final is not None:
        sizes, ll = final
    else:
        with torch.no_grad():
            resp, ll = e_step(state.gate, state.theta, state.var, xr, design(xr) if x1r is None else x1r, yr)
        sizes = resp.sum(-1)
    bad = collapsed(sizes, state.var, min_size, min_expert_sd) | ~torch.isfinite(ll)
    llB = ll.reshape(B, n_keep)
    badB = bad.reshape(B, n_keep)
    score = torch.where(badB, torch.full_like(llB, -math.inf), llB)
    all_bad = badB.all(-1)
    best = torch.where(all_bad, torch.nan_to_num(llB, nan=-math.inf).argmax(-1), score.argmax(-1))
    pick = best + torch.arange(B, device=yr.device) * n_keep
    final = state.take(pick)
    shift = loglik_offset(prob)  # ll_original = ll_scaled − n log s_y (− n Σ log s_x for gates that model x)
    experts_s = GaussianExperts(final.theta[..., :-1], final.theta[..., -1], final.var)
    model = scaling.model_to_original(GaussianMoE(final.gate, experts_s))
    reshape = lambda t: t.reshape(tuple(batch) + tuple(t.shape[1:]))  # noqa: E731
    model = GaussianMoE(model.gate.map_tensors(reshape), model.experts.map_tensors(reshape))
    conv_sel = conv[pick]
    if final.gate.models_x:
        with torch.no_grad():
            x_ll = final.gate.log_marginal(xr[pick]).sum(-1) - n * scaling.x_scale.log().sum(-1)
    else:
        x_ll = torch.zeros_like(shift)
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
        x_loglik=x_ll.reshape(batch),
    )
    if opts.warn:
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
                f"{opts.estimator.upper()} did not converge in {opts.max_iter} iterations for {int((~conv_sel).sum())} of {B} problem(s) "
                f"(tol={opts.tol:g} on the {'relative change of the' if opts.convergence == 'relative' else 'mean'} "
                "log-likelihood); raise max_iter or tol.",
                ConvergenceWarning,
                stacklevel=3,
            )
        warn_fit(prob.x, result.expert_size, result.start_loglik, n_init=n_keep, user_starts=settings.get("init") == "user",
                 degenerate=result.degenerate, feature_names=opts.feature_names, stacklevel=4)
    return result
