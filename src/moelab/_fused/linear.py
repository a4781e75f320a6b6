"""The one-pass EM iteration for linear-logit gates (softmax, temperature): kernels and M-step.

The textbook EM loop (:mod:`moelab.em` without a pass) materialises the responsibilities
(R, K, n) and runs some forty full-size tensor operations per iteration, so at
large R·n it is bound by memory traffic and per-operation overhead. For gates
whose logits are linear in x (softmax, and the temperature gate, whose EM step
acts on β/τ) everything an EM iteration needs from the data is a fixed set of
sums over samples, so one pass over (x, y) suffices:

* E-step: log g_k = θ_k·x1 − logsumexp_l θ_l·x1, log f_k (Gaussian), the
  log-likelihood Σ_n logsumexp_k(log g_k + log f_k) and responsibilities
  r_nk, held per sample only (never stored);
* expert statistics (weighted least squares around the current fit
  e_nk = y_n − a_k·x1_n): Σ r, Σ r x1, Σ r x1 x1ᵀ, Σ r e x1, Σ r e²;
* gate statistics for the IRLS/Newton step: Σ g x1, Σ g x1 x1ᵀ and
  Σ g_k g_l x1 x1ᵀ (gradient and Hessian of Q_gate), Σ_n logsumexp of the
  current logits (Q_gate at θ).

The gate line search then needs Σ_n logsumexp_k(θ'_k·x1_n) at the candidate
θ' only, since Q_gate(θ) = Σ_k θ_k·(Σ_n r_nk x1_n) − Σ_n logsumexp_k(θ_k·x1_n)
(Σ_k r_nk = 1). The M-step formulas are those of :func:`moelab.mstep.expert_m_step`
and :func:`moelab.mstep.softmax_gate_newton_step` (same ridges, step cap and
step sizes), so the fitted parameters agree with the textbook loop to rounding.
Kernels take their runner ``run`` (:class:`moelab._fused.cache.Runner`): compiled, or eager on blocks of samples.

The kernels are written with the experts and features unrolled into
(R, n)-shaped operations, so Inductor fuses each into a single loop over the
samples with all sums as accumulators. The graph grows like K²(d+1)², hence
:func:`moelab._fused.supported` limits it to small models (the simulation studies' regime).

Sources: Jordan & Jacobs (1994) (IRLS gate step, weighted least squares);
Dempster, Laird & Rubin (1977) (generalised EM).
"""

from __future__ import annotations

import functools

import math

import torch

from ..mstep import backtrack, cap_step, negligible_gain

__all__ = ["gate_step_ok", "n_sums", "MAX_SUMS", "EXP_FLOOR", "lin", "exp_terms", "monomials", "moment_index", "moment_sums",
           "expert_columns", "n_expert_columns", "unpack_experts", "em_sums", "unpack_sums", "em_statistics",
           "gate_lse_sum", "logit_range", "expert_update", "expert_solve", "expert_lstsq", "gate_proposal", "gate_newton_step",
           "m_step_one_feature", "gate_verify", "m_step"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: exponents are clamped here: weights below e^-300 ≈ 5e-131 are raised to it instead of
#: underflowing through subnormal numbers (slow: measured 47 vs 36 ms per pass when fitted experts
#: separate sharply); products of two such weights stay normal, and no sum can notice the change
EXP_FLOOR = -300.0
#: most per-sample sums one fused pass may carry (the unrolled graph's size)
MAX_SUMS = 200


def n_expert_columns(K: int, d: int) -> int:
    """Columns of :func:`expert_columns`: Σ r·(monomials of [x, 1] up to degree 2), Σ r e·[1, x], Σ r e² per expert."""
    q = 1 + d + d * (d + 1) // 2
    return K * q + K * (d + 2)


def n_sums(K: int, d: int) -> int:
    """Number of sums over samples one pass computes (columns of :func:`em_sums`)."""
    q = 1 + d + d * (d + 1) // 2  # monomials of [x, 1] up to degree 2
    return 2 + n_expert_columns(K, d) + (K - 1) * q + (K - 1) * K // 2 * q


# ------------------------------------------------------------------ kernels (traced by torch.compile)
def lin(theta, k, xs):
    """θ_k·[x, 1] for problem batch: theta (R, K, p), xs list of d (R, n) columns → (R, n)."""
    d = len(xs)
    out = theta[:, k, d : d + 1]
    for j in range(d):
        out = out + theta[:, k, j : j + 1] * xs[j]
    return out


def exp_terms(terms):
    """Per-expert terms (list of K tensors) → their max m, exp(term − m) (clamped at EXP_FLOOR), Σ exp.

    Traced by ``torch.compile`` it takes K − 1 exponentials per sample instead of K
    (:func:`_exp_terms_but_max`); eagerly it takes K (the extra selections would cost more than the
    exponential they save on blocks of samples). The two give the same values to the bit.
    """
    if torch.compiler.is_compiling():
        return _exp_terms_but_max(terms)
    m = terms[0]
    for t in terms[1:]:
        m = torch.maximum(m, t)
    e = [torch.exp((t - m).clamp_min(EXP_FLOOR)) for t in terms]
    total = e[0]
    for t in e[1:]:
        total = total + t
    return m, e, total


def _exp_terms_but_max(terms):
    """:func:`exp_terms` without the exponential of the largest term, which is exp(0) = 1 exactly.

    Per sample, ``a`` is the index of the first largest term (as a float, so selections stay in the
    vector registers); the K − 1 other differences t_k − m, in order, go through exp and are put back
    in place around a 1 at ``a``. Measured in the compiled pass (softmax gate, one feature, 40
    problems, one thread): K = 2 21.5 → 18.7 ns per sample at n = 10⁵, K = 3 30 → 26.5 ns at n = 10⁴ and 10⁵.
    """
    K = len(terms)
    m, a = terms[0], torch.zeros_like(terms[0])
    for k, t in enumerate(terms[1:], 1):
        a = torch.where(t > m, float(k), a)
        m = torch.maximum(m, t)
    d = [t - m for t in terms]
    E = [torch.exp(torch.where(a > j, d[j], d[j + 1]).clamp_min(EXP_FLOOR)) for j in range(K - 1)]
    e = []
    for k in range(K):
        if k == 0:
            e.append(torch.where(a == 0, 1.0, E[0]))
        elif k == K - 1:
            e.append(torch.where(a == k, 1.0, E[k - 1]))
        else:
            e.append(torch.where(a > k, E[k], torch.where(a == k, 1.0, E[k - 1])))
    total = e[0]
    for t in e[1:]:
        total = total + t
    return m, e, total


def monomials(d: int):
    """Monomials of x1 = [x, 1] up to degree 2, each once: () for 1, (j,), (j, l) with j ≤ l."""
    return [()] + [(j,) for j in range(d)] + [(j, l) for j in range(d) for l in range(j, d)]


@functools.lru_cache(maxsize=None)
def moment_index(d: int):
    """Index of x1_j·x1_l (p, p) and of x1_j (p,) into the list of :func:`_monomials` (cached: read-only)."""
    mono = {m: i for i, m in enumerate(monomials(d))}
    p = d + 1

    def key(j, l):
        return tuple(sorted(i for i in (j, l) if i < d))

    second = torch.tensor([[mono[key(j, l)] for l in range(p)] for j in range(p)])
    first = torch.tensor([mono[key(j, d)] for j in range(p)])
    return second, first


def moment_sums(w, xs, degree=2):
    """Σ_n w·m over the monomials of :func:`_monomials` up to ``degree``: list of (R,) sums."""
    out = []
    for m in monomials(len(xs)):
        if len(m) > degree:
            continue
        t = w
        for j in m:
            t = t * xs[j]
        out.append(t.sum(-1))
    return out


def expert_columns(r, res, xs):
    """The expert M-step's sums from responsibilities r and residuals res (lists of K (R, n) tensors).

    Per expert Σ r·m over the monomials m of [x, 1] up to degree 2, then per expert
    Σ r e·[1, x_1..x_d] and Σ r e² (e = y − current mean): :func:`unpack_experts` names them.
    """
    cols = []
    for rk in r:
        cols += moment_sums(rk, xs)
    for rk, ek in zip(r, res):
        re = rk * ek
        cols += moment_sums(re, xs, degree=1)
        cols.append((re * ek).sum(-1))
    return cols


def unpack_experts(sums, i: int, K: int, d: int) -> dict:
    """The columns of :func:`expert_columns` starting at column ``i`` of ``sums`` (R, M), named:
    ``S`` (R, K, p) Σ r x1, ``A`` (R, K, p, p) Σ r x1 x1ᵀ, ``be`` (R, K, p) Σ r e x1, ``ee`` (R, K) Σ r e²."""
    R = sums.shape[0]
    q = len(monomials(d))
    second, first = (t.to(sums.device) for t in moment_index(d))
    rq = sums[:, i : i + K * q].reshape(R, K, q)
    i += K * q
    re = sums[:, i : i + K * (d + 2)].reshape(R, K, d + 2)  # Σ r e·[1, x_1..x_d], Σ r e²
    return dict(S=rq[..., first], A=rq[..., second], be=re[..., : d + 1][..., first], ee=re[..., d + 1])


def em_sums(gate_theta, expert_theta, var, x, y):
    """One pass over the data: the E-step and every sum the M-step needs, as one (R, M) tensor.

    Arguments as :func:`em_statistics`; :func:`unpack_sums` names the columns.
    Written with experts and features unrolled into (R, n) operations so that
    Inductor fuses the pass into few loops over the samples; exponents are
    clamped at EXP_FLOOR (see there).
    """
    R, n, d = x.shape
    K = gate_theta.shape[1]
    xs = [x[..., j] for j in range(d)]
    logits = [lin(gate_theta, k, xs) for k in range(K)]
    m, eg, sg = exp_terms(logits)
    lse_g = m + torch.log(sg)
    inv_sg = 1.0 / sg
    g = [e * inv_sg for e in eg[: K - 1]]
    const = _HALF_LOG_2PI + 0.5 * torch.log(var)  # (R, K)
    coef = -0.5 / var
    res = [y - lin(expert_theta, k, xs) for k in range(K)]
    joint = [logits[k] - lse_g - const[:, k : k + 1] + coef[:, k : k + 1] * res[k] * res[k] for k in range(K)]
    mj, ej, sj = exp_terms(joint)
    lse = mj + torch.log(sj)
    inv_sj = 1.0 / sj
    r = [e * inv_sj for e in ej]
    cols = [lse.sum(-1), lse_g.sum(-1)] + expert_columns(r, res, xs)
    for k in range(K - 1):
        cols += moment_sums(g[k], xs)
    for k in range(K - 1):
        for k2 in range(k, K - 1):
            cols += moment_sums(g[k] * g[k2], xs)
    return torch.stack(cols, -1)


@functools.lru_cache(maxsize=None)
def _pair_index(K: int) -> torch.Tensor:
    """(K−1, K−1) index of the pair (min(k, l), max(k, l)) in the k ≤ l order of :func:`em_sums` (cached: read-only)."""
    pairs = [(k, k2) for k in range(K - 1) for k2 in range(k, K - 1)]
    return torch.tensor([[pairs.index((min(k, k2), max(k, k2))) for k2 in range(K - 1)] for k in range(K - 1)],
                        dtype=torch.long)


def unpack_sums(sums, K: int, d: int) -> dict:
    """Name the columns of :func:`em_sums` (R, M): the dict of :func:`em_statistics`."""
    R = sums.shape[0]
    p = d + 1
    q = len(monomials(d))
    second, first = (t.to(sums.device) for t in moment_index(d))
    out = dict(loglik=sums[:, 0], lse_gate=sums[:, 1], **unpack_experts(sums, 2, K, d))
    i = 2 + n_expert_columns(K, d)
    gq = sums[:, i : i + (K - 1) * q].reshape(R, K - 1, q)
    i += (K - 1) * q
    n_pairs = K * (K - 1) // 2
    ggq = sums[:, i : i + n_pairs * q].reshape(R, n_pairs, q)
    pair_index = _pair_index(K).to(sums.device)
    out.update(G=gq[..., first], Gxx=gq[..., second],
               GG=ggq[:, pair_index][..., second] if K > 1 else sums.new_zeros(R, 0, 0, p, p))
    return out


def em_statistics(gate_theta, expert_theta, var, x, y):
    """One pass over the data: E-step and every sufficient statistic of the M-step.

    Parameters
    ----------
    gate_theta : tensor of shape (R, K, p)
        Gate logit coefficients on x1 = [x, 1] (p = n_features + 1); row K−1 zero.
    expert_theta : tensor of shape (R, K, p)
        Expert mean coefficients [slope, intercept] on x1.
    var : tensor of shape (R, K)
        Expert variances (> 0).
    x : tensor of shape (R, n, d)
    y : tensor of shape (R, n)

    Returns
    -------
    dict of tensors
        ``loglik`` (R,): Σ_n log p(y_n|x_n); ``lse_gate`` (R,): Σ_n logsumexp_k θ_k·x1_n;
        ``S`` (R, K, p): Σ_n r_nk x1_n; ``A`` (R, K, p, p): Σ_n r_nk x1_n x1_nᵀ;
        ``be`` (R, K, p): Σ_n r_nk e_nk x1_n and ``ee`` (R, K): Σ_n r_nk e_nk² with
        e_nk = y_n − expert_theta_k·x1_n; ``G`` (R, K−1, p): Σ_n g_nk x1_n;
        ``Gxx`` (R, K−1, p, p): Σ_n g_nk x1_n x1_nᵀ; ``GG`` (R, K−1, K−1, p, p):
        Σ_n g_nk g_nl x1_n x1_nᵀ (g = gate weights, r = responsibilities).
    """
    return unpack_sums(em_sums(gate_theta, expert_theta, var, x, y), gate_theta.shape[1], x.shape[-1])


def gate_lse_sum(theta, x):
    """Σ_n logsumexp_k θ_k·x1_n for candidate gates: theta (A, R, K, p), x (R, n, d) → (A, R)."""
    A, R, K, p = theta.shape
    xs = [x[..., j] for j in range(p - 1)]  # (R, n) each, broadcast against (A, R, 1)
    logits = [theta[:, :, k, p - 1 : p] for k in range(K)]  # intercepts (A, R, 1)
    for k in range(K):
        for j in range(p - 1):
            logits[k] = logits[k] + theta[:, :, k, j : j + 1] * xs[j]
    m, _, s = exp_terms(logits)
    return (m + torch.log(s)).sum(-1)


def logit_range(delta, x):
    """max_{k,n} |δ_k·x1_n|: the largest change of any logit; delta (R, K, p), x (R, n, d) → (R,)."""
    R, K, p = delta.shape
    xs = [x[..., j] for j in range(p - 1)]
    out = lin(delta, 0, xs).abs().amax(-1)
    for k in range(1, K):
        out = torch.maximum(out, lin(delta, k, xs).abs().amax(-1))
    return out


# ------------------------------------------------------------------ M-step from the statistics
def expert_update(st, expert_theta, var, n: int, var_floor):
    """Expert M-step from :func:`em_statistics`: (θ (R, K, p), variance (R, K)).

    Weighted least squares with the ridge of :func:`moelab.mstep.expert_m_step`,
    written around the current fit: θ_new = θ + Δ with
    (A + ridge) Δ = Σ r e x1 − ridge·θ, and Σ r (y − θ_new·x1)² = Σ r e² − 2Δ·Σ r e x1 + ΔᵀAΔ
    (no cancellation as Δ → 0). Variance floored at ``var_floor``; experts with
    Σ r < 1e-8·n keep their parameters. Where the Cholesky factorisation fails,
    Δ is the least-squares solution instead (:func:`expert_solve` and :func:`expert_lstsq`).
    """
    new_theta, new_var, bad = expert_solve(st, expert_theta, var, n, var_floor)
    if bool(bad.any()):
        new_theta, new_var = expert_lstsq(st, expert_theta, var, n, var_floor, bad, new_theta, new_var)
    return new_theta, new_var


def _expert_system(st, expert_theta):
    S, A, be = st["S"], st["A"], st["be"]
    p = expert_theta.shape[-1]
    eye = _eye(p, A.dtype, A.device)
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    ridge = 1e-10 * scale + 1e-30  # [R, K]
    return A + ridge[..., None, None] * eye, be - ridge[..., None] * expert_theta


def _expert_finish(st, expert_theta, var, n, var_floor, delta):
    A, be, ee, nk = st["A"], st["be"], st["ee"], st["S"][..., -1]
    sse = ee - 2 * (delta * be).sum(-1) + (delta.unsqueeze(-2) @ A @ delta.unsqueeze(-1))[..., 0, 0]
    new_var = (sse.clamp_min(0) / nk.clamp_min(1e-300)).clamp_min(var_floor)
    dead = nk < 1e-8 * n
    return (torch.where(dead[..., None], expert_theta, expert_theta + delta), torch.where(dead, var, new_var))


def expert_solve(st, expert_theta, var, n: int, var_floor):
    """:func:`expert_update` by Cholesky only, without data-dependent branches (so it compiles as one
    graph): (θ (R, K, p), variance (R, K), bad (R, K) bool — where the factorisation failed and the
    returned values are not to be used; :func:`expert_lstsq` redoes those)."""
    Ar, rhs = _expert_system(st, expert_theta)
    L, info = torch.linalg.cholesky_ex(Ar)
    delta = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    new_theta, new_var = _expert_finish(st, expert_theta, var, n, var_floor, delta)
    return new_theta, new_var, info > 0


def expert_lstsq(st, expert_theta, var, n: int, var_floor, bad, new_theta, new_var):
    """:func:`expert_solve`'s result with the experts ``bad`` (R, K) redone by least squares."""
    Ar, rhs = _expert_system(st, expert_theta)
    delta = torch.linalg.lstsq(Ar, rhs.unsqueeze(-1)).solution.squeeze(-1)
    th, v = _expert_finish(st, expert_theta, var, n, var_floor, delta)
    return torch.where(bad[..., None], th, new_theta), torch.where(bad, v, new_var)


def _full(free, K, p):
    """Free gate coefficients (..., (K−1)·p) → (..., K, p) with the reference row zero."""
    return torch.nn.functional.pad(free.reshape(*free.shape[:-1], K - 1, p), (0, 0, 0, 1))


@functools.lru_cache(maxsize=64)
def _eye(p: int, dtype, device) -> torch.Tensor:
    """The (p, p) identity (cached: read-only; the M-step adds ridges to it at every iteration)."""
    return torch.eye(p, dtype=dtype, device=device)


def gate_proposal(st, gate_theta, x, run, x_range=None):
    """Damped Newton step on Q_gate(θ) = Σ_k θ_k·S_k − Σ_n logsumexp_k θ_k·x1_n from the statistics.

    Same system as :func:`moelab.mstep.softmax_gate_newton_step` (ridge, gradient
    step where Cholesky fails, logit change capped, negligible steps not taken).
    ``x_range`` = (min, max) of x per problem, (R,) each, saves a pass over x
    for one feature (:func:`logit_range` otherwise). Returns the full step's θ (R, K, p) and what
    :func:`gate_verify` needs.
    """
    R, K, p = gate_theta.shape
    if p != 2:
        x_range = None
    return gate_newton_step(st, gate_theta, x.shape[-2], x_range, lambda step: run(logit_range, _full(step, K, p), x))


def gate_newton_step(st, gate_theta, n: int, x_range=None, logit_change=None):
    """:func:`gate_proposal` for n samples: the largest logit change of a step from ``x_range`` (one
    feature; no branch on the data, so it compiles as one graph) or ``logit_change(step)`` (R,)."""
    R, K, p = gate_theta.shape
    P = (K - 1) * p
    dtype, dev = gate_theta.dtype, gate_theta.device
    free = gate_theta[:, : K - 1].reshape(R, P)
    Sg = st["S"][:, : K - 1].reshape(R, P)
    q0 = (free * Sg).sum(-1) - st["lse_gate"]
    grad = Sg - st["G"].reshape(R, P)
    H = torch.diag_embed(st["Gxx"].permute(0, 2, 3, 1)).permute(0, 3, 4, 1, 2) - st["GG"]  # δ_kl Σg_k xxᵀ − Σg_k g_l xxᵀ
    H = H.permute(0, 1, 3, 2, 4).reshape(R, P, P)  # minus the Hessian (PSD)
    ridge = 1e-9 * H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12) + 1e-12
    L, info = torch.linalg.cholesky_ex(H + ridge[:, None, None] * _eye(P, dtype, dev))
    step = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
    step = torch.where((info > 0)[:, None], grad, step)  # gradient step if Cholesky failed
    if x_range is not None:  # one feature: |δ_k·[x, 1]| is largest at min or max x
        lo, hi = x_range
        sk = step.reshape(R, K - 1, p)
        dl = torch.maximum((sk[..., 0] * lo[:, None] + sk[..., 1]).abs(), (sk[..., 0] * hi[:, None] + sk[..., 1]).abs())
        dl = dl.amax(-1)
    else:
        dl = logit_change(step)
    step = cap_step(dl, step)
    skip = negligible_gain(grad, step, H, q0, n, info == 0)
    cand = torch.where(skip[:, None], free, free + step)
    return _full(cand, K, p), dict(free=free, step=step, q0=q0, Sg=Sg, skip=skip, cand=cand)


def m_step_one_feature(sums, gate_theta, expert_theta, var, x_lo, x_hi, n: int, var_floor: float):
    """The M-step of the one-pass EM for one feature, straight from :func:`em_sums`'s (R, M) sums.

    :func:`unpack_sums`, :func:`expert_solve` and :func:`gate_newton_step` in one function without
    branches on the data, so ``torch.compile`` makes it one call per iteration instead of some hundred
    small operations (the EM loop's cost per iteration once few problems remain). ``x_lo``, ``x_hi``
    (R,): each problem's range of x; ``var_floor``: a float, or a 0-dim tensor so that a compiled call is not
    specialised on its value. Returns (expert θ (R, K, 2), variance (R, K), bad (R, K) bool:
    experts :func:`expert_lstsq` must redo, proposed gate θ (R, K, 2), ``pending`` of :func:`gate_verify`).
    """
    K = gate_theta.shape[1]
    st = unpack_sums(sums, K, 1)
    new_theta, new_var, bad = expert_solve(st, expert_theta, var, n, var_floor)
    prop, pending = gate_newton_step(st, gate_theta, n, (x_lo, x_hi))
    return new_theta, new_var, bad, prop, pending


def gate_step_ok(lse_gate, pending):
    """(R,) bool: where the proposed gate step increased Q_gate (or none was taken), from Σ_n logsumexp
    ``lse_gate`` (R,) at the proposal and :func:`gate_proposal`'s ``pending``."""
    q1 = (pending["cand"] * pending["Sg"]).sum(-1) - lse_gate
    return (q1 > pending["q0"]) | pending["skip"]  # NaN compares False


def gate_verify(lse_gate, pending, x, run):
    """Accept the proposed gate where Q_gate increased, else search smaller steps.

    ``lse_gate`` (R,): Σ_n logsumexp at the proposed θ (from the next pass of
    :func:`em_statistics`, or :func:`gate_lse_sum`). Returns θ (R, K, p) and the
    indices (tensor) of problems whose θ differs from the proposal, or None.
    """
    free, step, q0, Sg, cand = (pending[k] for k in ("free", "step", "q0", "Sg", "cand"))
    R, P = free.shape
    p = x.shape[-1] + 1
    K = P // p + 1
    ok = gate_step_ok(lse_gate, pending)
    if bool(ok.all()):
        return _full(cand, K, p), None
    idx = (~ok).nonzero().squeeze(-1)

    def q_fn(c, sub):
        return (c * Sg[sub]).sum(-1) - run(gate_lse_sum, _full(c, K, p).contiguous(), x[sub])

    new = cand.clone()
    new[idx], _ = backtrack(q_fn, free, step, q0, idx)
    return _full(new, K, p), idx


def m_step(st, gate_theta, expert_theta, var, x, var_floor, run):
    """One full M-step from :func:`em_statistics` (gate line search by its own pass).

    Returns new (gate_theta, expert_theta, var), the updates of
    :func:`moelab.mstep.expert_m_step` and one
    :func:`moelab.mstep.softmax_gate_newton_step`. The EM loop instead checks the
    proposed gate with the next iteration's pass (see ``moelab.em._run_em``).
    """
    new_theta, new_var = expert_update(st, expert_theta, var, x.shape[-2], var_floor)
    prop, pending = gate_proposal(st, gate_theta, x, run)
    gth, _ = gate_verify(run(gate_lse_sum, prop.unsqueeze(0), x)[0], pending, x, run)
    return gth, new_theta, new_var
