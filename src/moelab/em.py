"""EM for Gaussian mixtures of experts with any gate, batched over problems and restarts.

One call fits B independent problems (x of shape (B, n, d)) with S starts each
as a single batch of B·S problems:

1. E-step in log space: log r_nk = log g_k(x_n) + log f_k(y_n|x_n) − logsumexp_k(·).
2. Expert M-step in closed form (weighted least squares, variance floor).
3. Gate M-step: damped Newton/IRLS for linear-logit gates (softmax, temperature
   on β_1/τ); damped (Levenberg–Marquardt) Newton for the others (activation on
   (β_1, β_0, log τ), top-K keeping each sample's routing set), accepted only if
   it does not decrease the gate part of Q. Hence the observed
   log-likelihood never decreases.

For every family that declares it (``Gate.em_pass``) an iteration is one pass
over the data that returns the log-likelihood and every M-step statistic as
sums over samples (:mod:`moelab._fused`): compiled by ``torch.compile``, or
eager on blocks of samples whose temporaries stay in the CPU cache, so a batch
costs per problem no more than one problem. Other families (user-registered
without a pass, a callable activation, ``gate_steps > 1``, float32) run the
textbook loop: (R, K, n) responsibilities and the autograd gate step.

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

from .model import GaussianMoE
from . import _fused
from .autocompile import pass_mode, prepare_compiled
from .progress import FitProgress, remaining_iterations
from .racing import StartRace
from .acceleration import Squarem, supported as accelerable
from .textbook import TextbookStepper
from .diagnostics import warn_few_starts
from .fitcore import (ConvergenceWarning, DegenerateFitWarning, EMResult, State, design, finish, loglik_offset, make_starts,
                      prepare_xy, setup_problem, threads_for, user_starts)
from .options import CONVERGENCE_RULES, FitOptions

__all__ = ["fit_em", "fit_em_with", "prepare_compiled", "FitOptions", "EMResult", "ConvergenceWarning", "DegenerateFitWarning", "prepare_xy", "CONVERGENCE_RULES"]


def _run_em(state: State, stepper, opts: FitOptions, history, ll_offset=None, race=None, progress=None,
            accel: Optional[Squarem] = None):
    """Iterate EM on all R problems until each converges or ``opts.max_iter`` M-steps.

    ``stepper`` runs the iterations: the family's one-pass kernel (:func:`moelab._fused.stepper`,
    compiled or eager blocked over samples) or the textbook loop (:class:`moelab.textbook.TextbookStepper`);
    its ``sizes`` then hold the effective expert sizes Σ_n r_nk at the final state. history (R, max_iter + 1)
    receives the log-likelihood per iteration; returns the final state, loglik (R,), M-steps done (R,),
    converged (R,). ``accel`` (:class:`moelab.acceleration.Squarem`) makes every third iteration start from
    the SQUAREM extrapolation where that does not lower the log-likelihood.

    Stopping: |Δℓ| / n < tol (``ll_offset`` None), or, with ``ll_offset`` (R,) = ℓ_scaled − ℓ_original,
    the relative rule |Δℓ| < tol · |ℓ_prev − ll_offset| on the log-likelihood in the original units of y.
    ``race`` (:class:`moelab.racing.StartRace`) stops starts that cannot end above the best converged one
    (not converged, left as they are); ``progress`` (:class:`moelab.progress.FitProgress`) is told each iteration.
    """
    R, n = stepper.ya.shape
    max_iter, tol = opts.max_iter, opts.tol
    dev = stepper.ya.device
    active = torch.arange(R, device=dev)
    ll = torch.full((R,), -math.inf, dtype=stepper.ya.dtype, device=dev)
    n_iter = torch.zeros(R, dtype=torch.long, device=dev)
    converged = torch.zeros(R, dtype=torch.bool, device=dev)
    prev = None
    # ``st`` holds the problems still iterating (``active``); ``state`` receives each problem when it
    # leaves, so an iteration indexes no parameters unless some problem stops at it
    st = state
    for it in range(max_iter + 1):
        ext, plain = accel.candidate(st) if accel is not None else (st, None)
        if plain is not None:
            st, lla, accepted = stepper.evaluate_extrapolated(ext, plain, accel.ll_min, same=accel.same)
        else:
            st, lla = stepper.evaluate(st)  # corrects the last proposed gate step where it failed
            accepted = None
        if accel is not None:
            accel.record(st, lla, accepted)
        if active.numel() == R:
            history[:, it] = lla
        else:
            history[active, it] = lla
        if prev is not None:
            if ll_offset is None:
                conv = (lla - prev).abs() / n < tol
            else:  # relative change of the log-likelihood in the original units of y
                off = ll_offset if active.numel() == R else ll_offset[active]
                conv = (lla - prev).abs() < tol * (prev - off).abs()
            conv |= ~torch.isfinite(lla)
            done = conv
            eps = tol * n if ll_offset is None else tol * (prev - off).abs()
            if race is not None:
                if bool(done.any()):
                    race.record(active, lla, done, stepper.sizes[active], st.var)
                done = done | race.stop(active, lla, history, it, eps)
            if progress is not None and progress.enabled and it >= 2:
                left = remaining_iterations(history[:, it - 2 : it + 1][active][~done], eps if ll_offset is None
                                            else eps[~done], max_iter - it)
                progress.em(it, left, int((~done).sum()), R)
        else:
            done = ~torch.isfinite(lla)
            conv = torch.zeros_like(done)
        if it == max_iter:
            break
        keep = ~done
        if not bool(keep.any()):
            break
        if not bool(keep.all()):  # these problems stop: their state, log-likelihood and M-steps are final
            leave = done
            gone = active[leave]
            state = state.put(gone, st.take(leave))
            ll[gone], converged[gone], n_iter[gone] = lla[leave], conv[leave], it
            active, st, prev = active[keep], st.take(keep), lla[keep]
            stepper.keep(keep)
            if accel is not None:
                accel.keep(keep)
        else:
            prev = lla
        # SQUAREM builds its extrapolation from the next state: its gate step must be checked, not pending
        st = stepper.m_step(st, checked=accel is not None and accel.extrapolates_next)
    state = st if active.numel() == R else state.put(active, st)
    ll[active], converged[active], n_iter[active] = lla, conv, it
    return state, ll, n_iter, converged


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
    prune_starts: bool = False,
    accelerate: Optional[str] = "squarem",
    progress=False,
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
        sample's routing set, so the start decides it. An ``init_model``
        with a softmax gate for ``gate="topk"`` does the same from those
        starting values (the dense fit from them, its best start sparsified).
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
        Run each EM iteration's pass over the data (:mod:`moelab._fused`)
        compiled with ``torch.compile`` (every built-in gate family — softmax,
        temperature, activation with a named σ, top-K — with ``gate_steps=1``,
        float64, small K and d). The same pass runs eagerly otherwise, so the
        fits agree to rounding (1e-9 relative, tested per family). Compiling takes seconds to a minute once
        per process and model shape (Inductor caches it on disk), then an
        iteration is 4–40× faster at large R·n. "auto" compiles when the
        predicted EM time saved exceeds the predicted compile cost (cold,
        or warm from Inductor's disk cache; the rule and its measured
        constants: :mod:`moelab.autocompile`), and falls back to the eager loop
        with a RuntimeWarning if compilation fails (CPU needs a C++ compiler);
        once the kernels for this (n_experts, n_features) are compiled and
        checked in this process, "auto" uses them from starts × n_samples ×
        n_experts ≥ 10^4, where the fused pass is already faster (so a fit
        may differ from its eager twin at the ~1e-13 relative level depending
        on what the process compiled before). True requires it (RuntimeError
        if it fails).
    feature_names : sequence of str, optional
        Names of the x columns, used in warnings (default ``x[:, j]``).
    prune_starts : bool, default False
        Stop a start early once some start of its problem has converged to a
        valid fit that even a thousand-fold Aitken forecast of the start's
        remaining gain cannot reach (:mod:`moelab.racing`); such starts are
        never the returned fit. Faster, but a start on a long plateau can be
        stopped before it climbs to the best optimum (see :mod:`moelab.racing`),
        so the default runs every start to convergence.
    accelerate : {"squarem", None}, default "squarem"
        "squarem": every third iteration starts from the SQUAREM extrapolation
        of the last two EM steps (Varadhan & Roland 2008, scheme S3), kept
        only where it does not lower the log-likelihood, so the
        log-likelihood still never decreases; the stopping rule is unchanged.
        Fewer iterations, most in over-specified fits (measured in
        :mod:`moelab.acceleration`); the fit can differ from plain EM's where
        that stopped on a slow climb. None: plain EM (what the published
        studies' EM codes run). Families whose parameters cannot be
        extrapolated (the Gaussian gate, top-K) always run plain EM.
    progress : {False, True, "auto"}, default False
        Show the stage (screening starts, compiling, EM) and an estimate of
        the time left on stderr (tqdm) for fits running over ~2 s; "auto":
        only when stderr is a terminal (the CLI's default). See :mod:`moelab.progress`.

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
                      compile=compile, dtype=dtype, device=device, warn=warn, feature_names=feature_names,
                      prune_starts=prune_starts, progress=progress, accelerate=accelerate)
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
    if spec.family.sparse_routing and (init_model is None or init_model.gate.name == "softmax"):
        # EM cannot change which experts a sample is routed to (dropping an expert with
        # positive responsibility makes Q = -inf), so a top-K fit is only as good as its
        # routing at the start: fit the dense softmax model first (from a softmax init_model
        # if given), then sparsify it.
        dense = fit_em_with(x, y, replace(opts, gate="softmax", warn=False), init_model=init_model,
                            random_state=random_state)
        if opts.warn and init_model is None:  # the sparse fit below runs from this start only: the starts were the dense fit's
            warn_few_starts(opts.n_init, dense.start_loglik, stacklevel=3)
        init_model = GaussianMoE(spec.family.from_dense(dense.model.gate, **spec.options), dense.model.experts)
    prob = setup_problem(x, y, opts, random_state)
    with threads_for(prob), FitProgress.create(opts.progress) as bar:
        if init_model is not None:
            n_keep = user_starts(init_model, prob.batch)
        else:  # one expert: every start gives the same least-squares fit
            n_keep = 1 if prob.n_experts == 1 else opts.n_init
        bar.stage("screening starts", detail=f"{n_keep} start(s) per problem")
        state, xr, x1r, yr = make_starts(prob, n_keep, init_model, design_matrix=False)
        R = xr.shape[0]
        history = torch.full((R, opts.max_iter + 1), math.nan, dtype=prob.dtype, device=xr.device)
        one_pass, fused = pass_mode(opts, state.gate, R, prob.n, xr.device, progress=bar)
        if not one_pass:  # the textbook loop reads [x, 1]
            x1r = design(xr)
        if one_pass:
            stepper = _fused.stepper(state.gate, xr, yr, opts.reg_variance, fused)
        elif prob.B == 1 and state.gate.linear_logits:  # the starts of one fit share its data: keep it once
            stepper = TextbookStepper(xr[0], x1r[0], yr[0], opts, shared_by=R)
        else:
            stepper = TextbookStepper(xr, x1r, yr, opts)
        accel = (Squarem(R, opts.reg_variance, prob.dtype, xr.device)
                 if opts.accelerate == "squarem" and accelerable(state.gate) else None)
        race = StartRace(prob.B, n_keep, prob.min_size, opts.min_expert_sd) if opts.prune_starts and n_keep > 1 else None
        bar.stage("EM", total=opts.max_iter, detail=f"{R} starts")
        # ℓ_scaled − ℓ_original = n log s_y per start, for the relative rule
        offset = loglik_offset(prob).repeat_interleave(n_keep) if opts.convergence == "relative" else None
        state, ll, it, conv = _run_em(state, stepper, opts, history, ll_offset=offset, race=race, progress=bar,
                                      accel=accel)
    settings = dict(gate=spec.name, gate_options=dict(spec.options),
                    n_init=n_keep if init_model is not None or prob.n_experts == 1 else opts.n_init,
                    init=opts.init if init_model is None else "user", n_candidates=opts.n_candidates,
                    max_iter=opts.max_iter, tol=opts.tol, convergence=opts.convergence, estimator="em", compiled=fused,
                    starts_stopped_early=0 if race is None else race.stopped,
                    accelerate=opts.accelerate if accelerable(state.gate) else None,  # what this EM ran
                    extrapolations=(0, 0) if accel is None else (accel.accepted, accel.tried))
    return finish(prob, state, xr, x1r, yr, conv, it, history, n_keep, settings=settings, t0=t0,
                  final=(stepper.sizes, ll) if one_pass else None)
