"""The one-pass EM iteration for gates whose step is damped Newton on closed-form derivatives.

Covers the activation gate, logits l_k = σ(β_{1k}ᵀx)/τ + β_{0k} with τ fixed
or estimated (the step acts on (β_1, β_0, log τ), the layout of
:class:`moelab.mstep.GateParameters`), and the top-K gate, linear logits with
the softmax restricted to each sample's K' largest (EM keeps the routing set:
a step that drops an expert of positive responsibility has Q = −inf).

With r the responsibilities and g the gate weights at the current parameters,
the gate part of Q and its derivatives are sums over samples of per-sample
terms, so one pass gives everything the M-step needs:

* Q_gate = Σ_n Σ_k r_nk log g_nk;
* ∇Q = Σ_n Σ_k (r_nk − g_nk) J_nk, with J_nk = ∂l_nk/∂θ;
* −∇²Q = Σ_n [Σ_k g_nk J_nk J_nkᵀ − v_n v_nᵀ − Σ_k (r_nk − g_nk) ∂²l_nk/∂θ²],
  v_n = Σ_k g_nk J_nk (the softmax Hessian, plus the curvature of σ).

For the activation gate (u = log τ): ∂l_k/∂β_{1k} = σ'(z_k) x/τ, ∂l_k/∂β_{0k} = 1,
∂l_k/∂u = −σ(z_k)/τ; ∂²l_k/∂β_{1k}² = σ''(z_k) x xᵀ/τ, ∂²l_k/∂β_{1k}∂u = −σ'(z_k) x/τ,
∂²l_k/∂u² = σ(z_k)/τ (z_k = β_{1k}ᵀx; σ' and σ'' from
:func:`moelab.activations.closed_form_derivatives`). For top-K the logits are
linear (no second derivatives) and g, r vanish outside the routing set.

The Newton steps themselves are :func:`moelab.mstep.newton_ascent_steps` (the same
Levenberg–Marquardt damping ladder and logit cap as the autograd step
:func:`moelab.mstep.gate_newton_step`), and the line search evaluates
Q_gate(θ') = Σ_n Σ_k r_nk log g_k(x_n; θ') at candidates θ' by
:func:`newton_q`, which recomputes r at the current parameters in the same pass.
So the fitted parameters agree with the autograd step to rounding.

Pass specs (hashable, so torch.compile specialises on them): ``("activation",
name, learn_temperature, reference_at_zero)`` (the last: the reference expert's fixed
slope is zero, its activation σ(0) a constant) and ``("topk", top_k)``.

Sources: Jordan & Jacobs (1994); Dempster, Laird & Rubin (1977), generalised
EM; Nguyen, Akbarian & Ho (ICML 2024) for the activation gate.
"""

from __future__ import annotations

import math

import torch

from ..activations import closed_form_derivatives
from ..mstep import GateParameters, best_candidate, damped_line_search, negligible_gain, newton_ascent_steps
from .linear import EXP_FLOOR, exp_terms, expert_columns, expert_update, lin, n_expert_columns, unpack_experts

__all__ = ["n_params", "n_sums", "newton_sums", "newton_sums_resp", "newton_q", "newton_q_resp", "unpack_sums", "gate_args", "m_step", "propose", "step_ok", "verify"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: exp(t) is 0 in float64 below this: where the eager E-step's responsibilities underflow to exactly 0
_LOG_UNDERFLOW = -745.0


def n_params(spec, K: int, d: int) -> int:
    """Free gate parameters P of the Newton step: (K−1)(d+1), plus log τ when estimated."""
    return (K - 1) * (d + 1) + int(spec[0] == "activation" and spec[2])


def n_sums(spec, K: int, d: int) -> int:
    """Columns of :func:`newton_sums`."""
    P = n_params(spec, K, d)
    return 2 + n_expert_columns(K, d) + P + P * (P + 1) // 2


def _linear_part(slope, k, xs):
    """β_{1k}ᵀx for slope (..., R, K, d) and xs d (R, n) columns → (..., R, n)."""
    out = slope[..., k, 0:1] * xs[0]
    for j in range(1, len(xs)):
        out = out + slope[..., k, j : j + 1] * xs[j]
    return out


def _gate_terms(slope, intercept, tau, xs, spec, derivatives: bool):
    """Logits (list of K), routing mask (list of K bool, or None) and, if ``derivatives``,
    the Jacobian rows J[k] = {index: value} and second derivatives D[k] = {(a, b): value}, a ≤ b."""
    K, d = slope.shape[-2], len(xs)
    icpt = [intercept[..., k : k + 1] for k in range(K)]
    J = [dict() for _ in range(K)]
    D = [dict() for _ in range(K)]
    islope = lambda k, j: k * d + j  # noqa: E731
    iicpt = lambda k: (K - 1) * d + k  # noqa: E731
    mask = None
    if spec[0] == "activation":
        derivs = closed_form_derivatives(spec[1])
        learn = spec[2]
        inv_tau = (1.0 / tau).unsqueeze(-1)
        u = (K - 1) * (d + 1)
        logits = []
        for k in range(K):
            if k == K - 1 and spec[3]:  # the reference row's slope is zero: σ(0), no activation per sample
                s = derivs(slope.new_zeros(()))[0]
                logits.append(s * inv_tau + icpt[k])
                if derivatives and learn:
                    st = (s * inv_tau).expand_as(icpt[k])
                    J[k][u] = -st
                    D[k][(u, u)] = st
                continue
            s, s1, s2 = derivs(_linear_part(slope, k, xs))
            logits.append(s * inv_tau + icpt[k])
            if not derivatives:
                continue
            if k < K - 1:
                a1 = s1 * inv_tau
                a2 = s2 * inv_tau
                for j in range(d):
                    J[k][islope(k, j)] = a1 * xs[j]
                    for j2 in range(j, d):
                        D[k][(islope(k, j), islope(k, j2))] = a2 * xs[j] * xs[j2]
                    if learn:
                        D[k][(islope(k, j), u)] = -a1 * xs[j]
                J[k][iicpt(k)] = 1.0
            if learn:
                st = s * inv_tau
                J[k][u] = -st
                D[k][(u, u)] = st
    elif spec[0] == "topk":
        logits = [_linear_part(slope, k, xs) + icpt[k] for k in range(K)]
        top_k = spec[1]
        if top_k < K:  # expert k is routed iff fewer than top_k logits exceed it (ties kept, as TopKGate)
            mask = []
            for k in range(K):
                above = None
                for j in range(K):
                    if j != k:
                        t = (logits[j] > logits[k]).to(logits[k].dtype)
                        above = t if above is None else above + t
                mask.append(above < top_k)
        if derivatives:
            for k in range(K - 1):
                for j in range(d):
                    J[k][islope(k, j)] = xs[j]
                J[k][iicpt(k)] = 1.0
    else:  # pragma: no cover - the pass specs are fixed by the gate families
        raise ValueError(f"unknown pass spec {spec!r}")
    return logits, mask, J, D


def _masked_exp_terms(terms, mask):
    """:func:`moelab._fused.linear.exp_terms` over the routed experts only (others weight exactly 0)."""
    if mask is None:
        return exp_terms(terms)
    neg = torch.full((), -math.inf, dtype=terms[0].dtype, device=terms[0].device)
    masked = [torch.where(mk, t, neg) for t, mk in zip(terms, mask)]
    m = masked[0]
    for t in masked[1:]:
        m = torch.maximum(m, t)
    zero = torch.zeros((), dtype=terms[0].dtype, device=terms[0].device)
    e = [torch.where(mk, torch.exp((t - m).clamp_min(EXP_FLOOR)), zero) for t, mk in zip(terms, mask)]
    total = e[0]
    for t in e[1:]:
        total = total + t
    return m, e, total


def _responsibilities(logits, mask, expert_theta, var, xs, y):
    """E-step from the logits: log g (list), g (list), r (list), residuals (list), Σ_n log p (per sample)
    and which responsibilities the eager E-step would hold as > 0 (list of bool, or None without a mask)."""
    K = len(logits)
    m, e, se = _masked_exp_terms(logits, mask)
    lse_g = m + torch.log(se)
    inv = 1.0 / se
    g = [t * inv for t in e]
    logg = [t - lse_g for t in logits]
    const = _HALF_LOG_2PI + 0.5 * torch.log(var)
    coef = -0.5 / var
    res = [y - lin(expert_theta, k, xs) for k in range(K)]
    joint = [logg[k] - const[:, k : k + 1] + coef[:, k : k + 1] * res[k] * res[k] for k in range(K)]
    mj, ej, sj = _masked_exp_terms(joint, mask)
    lse = mj + torch.log(sj)
    inv_j = 1.0 / sj
    r = [t * inv_j for t in ej]
    positive = None if mask is None else [mk & (t - lse > _LOG_UNDERFLOW) for t, mk in zip(joint, mask)]
    return logg, g, r, res, lse, positive


def newton_sums(slope, intercept, tau, expert_theta, var, x, y, spec):
    """One pass: E-step, expert statistics, and Q_gate with its gradient and Hessian, as (R, M).

    Parameters
    ----------
    slope : tensor of shape (R, K, d)
    intercept : tensor of shape (R, K)
    tau : tensor of shape (R,)
        Temperature (ones for the top-K gate).
    expert_theta : tensor of shape (R, K, d+1)
    var : tensor of shape (R, K)
    x : tensor of shape (R, n, d)
    y : tensor of shape (R, n)
    spec : tuple
        The pass spec (module docstring).

    Columns: Σ log p, Q_gate, :func:`moelab._fused.linear.expert_columns`, ∇Q (P), the upper
    triangle of −∇²Q (row-major); :func:`unpack_sums` names them.
    """
    return _pass_body(slope, intercept, tau, expert_theta, var, x, y, spec)[0]


def newton_sums_resp(slope, intercept, tau, expert_theta, var, x, y, check_resp, spec):
    """:func:`newton_sums` with one more column, and the responsibilities r (R, K, n) of the same pass.

    ``check_resp`` (R, K, n): the responsibilities of the *previous* pass. The extra (last) column
    is Σ_n Σ_k check_resp_nk log g_nk at this pass's gate: Q_gate of the gate step the previous
    M-step proposed, with that M-step's responsibilities — what :func:`newton_q_resp` gives for
    it — so the step is checked by the next pass instead of a pass of its own
    (:class:`moelab._fused.steppers.NewtonStepper`). Where no step is pending the column is
    ignored (any responsibilities of the right shape do).

    Writing r (R·K·n values) costs less than the E-step :func:`newton_q` redoes at every line search:
    measured on the headline cell (tanh, K = 3, R = 40, n = 10⁴, 2 threads) that recomputation was
    two thirds of the line-search pass, and the line-search pass 27 of the iteration's 61 ms.
    """
    sums, r, logg = _pass_body(slope, intercept, tau, expert_theta, var, x, y, spec)
    q = check_resp[:, 0] * logg[0]
    for k in range(1, len(logg)):
        q = q + check_resp[:, k] * logg[k]
    return torch.cat([sums, q.sum(-1).unsqueeze(-1)], -1), torch.stack(r, 1)


def _pass_body(slope, intercept, tau, expert_theta, var, x, y, spec):
    """The sums of :func:`newton_sums` (R, M), the responsibilities and log gate weights (lists of K (R, n))."""
    R, n, d = x.shape
    K = slope.shape[-2]
    xs = [x[..., j] for j in range(d)]
    logits, mask, J, D = _gate_terms(slope, intercept, tau, xs, spec, derivatives=True)
    logg, g, r, res, lse, _ = _responsibilities(logits, mask, expert_theta, var, xs, y)
    q = r[0] * logg[0]
    for k in range(1, K):
        q = q + r[k] * logg[k]
    cols = [lse.sum(-1), q.sum(-1)] + expert_columns(r, res, xs)
    P = n_params(spec, K, d)
    w = [r[k] - g[k] for k in range(K)]
    grad, v = [], []
    for a in range(P):
        ga = va = None
        for k in range(K):
            if a in J[k]:
                ga = w[k] * J[k][a] if ga is None else ga + w[k] * J[k][a]
                va = g[k] * J[k][a] if va is None else va + g[k] * J[k][a]
        grad.append(ga)
        v.append(va)
    cols += [t.sum(-1) for t in grad]
    for a in range(P):
        for b in range(a, P):
            h = -v[a] * v[b]
            for k in range(K):
                if a in J[k] and b in J[k]:
                    h = h + g[k] * J[k][a] * J[k][b]
                if (a, b) in D[k]:
                    h = h - w[k] * D[k][(a, b)]
            cols.append(h.sum(-1))
    return torch.stack(cols, -1), r, logg


def unpack_sums(sums, spec, K: int, d: int) -> dict:
    """Name the columns of :func:`newton_sums`: ``loglik`` (R,), ``q0`` (R,), the expert statistics
    of :func:`moelab._fused.linear.unpack_experts`, ``grad`` (R, P) and ``negH`` (R, P, P)."""
    R = sums.shape[0]
    P = n_params(spec, K, d)
    out = dict(loglik=sums[:, 0], q0=sums[:, 1], **unpack_experts(sums, 2, K, d))
    i = 2 + n_expert_columns(K, d)
    out["grad"] = sums[:, i : i + P]
    i += P
    iu = torch.triu_indices(P, P, device=sums.device)
    negH = sums.new_zeros(R, P, P)
    negH[:, iu[0], iu[1]] = sums[:, i : i + P * (P + 1) // 2]
    out["negH"] = negH + negH.transpose(-1, -2) - torch.diag_embed(negH.diagonal(dim1=-2, dim2=-1))
    return out


def newton_q(cand_slope, cand_intercept, cand_tau, slope, intercept, tau, expert_theta, var, x, y, spec):
    """Q_gate at candidate gates with the responsibilities of the current parameters: (A, R).

    ``cand_*`` (A, R, K, d), (A, R, K), (A, R); the rest as :func:`newton_sums`.
    Q = Σ_n Σ_k r_nk log g_k(x_n; candidate); −inf where a candidate gives weight 0
    to an expert whose responsibility is positive (top-K).
    """
    d = x.shape[-1]
    K = slope.shape[-2]
    xs = [x[..., j] for j in range(d)]
    logits, mask, _, _ = _gate_terms(slope, intercept, tau, xs, spec, derivatives=False)
    _, _, r, _, _, positive = _responsibilities(logits, mask, expert_theta, var, xs, y)
    cl, cmask, _, _ = _gate_terms(cand_slope, cand_intercept, cand_tau, xs, spec, derivatives=False)
    m, _, se = _masked_exp_terms(cl, cmask)
    lse_c = m + torch.log(se)
    q = None
    for k in range(K):
        t = r[k] * (cl[k] - lse_c)
        if cmask is not None:  # routed out by the candidate: −inf where the responsibility is positive
            neg = torch.full((), -math.inf, dtype=t.dtype, device=t.device)
            zero = torch.zeros((), dtype=t.dtype, device=t.device)
            t = torch.where(cmask[k], t, torch.where(positive[k], neg, zero))
            t = torch.where(mask[k], t, zero)  # r is exactly 0 outside the current routing set
        q = t if q is None else q + t
    return q.sum(-1)


def newton_q_resp(cand_slope, cand_intercept, cand_tau, resp, x, spec):
    """Q_gate at candidate gates for given responsibilities: (A, R) (activation gates).

    ``cand_*`` (A, R, K, d), (A, R, K), (A, R); ``resp`` (R, K, n) from :func:`newton_sums_resp`;
    x (R, n, d). Q = Σ_n Σ_k r_nk log g_k(x_n; candidate) — :func:`newton_q` without its E-step.
    Not for top-K (its routing test needs which responsibilities the eager E-step holds as > 0).
    """
    d = x.shape[-1]
    K = cand_slope.shape[-2]
    xs = [x[..., j] for j in range(d)]
    cl, _, _, _ = _gate_terms(cand_slope, cand_intercept, cand_tau, xs, spec, derivatives=False)
    m, _, se = exp_terms(cl)
    lse_c = m + torch.log(se)
    q = resp[:, 0] * (cl[0] - lse_c)
    for k in range(1, K):
        q = q + resp[:, k] * (cl[k] - lse_c)
    return q.sum(-1)


def gate_args(gate):
    """(slope, intercept, tau) of a gate for the kernels: τ the gate's temperature, else ones."""
    tau = getattr(gate, "temperature", None)
    if tau is None:
        tau = gate.slope.new_ones(gate.slope.shape[:-2])
    return gate.slope, gate.intercept, tau


def _gate_q(layout, tau, resp, x, spec, run, recompute=None):
    """``q_fn(cand, idx)`` for :func:`moelab.mstep.damped_line_search`: Q_gate at flat candidates (A, r, P)
    of ``layout`` for problems ``idx`` (None = all) → (A, r). From the responsibilities ``resp``
    (R, K, n) by :func:`newton_q_resp`, or, with ``recompute`` = (slope, intercept, tau, expert θ,
    var, y) of the current parameters, by :func:`newton_q` (top-K)."""

    def q_fn(cand, idx):
        ps = layout.unflatten(cand)
        sub = (lambda t: t) if idx is None else (lambda t: t[idx])
        ctau = ps["temperature"] if "temperature" in ps else sub(tau).expand(cand.shape[:-1])
        cs, ci, ct = ps["slope"].contiguous(), ps["intercept"].contiguous(), ctau.contiguous()
        if recompute is None:
            return run(newton_q_resp, cs, ci, ct, sub(resp), sub(x), spec)
        return run(newton_q, cs, ci, ct, *(sub(t) for t in recompute[:5]), sub(x), sub(recompute[5]), spec)

    return q_fn


def _gate_steps(st, gate, x, x_abs_max):
    """(layout, θ0 (R, P), damped Newton steps (A, R, P), skip (R,) bool) of the gate M-step."""
    n, d = x.shape[-2], x.shape[-1]
    layout = GateParameters(gate)
    steps = newton_ascent_steps(st["grad"], st["negH"], x_abs_max, d)
    skip = negligible_gain(st["grad"], steps[0], st["negH"], st["q0"], n, torch.ones_like(st["q0"], dtype=torch.bool))
    return layout, layout.flatten(), steps, skip


def m_step(st, gate, expert_theta, var, x, y, var_floor, spec, run, x_abs_max, resp=None):
    """One M-step from :func:`unpack_sums` statistics, the gate step checked at once: (new gate, expert θ, variance).

    Experts: :func:`moelab._fused.linear.expert_update`. Gate: the damped Newton steps
    of :func:`moelab.mstep.newton_ascent_steps`, kept only where Q_gate increases
    (the least damped, else the best of the more damped ones, else unchanged; none where
    its predicted gain is below rounding, :func:`moelab.mstep.negligible_gain`), with Q at the
    candidates from :func:`newton_q` through ``run`` (from :func:`newton_q_resp` given ``resp``, the
    responsibilities (R, K, n) of the pass that gave ``st``). Top-K, and activation gates where the
    step must be checked before the next pass (:class:`moelab._fused.steppers.NewtonStepper`;
    otherwise :func:`propose` and :func:`verify`). ``x_abs_max`` (R,) = max |x|.
    """
    new_theta, new_var = expert_update(st, expert_theta, var, x.shape[-2], var_floor)
    layout, theta0, steps, skip = _gate_steps(st, gate, x, x_abs_max)
    slope, intercept, tau = gate_args(gate)
    q_fn = _gate_q(layout, tau, resp, x, spec, run,
                   recompute=None if resp is not None else (slope, intercept, tau, expert_theta, var, y))
    theta, _ = damped_line_search(q_fn, theta0, steps, st["q0"], skip)
    return gate.replace(**layout.unflatten(theta)), new_theta, new_var


def propose(st, gate, expert_theta, var, x, var_floor, x_abs_max):
    """:func:`m_step` with the gate step proposed, not yet checked: (gate, expert θ, variance, pending).

    The gate takes the least damped Newton step (none where :func:`moelab.mstep.negligible_gain`);
    ``pending`` holds what :func:`verify` needs to check it against the next pass's Q_gate column
    (:func:`newton_sums_resp`): θ0 (R, P), the more damped steps ``ladder`` (R, A−1, P), Q_gate
    at θ0 ``q0`` (R,), ``skip`` (R,) and the responsibilities ``resp`` (R, K, n) of ``st``'s pass.
    Activation gates.
    """
    new_theta, new_var = expert_update(st, expert_theta, var, x.shape[-2], var_floor)
    layout, theta0, steps, skip = _gate_steps(st, gate, x, x_abs_max)
    full = torch.where(skip[:, None], theta0, theta0 + steps[0])
    pending = dict(theta0=theta0, ladder=steps[1:].transpose(0, 1), q0=st["q0"], skip=skip, resp=st["resp"])
    return gate.replace(**layout.unflatten(full)), new_theta, new_var, pending


def step_ok(q_check, pending):
    """(R,) bool: where the step :func:`propose` made increased Q_gate (``q_check`` (R,), the next pass's
    column), or none was taken."""
    return (q_check > pending["q0"]) | pending["skip"]  # NaN compares False: failed


def verify(q_check, pending, gate, x, spec, run):
    """Check the gate steps :func:`propose` made, from Q_gate at them (``q_check`` (R,), the next pass's column).

    Returns None where every step increased Q_gate (or none was taken), else (idx, θ (r, P)): the
    problems ``idx`` whose step did not, and their gate parameters instead (layout of
    :class:`moelab.mstep.GateParameters`): the best of the more damped steps where that increases
    Q_gate, else θ0 (the rule of :func:`moelab.mstep.damped_line_search`, Q from ``pending["resp"]``).
    ``gate`` (for its layout and fixed τ) and x (R, n, d) are those of the pass.
    """
    failed = ~step_ok(q_check, pending)
    if not bool(failed.any()):
        return None
    idx = failed.nonzero().squeeze(-1)
    theta0 = pending["theta0"]
    if pending["ladder"].shape[1] == 0:
        return idx, theta0[idx]
    q_fn = _gate_q(GateParameters(gate), gate_args(gate)[2], pending["resp"], x, spec, run)
    return idx, best_candidate(q_fn, theta0, pending["ladder"][idx].transpose(0, 1), pending["q0"], idx)[0]
