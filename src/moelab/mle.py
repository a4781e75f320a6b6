"""Gradient-based maximum likelihood (L-BFGS on the full log-likelihood), for any gate.

The EM path (:func:`moelab.fit_em`) is the default; this path maximises
Σ_n log p(y_n | x_n) directly with ``torch.optim.LBFGS`` (strong-Wolfe line
search) over unconstrained parameters: free gate rows (reference expert fixed
at zero), log τ for an estimated temperature, expert coefficients and
log(ν_k − floor). All problems and starts are optimised together: the
objective is the sum of their mean log-likelihoods, whose gradient separates
by problem (the line search is shared).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch

from .fitcore import EMResult, State, e_step, finish, make_starts, setup_problem
from .model import GaussianMoE
from .options import FitOptions

__all__ = ["fit_mle"]


def fit_mle(
    x,
    y,
    n_experts: int,
    *,
    gate: str = "softmax",
    gate_options: Optional[dict] = None,
    n_init: int = 10,
    init: str = "auto",
    init_model: Optional[GaussianMoE] = None,
    max_iter: int = 500,
    tol: float = 1e-10,
    reg_variance: float = 1e-6,
    min_expert_size="auto",
    min_expert_sd: float = 0.01,
    random_state=None,
    dtype=torch.float64,
    device=None,
    warn: bool = True,
    feature_names=None,
) -> EMResult:
    """Fit a Gaussian mixture of experts by L-BFGS on the log-likelihood.

    Parameters are as in :func:`moelab.fit_em` (``n_init`` starts from the
    same strategies, or ``init_model``); ``max_iter`` counts L-BFGS iterations
    and ``tol`` is L-BFGS's tolerance on the change of the objective (the sum
    over problems of mean log-likelihoods).

    Returns
    -------
    EMResult
        ``history`` holds the log-likelihood at each objective evaluation.

    Raises
    ------
    ValueError
        As :func:`moelab.fit_em`.
    """
    t0 = time.perf_counter()
    opts = FitOptions(n_experts, gate, gate_options, estimator="mle", n_init=n_init, init=init, max_iter=max_iter,
                      tol=tol, reg_variance=reg_variance, min_expert_size=min_expert_size, min_expert_sd=min_expert_sd,
                      dtype=dtype, device=device, warn=warn, feature_names=feature_names)
    prob = setup_problem(x, y, opts, random_state)
    S = 1 if init_model is not None else opts.n_init
    state, xr, x1r, yr = make_starts(prob, S, init_model)
    K, d, n = prob.n_experts, prob.d, prob.n
    R = xr.shape[0]
    gate0 = state.gate
    names = list(gate0.params())
    positive = set(gate0.positive_params)

    # unconstrained parameters
    free = {}
    for nm in names:
        t = gate0.params()[nm].detach()
        if nm in ("slope", "intercept"):
            free["g_" + nm] = t[:, : K - 1].clone()
        else:
            free["g_" + nm] = (t.log() if nm in positive else t).clone()
    free["theta"] = state.theta.detach().clone()
    free["u_var"] = (state.var.detach() - opts.reg_variance).clamp_min(1e-12).log()
    leaves = [v.requires_grad_(True) for v in free.values()]

    def build():
        gp = {}
        for nm in names:
            t = free["g_" + nm]
            if nm == "slope":
                gp[nm] = torch.cat([t, torch.zeros(R, 1, d, dtype=t.dtype, device=t.device)], -2)
            elif nm == "intercept":
                gp[nm] = torch.cat([t, torch.zeros(R, 1, dtype=t.dtype, device=t.device)], -1)
            else:
                gp[nm] = t.exp() if nm in positive else t
        return State(gate0.replace(**gp), free["theta"], opts.reg_variance + free["u_var"].exp())

    history = torch.full((R, 20 * opts.max_iter + 2), math.nan, dtype=prob.dtype, device=xr.device)
    count = [0]
    opt = torch.optim.LBFGS(leaves, lr=1.0, max_iter=opts.max_iter, tolerance_grad=1e-12, tolerance_change=opts.tol,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        st = build()
        _, ll = e_step(st.gate, st.theta, st.var, xr, x1r, yr)
        if count[0] < history.shape[1]:
            history[:, count[0]] = ll.detach()
        count[0] += 1
        obj = -(torch.nan_to_num(ll, nan=-1e300) / n).sum()
        obj.backward()
        return obj

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    with torch.no_grad():
        final = build()
        final = State(final.gate.map_tensors(lambda t: t.detach()), final.theta.detach(), final.var.detach())
    converged = torch.full((R,), n_iter < opts.max_iter, dtype=torch.bool, device=xr.device)
    iters = torch.full((R,), n_iter, dtype=torch.long, device=xr.device)
    settings = dict(gate=gate, gate_options=dict(gate_options or {}), n_init=n_init,
                    init=init if init_model is None else "user", max_iter=max_iter, tol=tol, estimator="mle")
    return finish(prob, final, xr, x1r, yr, converged, iters, history[:, : count[0]], S, settings=settings, t0=t0)
