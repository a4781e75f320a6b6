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

import math
import time
from typing import Optional

import torch

from dataclasses import replace

from .gates import Gate, gate_spec
from .model import GaussianMoE
from . import _fused
from .mstep import expert_m_step, outer_design
from .diagnostics import warn_few_starts
from .fitcore import (ConvergenceWarning, DegenerateFitWarning, EMResult, State, e_step, finish, gate_step,
                      gate_theta, loglik_offset, make_starts, prepare_xy, scatter_gate, setup_problem, theta_gate,
                      threads_for, user_starts)
from .options import CONVERGENCE_RULES, FitOptions

__all__ = ["fit_em", "fit_em_with", "prepare_compiled", "FitOptions", "EMResult", "ConvergenceWarning", "DegenerateFitWarning", "prepare_xy", "CONVERGENCE_RULES"]


def _m_step(state, x, x1, y, resp, opts: FitOptions, xx):
    theta, var = expert_m_step(x1, y, resp, opts.reg_variance, state.theta, state.var, xx)
    gate = gate_step(state.gate, x, x1, resp, opts.gate_steps, xx)
    return State(gate, theta, var)


def _run_em(state: State, x, x1, y, opts: FitOptions, history, fused: bool = False, sizes=None, ll_offset=None):
    """Iterate EM on all R problems until each converges or ``opts.max_iter`` M-steps.

    history (R, max_iter + 1) receives the log-likelihood per iteration; returns the final state,
    loglik (R,), M-steps done (R,), converged (R,). ``fused=True`` runs each iteration as the
    compiled one-pass kernel of :mod:`moelab._fused` (linear-logit gates, one gate step);
    then ``sizes`` (R, K), if given, receives the effective expert sizes Σ_n r_nk at the final state.

    Stopping: |Δℓ| / n < tol (``ll_offset`` None), or, with ``ll_offset`` (R,) = ℓ_scaled − ℓ_original,
    the relative rule |Δℓ| < tol · |ℓ_prev − ll_offset| on the log-likelihood in the original units of y.
    """
    R, n = y.shape
    max_iter, tol = opts.max_iter, opts.tol
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
            gth = gate_theta(st.gate)
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
                    st = State(theta_gate(st.gate, gth), st.theta, st.var)
                    state = st if full else State(scatter_gate(state.gate, active, st.gate), state.theta, state.var)
            lla = stats["loglik"]
            if sizes is not None:
                sizes[active] = stats["S"][..., -1]
        else:
            xa, x1a, ya, xxa = (x, x1, y, xx_all) if full else (x[active], x1[active], y[active], xx_all[active])
            resp, lla = e_step(st.gate, st.theta, st.var, xa, x1a, ya)
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
            theta, var = _fused.expert_update(stats, st.theta, st.var, n, opts.reg_variance)
            xr_a = None if x_range is None else (x_range[0][active], x_range[1][active])
            gth, pending = _fused.gate_proposal(stats, gth, xa, x_range=xr_a)
            new = State(theta_gate(st.gate, gth), theta, var)
        else:
            new = _m_step(st, xa, x1a, ya, resp, opts, xxa)
        n_iter[active] += 1
        if full and active.numel() == R:
            state = new
        else:
            state = State(scatter_gate(state.gate, active, new.gate), state.theta.index_put((active,), new.theta), state.var.index_put((active,), new.var))
    return state, ll, n_iter, converged


#: compile="auto" compiles when the work per iteration (starts · n · K) reaches _AUTO_COMPILE_MIN and
#: the most work the fit may do (· max_iter) reaches _AUTO_COMPILE_WORK: about a minute of eager EM
#: (~15·10^6 sample·expert·iterations/s), so a cold compile (20–60 s) pays for itself
_AUTO_COMPILE_MIN = 1_000_000
_AUTO_COMPILE_WORK = 1_000_000_000
#: once this process has the kernels for (K, d) compiled and checked, there is no compile to pay for:
#: compile="auto" then uses them from starts · n · K ≥ _AUTO_WARM_MIN, where the fused pass is already the
#: faster one (measured on the 2-core machine, K = 3, float64, per iteration: one start n = 3,000 1.2×,
#: n = 10⁴ 2.1×, n = 10⁵ 6.4×; 8 starts n = 1,000 1.6×; one start n = 1,000 0.8×)
_AUTO_WARM_MIN = 10_000


def _use_fused(opts: FitOptions, gate: Gate, R: int, n: int, device) -> bool:
    """Whether the EM loop runs the compiled one-pass kernel (see fit_em's ``compile``)."""
    compile, dtype, max_iter = opts.compile, opts.dtype, opts.max_iter
    if compile is False:
        return False
    K, d = gate.n_experts, gate.n_features
    ok = _fused.supported(gate, K, d) and opts.gate_steps == 1 and dtype == torch.float64
    if compile is True:
        if not ok:
            raise ValueError(
                f"compile=True (CLI --compile on) runs a fused kernel for models with 2 or more experts and at most "
                f"{_fused.MAX_SUMS} sums per pass ({K} experts, {d} features need {_fused.n_sums(K, d)}); "
                "use compile='auto' or False (--compile auto|off)"
            )
        return _fused.available(K, d, dtype, device, strict=True)
    if not ok:
        return False
    if _fused.kernels.is_ready(_fused.kernel_key(K, d, dtype, device)):
        return R * n * K >= _AUTO_WARM_MIN
    if R * n * K < _AUTO_COMPILE_MIN or R * n * K * max_iter < _AUTO_COMPILE_WORK:
        return False
    return _fused.available(K, d, dtype, device)


def prepare_compiled(n_experts: int, n_features: int, *, gate: str = "softmax", gate_options: Optional[dict] = None,
                     dtype=torch.float64, device="cpu") -> bool:
    """Compile and check the fused EM kernels for this model shape now (a one-off cost).

    Afterwards ``fit_em(compile="auto")`` uses them in this process for every fit
    with starts × n_samples × n_experts ≥ 10^4 (see ``compile`` in :func:`fit_em`).
    Batched callers that know their total work in advance (the study runner)
    call it once instead of leaving every mid-size fit on the eager loop.

    Parameters
    ----------
    n_experts, n_features : int
        K ≥ 2 and d of the fits to come.
    gate : str, default "softmax"
        A registered family; only families declaring the fused kernel are compiled.
    gate_options : dict, optional
    dtype, device
        The fused pass is float64 only.

    Returns
    -------
    bool
        True if the kernels are ready; False for a model the kernel does not
        cover, a non-float64 dtype, or a failed compilation (then with a
        RuntimeWarning, as ``compile="auto"``).

    Raises
    ------
    ValueError
        Unknown gate or options.
    """
    spec = gate_spec(gate, gate_options, n_experts=n_experts)
    template = spec.template(n_experts, n_features, (1,), dtype=dtype, device=device)
    if dtype != torch.float64 or not _fused.supported(template, n_experts, n_features):
        return False
    return _fused.available(n_experts, n_features, dtype, device)


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
    feature_names=None,
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
    gate : {"softmax", "temperature", "activation", "topk", "gaussian"}, default "softmax"
        "gaussian" is the Gaussian-gated MoE, a model of (x, y): EM then maximises the joint
        likelihood (closed-form M-steps), ``loglik`` and ``history`` are Σ log p(x, y) and
        ``x_loglik`` holds Σ log p(x) (:class:`moelab.gates.GaussianGate`).
    gate_options : dict, optional
        ``temperature`` (float > 0), ``learn_temperature`` (bool), ``activation``
        (name or callable), ``top_k`` (int), ``reg_covariance`` (float > 0) as the family takes them.
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
        Emit :class:`ConvergenceWarning` / :class:`DegenerateFitWarning` and the checks of
        :mod:`moelab.diagnostics` (rank of x, expert sizes, number of starts).
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
        once the kernels for this (n_experts, n_features) are compiled and
        checked in this process, "auto" uses them from starts × n_samples ×
        n_experts ≥ 10^4, where the fused pass is already faster (so a fit
        may differ from its eager twin at the ~1e-13 relative level depending
        on what the process compiled before). True requires it (RuntimeError
        if it fails).
    feature_names : sequence of str, optional
        Names of the x columns, used in warnings (default ``x[:, j]``).

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
    opts = FitOptions(n_experts, gate, gate_options, estimator="em", n_init=n_init, init=init, n_candidates=n_candidates,
                      max_iter=max_iter, tol=tol, convergence=convergence, reg_variance=reg_variance,
                      min_expert_size=min_expert_size, min_expert_sd=min_expert_sd, gate_steps=gate_steps,
                      compile=compile, dtype=dtype, device=device, warn=warn, feature_names=feature_names)
    result = fit_em_with(x, y, opts, init_model=init_model, random_state=random_state)
    result.seconds = time.perf_counter() - t0
    result.settings.update(gate=gate, gate_options=dict(gate_options or {}))  # as the caller gave them
    return result


def fit_em_with(x, y, opts: FitOptions, *, init_model: Optional[GaussianMoE] = None, random_state=None) -> EMResult:
    """:func:`fit_em` with its settings as one validated :class:`~moelab.options.FitOptions` (``estimator="em"``)."""
    t0 = time.perf_counter()
    if opts.estimator != "em":
        raise ValueError(f"fit_em_with needs FitOptions(estimator='em'), got estimator={opts.estimator!r}")
    spec = opts.gate
    if spec.family.sparse_routing and init_model is None:
        # EM cannot change which experts a sample is routed to (dropping an expert with
        # positive responsibility makes Q = -inf), so a top-K fit is only as good as its
        # routing at the start: fit the dense softmax model first, then sparsify it.
        dense = fit_em_with(x, y, replace(opts, gate="softmax", warn=False), random_state=random_state)
        if opts.warn:  # the sparse fit below runs from this start only: the starts were the dense fit's
            warn_few_starts(opts.n_init, dense.start_loglik, stacklevel=3)
        init_model = GaussianMoE(spec.family.from_dense(dense.model.gate, **spec.options), dense.model.experts)
    prob = setup_problem(x, y, opts, random_state)
    with threads_for(prob):
        n_keep = opts.n_init if init_model is None else user_starts(init_model, prob.batch)
        state, xr, x1r, yr = make_starts(prob, n_keep, init_model)
        R = xr.shape[0]
        history = torch.full((R, opts.max_iter + 1), math.nan, dtype=prob.dtype, device=xr.device)
        fused = _use_fused(opts, state.gate, R, prob.n, xr.device)
        sizes = torch.zeros(R, prob.n_experts, dtype=prob.dtype, device=xr.device) if fused else None
        # ℓ_scaled − ℓ_original = n log s_y per start, for the relative rule
        offset = loglik_offset(prob).repeat_interleave(n_keep) if opts.convergence == "relative" else None
        state, ll, it, conv = _run_em(state, xr, x1r, yr, opts, history, fused, sizes, ll_offset=offset)
    settings = dict(gate=spec.name, gate_options=dict(spec.options),
                    n_init=n_keep if init_model is not None else opts.n_init,
                    init=opts.init if init_model is None else "user", n_candidates=opts.n_candidates,
                    max_iter=opts.max_iter, tol=opts.tol, convergence=opts.convergence, estimator="em", compiled=fused)
    return finish(prob, state, xr, x1r, yr, conv, it, history, n_keep, settings=settings, t0=t0,
                  final=(sizes, ll) if fused else None)
