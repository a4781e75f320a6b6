"""M-step kernels for EM on a Gaussian mixture of experts (pure functions, batched).

All tensors carry one leading problem dimension R:
x1 (R, n, p) is the design [x, 1] (p = n_features + 1), y (R, n), and
responsibilities are stored experts-first, resp (R, K, n): reductions over the
few experts then run along a strided axis with the long sample axis contiguous,
several times faster on CPU than softmax over a trailing axis of size K. Each kernel returns new parameters that do not decrease the
expected complete-data log-likelihood Q, so EM built from them is monotone.

Sources: Jordan & Jacobs (1994) (IRLS gate step, weighted-least-squares experts);
Jordan & Xu (1995) (convergence of EM for MoE); Dempster, Laird & Rubin (1977),
generalised EM.
"""

from __future__ import annotations

import math

import torch

__all__ = ["outer_design", "expert_m_step", "softmax_gate_newton_step", "gate_newton_step", "GateParameters",
           "newton_ascent_step", "newton_ascent_steps", "line_search", "damped_line_search", "best_candidate", "DAMPING", "gate_q", "backtrack", "cap_step", "negligible_gain"]

from ._validation import tiny

#: step sizes tried (all at once) by the gate line search
_STEP_SIZES = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
#: Levenberg–Marquardt damping ladder of :func:`newton_ascent_steps`, × mean|diag(−∇²Q)|
DAMPING = (1e-6, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: largest change of any logit a single gate Newton step may make
_MAX_LOGIT_CHANGE = 200.0
#: gate steps predicted to gain less than this × (|Q_gate| + n) are not taken
_NEGLIGIBLE_GAIN = 1e-13


def outer_design(x1: torch.Tensor) -> torch.Tensor:
    """Per-sample outer products x1_n x1_nᵀ flattened: (R, n, p*p). Cache it across iterations."""
    return (x1.unsqueeze(-1) * x1.unsqueeze(-2)).flatten(-2)


def expert_m_step(x1, y, resp, var_floor, old_theta=None, old_var=None, xx=None):
    """Closed-form M-step for Gaussian linear experts (weighted least squares).

    Parameters
    ----------
    x1 : tensor of shape (R, n, p) or (n, p)
        Design matrix [x, 1]; (n, p) when one design is shared by all R problems.
    y : tensor of shape (R, n), or (n,) with a shared design
    resp : tensor of shape (R, K, n)
        Responsibilities (sum to 1 over K).
    var_floor : float or tensor broadcastable to (R, K)
        Smallest allowed variance ν_k; the constrained maximiser of Q in ν_k
        is ``max(ν̂_k, var_floor)``.
    old_theta, old_var : tensors of shape (R, K, p) and (R, K), optional
        Kept for experts whose total responsibility is ~0 (nothing to fit).
    xx : tensor of shape (R, n, p*p) or (n, p*p), optional
        :func:`outer_design` of x1, if cached.

    Returns
    -------
    theta : tensor of shape (R, K, p)
        [a_k, b_k] per expert.
    var : tensor of shape (R, K)
    """
    nk = resp.sum(-1)  # [R, K]
    p = x1.shape[-1]
    if xx is None:
        xx = outer_design(x1)
    A = (resp @ xx).unflatten(-1, (p, p))  # [R, K, p, p]
    b = resp @ (x1 * y.unsqueeze(-1))  # [R, K, p]
    eye = torch.eye(p, dtype=x1.dtype, device=x1.device)
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    A = A + (1e-10 * scale + 1e-30) * eye
    L, info = torch.linalg.cholesky_ex(A)
    theta = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)  # [R, K, p]
    bad = info > 0
    if bool(bad.any()):
        theta = torch.where(bad[..., None], torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1), theta)
    resid = y.unsqueeze(-2) - theta @ x1.transpose(-1, -2)  # [R, K, n]
    var = (resp * resid.square()).sum(-1) / nk.clamp_min(tiny(nk.dtype))
    var = torch.clamp(var, min=var_floor) if not torch.is_tensor(var_floor) else torch.maximum(var, var_floor)
    dead = nk < 1e-8 * x1.shape[-2]
    if old_theta is not None and bool(dead.any()):
        theta = torch.where(dead[..., None], old_theta, theta)
        var = torch.where(dead, old_var, var)
    return theta, var


def gate_q(log_weights: torch.Tensor, resp: torch.Tensor, finite: bool = False) -> torch.Tensor:
    """Gate part of Q: Σ_n Σ_k r_nk log g_k(x_n), with 0·log 0 = 0. Shape (..., R).

    ``log_weights`` and ``resp`` share one layout, (..., K, n) or (..., n, K).

    ``finite=True`` skips the 0·(−inf) guard when every log weight is finite.
    """
    if finite:
        return (resp * log_weights).sum((-1, -2))
    return torch.where(resp > 0, resp * log_weights, torch.zeros((), dtype=resp.dtype, device=resp.device)).sum((-1, -2))


def backtrack(q_fn, theta0, delta, q0, idx):
    """Best of the smaller steps for the problems ``idx`` whose full step failed.

    Returns (θ (r, P), Q (r,)): the best candidate θ0 + α·δ over α in
    _STEP_SIZES[1:] where it increases Q, else θ0.
    """
    alphas = torch.tensor(_STEP_SIZES[1:], dtype=theta0.dtype, device=theta0.device)
    return best_candidate(q_fn, theta0, alphas[:, None, None] * delta[idx].unsqueeze(0), q0, idx)


def best_candidate(q_fn, theta0, steps, q0, idx):
    """The best of the candidates θ0 + steps[a] (``steps`` (A, r, P)) for the problems ``idx`` (r,), evaluated in
    one ``q_fn`` call; returns (θ (r, P), Q (r,)): the best candidate where it increases Q, else θ0."""
    cand = theta0[idx].unsqueeze(0) + steps  # [A, r, P]
    q = q_fn(cand, idx)
    q = torch.where(torch.isnan(q), torch.full_like(q, -math.inf), q)
    best_q, best = q.max(0)
    take = best_q > q0[idx]
    pick = cand.gather(0, best[None, :, None].expand(1, *cand.shape[1:])).squeeze(0)
    return torch.where(take[:, None], pick, theta0[idx]), torch.where(take, best_q, q0[idx])


def _line_search(q_fn, theta0, delta, q0, skip=None):
    """Full step where it increases Q, else the best of smaller steps; keep θ0 unless Q increases.

    theta0, delta : (R, P); q_fn(θ, idx) maps candidates (A, r, P) for the problems
    ``idx`` (None = all) to Q values (A, r). ``skip`` (R,) bool: problems that
    keep θ0 without a search (see :func:`negligible_gain`).
    """
    alphas = torch.tensor(_STEP_SIZES, dtype=theta0.dtype, device=theta0.device)
    return damped_line_search(q_fn, theta0, alphas[:, None, None] * delta.unsqueeze(0), q0, skip)


def negligible_gain(grad, delta, negH, q0, n, chol_ok):
    """(R,) bool: the step's predicted gain in Q is below what rounding can confirm.

    Predicted gain of the (capped) Newton step δ: gᵀδ − ½ δᵀ(−∇²Q)δ. Steps that
    gain less than _NEGLIGIBLE_GAIN·(|Q| + n) are not taken (EM keeps θ): at a
    converged gate their evaluated Q change is rounding noise, and searching
    over step sizes would cost passes over the data for nothing. Only where
    the Newton system was solved (``chol_ok``).
    """
    gain = (grad * delta).sum(-1) - 0.5 * (delta.unsqueeze(-2) @ negH @ delta.unsqueeze(-1))[..., 0, 0]
    return chol_ok & (gain <= _NEGLIGIBLE_GAIN * (q0.abs() + n))


def cap_step(delta_logits_max: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Scale each problem's step so no logit changes by more than _MAX_LOGIT_CHANGE."""
    factor = (_MAX_LOGIT_CHANGE / delta_logits_max.clamp_min(tiny(delta_logits_max.dtype))).clamp(max=1.0)
    return delta * factor[:, None]


def _logsumexp_experts(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the experts axis (−2) of finite logits (..., K, n) → (..., n), overwriting ``logits``."""
    top = logits.amax(-2, keepdim=True)
    return logits.sub_(top).exp_().sum(-2).log_().add_(top.squeeze(-2))


def softmax_gate_newton_step(x1, resp, theta, n_steps: int = 1, xx=None):
    """Damped Newton (IRLS) steps on the gate part of Q for linear softmax logits.

    Maximises Q_gate(θ) = Σ_n Σ_k r_nk log softmax_k(θ_k·x1_n), concave in θ,
    with the last expert as reference (θ_K = 0). Each step solves the Newton
    system with a tiny ridge, caps the change of any logit, and keeps the best
    of several step sizes only if Q_gate increases (a generalised-EM step).
    A step whose predicted gain is below rounding (:func:`negligible_gain`) is
    not taken.

    Parameters
    ----------
    x1 : tensor of shape (R, n, p), or (n, p) for one design shared by all R problems
        (each product over samples is then one matrix product over the R problems).
    resp : tensor of shape (R, K, n)
        Responsibilities (each sample's sum to 1 over the experts; the gradient and Hessian assume it).
    theta : tensor of shape (R, K, p)
        Logit coefficients; row K-1 must be zero.
    n_steps : int
    xx : tensor of shape (R, n, p*p) or (n, p*p), optional
        Cached :func:`outer_design` of x1.

    Returns
    -------
    tensor of shape (R, K, p)

    Source: Jordan & Jacobs (1994), Section 4 (IRLS for the gating network).
    """
    R, K = resp.shape[:2]
    n, p = x1.shape[-2:]
    shared = x1.dim() == 2
    if K == 1:
        return theta
    x1t = x1.transpose(-1, -2)  # [R, p, n] or [p, n]
    P = (K - 1) * p
    eye = torch.eye(P, dtype=x1.dtype, device=x1.device)
    zeros_row = torch.zeros(1, p, dtype=theta.dtype, device=theta.device)

    def full(free):  # [..., R, P] -> [..., R, K, p]
        return torch.cat([free.reshape(*free.shape[:-1], K - 1, p), zeros_row.expand(*free.shape[:-1], 1, p)], -2)

    # Q_gate(θ) = Σ_k θ_k·S_k − Σ_n w_n logsumexp_k θ_k·x1_n with S_k = Σ_n r_nk x1_n and w_n = Σ_k r_nk (= 1 for
    # responsibilities): a candidate needs only its logsumexp, not a log-softmax and a product with r (two fewer
    # (R, K, n) temporaries; the fused pass uses the same form, moelab._fused.linear.gate_proposal)
    # In float32 the sums (≈ 1e5 on a hard gate) cancel to more than the gains near convergence: there Q, the
    # gradient and the Hessian are sums of per-sample differences, as before the S form (a test session: float32
    # fits had stalled up to 1.7 below)
    direct = resp.dtype != torch.float64
    S = resp @ x1  # [R, K, p]
    w = resp.sum(-2)  # [R, n]

    def q_of(th, lse, Ss, ws):  # th (..., r, K, p), lse (..., r, n)
        return (th * Ss).sum((-1, -2)) - (lse * ws).sum(-1)

    def q_fn(free, idx):
        xs = x1t if idx is None or shared else x1t[idx]
        th = full(free)
        logits = th @ xs  # [A, r, K, n]
        if direct:
            return gate_q(torch.log_softmax(logits, -2), resp if idx is None else resp[idx], finite=True)
        Ss, ws = (S, w) if idx is None else (S[idx], w[idx])
        return q_of(th, _logsumexp_experts(logits), Ss, ws)  # logits overwritten

    if xx is None:
        xx = outer_design(x1)
    free = theta[:, : K - 1].reshape(R, P)
    pairs = [(k, l) for k in range(K - 1) for l in range(k, K - 1)]
    for _ in range(n_steps):
        th = full(free)
        g = th @ x1t  # logits [R, K, n], turned into the gate probabilities in place
        if direct:
            logg = torch.log_softmax(g, -2)
            q0 = gate_q(logg, resp, finite=True)
            g = logg.exp_()
        else:
            top = g.amax(-2, keepdim=True)
            total = g.sub_(top).exp_().sum(-2, keepdim=True)
            q0 = q_of(th, (total.log() + top).squeeze(-2), S, w)
            g.div_(total)
        if direct:  # per-sample differences first: (r − g) and g(δ − g) are small where the sums would cancel
            gf = g[:, : K - 1]
            grad = ((resp[:, : K - 1] - gf) @ x1).reshape(R, P)
            W = gf.unsqueeze(2) * (-gf).unsqueeze(1)  # [R, K-1, K-1, n]
            W.diagonal(dim1=1, dim2=2).add_(gf.transpose(-1, -2))
            H = (W.flatten(1, 2) @ xx).reshape(R, K - 1, K - 1, p * p)
        else:
            grad = (S - g @ x1)[:, : K - 1].reshape(R, P)
            Gxx = (g @ xx)[:, : K - 1]  # Σ_n g_nk x1 x1ᵀ  [R, K-1, p^2]
            GG = torch.stack([g[:, k] * g[:, l] for k, l in pairs], 1) @ xx  # Σ_n g_nk g_nl x1 x1ᵀ, k ≤ l
            H = torch.empty(R, K - 1, K - 1, p * p, dtype=g.dtype, device=g.device)
            for i, (k, l) in enumerate(pairs):  # minus the Hessian: δ_kl Σ g_k xxᵀ − Σ g_k g_l xxᵀ (PSD)
                H[:, k, l] = (Gxx[:, k] - GG[:, i]) if k == l else -GG[:, i]
                H[:, l, k] = H[:, k, l]
        H = H.reshape(R, K - 1, K - 1, p, p).permute(0, 1, 3, 2, 4).reshape(R, P, P)
        ridge = 1e-9 * H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12) + 1e-12
        L, info = torch.linalg.cholesky_ex(H + ridge[:, None, None] * eye)
        delta = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
        delta = torch.where((info > 0)[:, None], grad, delta)  # gradient step if Cholesky failed
        dl = (delta.reshape(R, K - 1, p) @ x1t).abs_().amax((-1, -2))
        delta = cap_step(dl, delta)
        skip = negligible_gain(grad, delta, H, q0, n, info == 0)
        free, _ = _line_search(q_fn, free, delta, q0, skip)
    return full(free)


class GateParameters:
    """The flat layout of a gate's estimable parameters used by its Newton step.

    θ (..., R, P) holds, in this order: the K−1 free slope rows (row-major, (K−1)·d
    values), the K−1 free intercepts, then every other estimable parameter of
    :meth:`Gate.params` (one value each; those in ``positive_params``, such as τ,
    on the log scale). The reference expert K−1 stays at zero.
    """

    def __init__(self, gate):
        self.gate = gate
        self.K, self.d = gate.n_experts, gate.n_features
        self.names = list(gate.params())
        self.sizes = [(self.K - 1) * self.d if nm == "slope" else self.K - 1 if nm == "intercept" else 1
                      for nm in self.names]
        self.P = sum(self.sizes)

    def flatten(self, ps=None):
        """Parameters (dict of :meth:`Gate.params`, default the gate's) → θ (R, P)."""
        ps = self.gate.params() if ps is None else ps
        K, parts = self.K, []
        for nm in self.names:
            t = ps[nm]
            R = t.shape[0]
            if nm == "slope":
                parts.append(t[:, : K - 1].reshape(R, -1))
            elif nm == "intercept":
                parts.append(t[:, : K - 1])
            else:
                parts.append(t.log().reshape(R, 1) if nm in self.gate.positive_params else t.reshape(R, 1))
        return torch.cat(parts, -1)

    def unflatten(self, theta):
        """θ (..., R, P) → dict of parameters with the reference expert's slope and intercept zero."""
        K, d = self.K, self.d
        lead = theta.shape[:-1]
        out, i = {}, 0
        for nm, s in zip(self.names, self.sizes):
            t = theta[..., i : i + s]
            i += s
            if nm == "slope":
                out[nm] = torch.cat([t.reshape(*lead, K - 1, d), theta.new_zeros(*lead, 1, d)], -2)
            elif nm == "intercept":
                out[nm] = torch.cat([t, theta.new_zeros(*lead, 1)], -1)
            else:
                t = t.squeeze(-1)
                out[nm] = t.exp() if nm in self.gate.positive_params else t
        return out


def newton_ascent_steps(grad, negH, x_abs_max, n_features: int):
    """Levenberg–Marquardt steps of :func:`gate_newton_step` from Q's derivatives, one per damping of :data:`DAMPING`.

    ``grad`` (R, P) and ``negH`` (R, P, P) are the gradient and minus the Hessian of Q_gate at θ;
    ``x_abs_max`` (R,) = max |x| over samples and features. The Hessian is symmetrised and non-finite
    entries zeroed; step a solves (−H + λ_a I) δ = ∇Q with λ_a = max(0, −e_min) + c_a · mean|diag(−H)| + 1e-12
    (e_min the smallest eigenvalue, c_a = DAMPING[a]), so every step is an ascent direction, from the
    Newton step (c = 1e-6) to a short gradient step (c = 100). Each is scaled so that no logit (through slope
    or intercept) moves by more than the cap. Returns δ (A, R, P), A = len(DAMPING).

    Why a ladder: where Q is not concave (an over-specified gate whose split experts are nearly equal), the
    Newton step is dominated by the negative-curvature direction with length 1 / (c · scale), is capped,
    and fails; halving it keeps the same bad direction (measured: tanh gate, K = 3 over 2 true experts,
    198 of 200 gate steps kept the old gate). Larger damping turns the step towards the gradient.
    Source: Levenberg (1944), Marquardt (1963); Nocedal & Wright (2006), Section 4.3 (indefinite Hessians).
    """
    P = grad.shape[-1]
    negH = 0.5 * (negH + negH.transpose(-1, -2))
    negH = torch.nan_to_num(negH, nan=0.0, posinf=0.0, neginf=0.0)
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    evals, evecs = torch.linalg.eigh(negH)  # (R, P), (R, P, P)
    scale = negH.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-12)
    c = torch.tensor(DAMPING, dtype=grad.dtype, device=grad.device)
    lam = (-evals[..., 0]).clamp_min(0) + c[:, None] * scale + 1e-12  # (A, R)
    g_eig = (evecs.transpose(-1, -2) @ grad.unsqueeze(-1)).squeeze(-1)  # (R, P)
    delta = (evecs @ (g_eig / (evals + lam.unsqueeze(-1))).unsqueeze(-1)).squeeze(-1)  # (A, R, P)
    # cap the step: no logit (through the slope or intercept) may move by more than the cap
    norm = delta.abs().amax(-1) * (1.0 + x_abs_max * n_features)
    factor = (_MAX_LOGIT_CHANGE / norm.clamp_min(tiny(norm.dtype))).clamp(max=1.0)
    return delta * factor.unsqueeze(-1)


def newton_ascent_step(grad, negH, x_abs_max, n_features: int):
    """The least damped step of :func:`newton_ascent_steps` (the damped Newton step): δ (R, P)."""
    return newton_ascent_steps(grad, negH, x_abs_max, n_features)[0]


def damped_line_search(q_fn, theta0, steps, q0, skip=None):
    """The first step of ``steps`` (A, R, P) where it increases Q, else the best of the others (one ``q_fn`` call
    for all), else θ0; problems ``skip`` (R,) bool keep θ0 without an evaluation. Returns (θ (R, P), Q (R,)).

    ``q_fn`` as in :func:`line_search`; ``steps`` from :func:`newton_ascent_steps`.
    """
    full = theta0 + steps[0]
    q1 = q_fn(full.unsqueeze(0), None).squeeze(0)
    ok = q1 > q0  # NaN compares False
    if skip is not None:
        ok = ok & ~skip
    new, qnew = torch.where(ok[:, None], full, theta0), torch.where(ok, q1, q0)
    failed = ~ok if skip is None else ~ok & ~skip
    if steps.shape[0] == 1 or not bool(failed.any()):
        return new, qnew
    idx = failed.nonzero().squeeze(-1)
    new[idx], qnew[idx] = best_candidate(q_fn, theta0, steps[1:, idx], q0, idx)
    return new, qnew


def line_search(q_fn, theta0, delta, q0):
    """Full step where it increases Q, else the best of the smaller step sizes; θ0 unless Q increases.

    theta0, delta : (R, P); q0 (R,) Q at θ0; ``q_fn(θ, idx)`` maps candidates (A, r, P)
    for problems ``idx`` (None = all) to Q (A, r). Returns (θ (R, P), Q (R,)).
    """
    return _line_search(q_fn, theta0, delta, q0)


def gate_newton_step(gate, x, resp, n_steps: int = 1):
    """Generalised-EM gate step for any gate: damped Newton with autograd derivatives.

    Maximises Q_gate = Σ_n Σ_k r_nk log g_k(x_n) over the gate's estimable
    parameters (reference expert fixed at zero; positive parameters such as τ
    on the log scale; layout :class:`GateParameters`). The Hessian is shifted
    (Levenberg–Marquardt, :func:`newton_ascent_step`) until positive definite,
    so non-concave gates (activation, estimated temperature, top-K) get an
    ascent direction; a step is kept only if Q_gate increases.

    Parameters
    ----------
    gate : moelab.gates.Gate
        Current gate, batch shape (R,).
    x : tensor of shape (R, n, d)
    resp : tensor of shape (R, K, n)

    Returns
    -------
    Gate
        Same family, updated parameters.
    """
    R = x.shape[0]
    resp = resp.transpose(-1, -2)  # gate layout (R, n, K)
    layout = GateParameters(gate)
    P = layout.P
    if P == 0:
        return gate
    dtype, dev = x.dtype, x.device

    def q_fn(theta, idx=None):
        if idx is None:
            return gate_q(gate.replace(**layout.unflatten(theta)).log_weights(x), resp)
        sub = gate.map_tensors(lambda t: t[idx]).replace(**layout.unflatten(theta))
        return gate_q(sub.log_weights(x[idx]), resp[idx])

    theta = layout.flatten().detach()
    eye = torch.eye(P, dtype=dtype, device=dev)
    xs = x.abs().amax(-2).amax(-1)  # [R]
    for _ in range(n_steps):
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            q0 = q_fn(th)
            (grad,) = torch.autograd.grad(q0.sum(), th, create_graph=True)
            basis = eye.unsqueeze(1).expand(P, R, P)
            (hess,) = torch.autograd.grad(grad, th, grad_outputs=basis, is_grads_batched=True, allow_unused=True)
        grad = grad.detach()
        q0 = q0.detach()
        if hess is None:
            negH = torch.zeros(R, P, P, dtype=dtype, device=dev)
        else:
            negH = -hess.detach().permute(1, 0, 2)
        steps = newton_ascent_steps(grad, negH, xs, gate.n_features)
        skip = negligible_gain(grad, steps[0], negH, q0, x.shape[-2], torch.ones_like(q0, dtype=torch.bool))
        with torch.no_grad():
            theta, _ = damped_line_search(q_fn, theta, steps, q0, skip)
    return gate.replace(**layout.unflatten(theta))
