"""SQUAREM acceleration of EM, batched over problems, never decreasing the log-likelihood.

EM for mixtures of experts converges linearly, and sub-linearly in over-specified
fits (a true expert shared by two fitted ones), so thousands of iterations are
common at a tight ``tol``. SQUAREM (Varadhan & Roland, "Simple and globally
convergent methods for accelerating the convergence of any EM algorithm",
Scand. J. Statist. 35, 2008, scheme S3 with the step-length rule of their R
package SQUAREM) extrapolates from two EM steps: with θ₁ = M(θ₀), θ₂ = M(θ₁),
r = θ₁ − θ₀ and v = θ₂ − 2θ₁ + θ₀,

    θ' = θ₀ + 2α r + α² v,    α = clamp(‖r‖ / ‖v‖, 1, step_max)

(α = 1 gives θ' = θ₂, the plain EM path: θ₂ itself is then evaluated, and kept). Here one cycle is three EM
iterations of :func:`moelab.em._run_em`: the passes at θ₀ and θ₁ are plain EM,
and the third pass evaluates θ' instead of θ₂. θ' is kept only where its
observed log-likelihood is finite and exceeds ℓ(θ₁) by at least the last plain
step's gain ℓ(θ₁) − ℓ(θ₀) (what the plain step θ₂ would at most gain under
EM's usual slowing convergence, so an extrapolation never replaces a better
plain step or stalls the stopping rule); elsewhere the problem takes the plain
step θ₂ (its pass redone on those problems only, with the usual gate-step
check), so the log-likelihood never decreases. ``step_max``
starts at 1 and is multiplied by 4 after an accepted step that used it, divided
by 4 (not below 1) after a rejected one (the package's ``step.max0 = 1,
mstep = 4``). The M-step from the accepted point is the scheme's stabilising
EM step.

The vector θ holds the estimable gate parameters of :meth:`Gate.params` except
the positive ones (τ keeps the plain step's value: extrapolated on the log scale it
could jump by orders of magnitude, e.g. τ 0.48 → 0.004 for a sigmoid activation
gate, where the damped gate step then barely moves and EM stopped at a
non-stationary point 95 below plain EM's optimum), the experts' coefficients and
the log variances (the variance floor applied after extrapolation). Gate
families with constraints the vector cannot express (the Gaussian gate's mixing
weights and covariances; top-K's routing, which EM keeps from the start)
declare ``em_extrapolation = False`` and run plain EM.
"""

from __future__ import annotations

import torch

from .fitcore import State

__all__ = ["ACCELERATIONS", "STEP_MAX0", "MSTEP", "supported", "flatten", "unflatten", "extrapolate", "Squarem"]

#: the values of ``fit_em(accelerate=...)``: SQUAREM, or plain EM (None)
ACCELERATIONS = ("squarem", None)
#: initial upper bound of the step length α
STEP_MAX0 = 1.0
#: factor by which the bound grows after an accepted step at the bound (and shrinks after a rejected one)
MSTEP = 4.0


def supported(gate) -> bool:
    """Whether EM for this gate's family may be extrapolated (``Gate.em_extrapolation``)."""
    return bool(getattr(gate, "em_extrapolation", False))


def flatten(st: State) -> torch.Tensor:
    """Parameters of R problems → θ (R, P): the gate's estimable parameters except its positive ones (τ: see
    the module doc), expert coefficients, log variances."""
    R = st.var.shape[0]
    parts = []
    for name, t in st.gate.params().items():
        if name in st.gate.positive_params:
            continue
        parts.append(t.reshape(R, -1))
    parts += [st.theta.reshape(R, -1), st.var.log()]
    return torch.cat(parts, -1)


def unflatten(like: State, v: torch.Tensor, var_floor: float) -> State:
    """θ (R, P) → State shaped as ``like``, its positive gate parameters kept (variances floored at ``var_floor``)."""
    out, i = {}, 0
    for name, t in like.gate.params().items():
        if name in like.gate.positive_params:
            continue
        m = t[0].numel()
        out[name] = v[:, i : i + m].reshape(t.shape)
        i += m
    m = like.theta[0].numel()
    theta = v[:, i : i + m].reshape(like.theta.shape)
    var = v[:, i + m :].reshape(like.var.shape).exp().clamp_min(var_floor)
    return State(like.gate.replace(**out), theta, var)


def extrapolate(v0, v1, v2, step_max):
    """The S3 point θ' (R, P) and its step lengths α (R,) from θ₀, θ₁ = M(θ₀), θ₂ = M(θ₁), each (R, P).

    α = ‖r‖/‖v‖ clamped to [1, step_max] (step_max (R,)); where v = 0 (EM at a fixed point) α = 1, θ' = θ₂.
    """
    r = v1 - v0
    w = v2 - 2 * v1 + v0
    nr, nw = r.norm(dim=-1), w.norm(dim=-1)
    alpha = torch.where(nw > 0, nr / nw.clamp_min(torch.finfo(v0.dtype).tiny), torch.ones_like(nr))
    alpha = torch.minimum(alpha.nan_to_num(1.0).clamp_min(1.0), step_max)
    a = alpha.unsqueeze(-1)
    return v0 + 2 * a * r + a * a * w, alpha


class Squarem:
    """The cycle state of R problems iterating together (see the module doc).

    Per pass the EM loop asks :meth:`candidate` which parameters to evaluate, then reports the
    checked parameters and log-likelihoods to :meth:`record`; :meth:`keep` drops problems that
    leave the batch. ``accepted`` / ``tried`` count extrapolations kept / attempted.
    """

    def __init__(self, R: int, var_floor: float, dtype, device):
        self.var_floor = var_floor
        self.step_max = torch.full((R,), STEP_MAX0, dtype=dtype, device=device)
        self.phase = 0
        self.v0 = self.v1 = self.ll0 = self.ll1 = self.alpha = self.same = None
        self.accepted = self.tried = 0

    @property
    def extrapolates_next(self) -> bool:
        """Whether the next pass is a cycle's third: θ' from θ₀, θ₁ and the state the coming M-step returns (θ₂)."""
        return self.phase == 2

    @property
    def ll_min(self):
        """(r,) the log-likelihood an extrapolated point must reach: ℓ(θ₁) + max(ℓ(θ₁) − ℓ(θ₀), 0)."""
        return self.ll1 + (self.ll1 - self.ll0).clamp_min(0).nan_to_num(0.0)

    def candidate(self, st: State):
        """(point to evaluate, plain EM point or None): in the third pass of a cycle θ' and θ₂ = ``st``.

        Where the step length α is 1, θ' is θ₂ (up to the rounding of the extrapolation formula), and
        θ₂ itself is evaluated: ``same`` (r,) bool marks those problems, whose pass is then never redone
        (half the cycles of the headline cell, each a second pass at θ₂ before)."""
        if self.phase != 2:
            self.same = None
            return st, None
        ext, self.alpha = extrapolate(self.v0, self.v1, flatten(st), self.step_max)
        self.same = self.alpha <= 1
        if bool(self.same.all()):
            return st, st
        point = unflatten(st, ext, self.var_floor)
        if bool(self.same.any()):
            idx = self.same.nonzero().squeeze(-1)
            point = point.put(idx, st.take(idx))
        return point, st

    def record(self, st: State, ll: torch.Tensor, accepted=None):
        """The checked parameters and log-likelihood of this pass (``accepted`` (R,) bool in the third)."""
        if self.phase == 0:
            self.v0, self.ll0 = flatten(st), ll
        elif self.phase == 1:
            self.v1, self.ll1 = flatten(st), ll
        else:
            at_max = self.alpha >= self.step_max
            self.step_max = torch.where(at_max & accepted, self.step_max * MSTEP,
                                        torch.where(at_max & ~accepted, (self.step_max / MSTEP).clamp_min(STEP_MAX0),
                                                    self.step_max))
            tried = self.alpha > 1
            self.tried += int(tried.sum())
            self.accepted += int((tried & accepted).sum())
            self.v0 = self.v1 = self.ll0 = self.ll1 = self.alpha = None
        self.phase = (self.phase + 1) % 3

    def keep(self, mask):
        """Problems ``mask`` (bool over the current ones) go on iterating."""
        self.step_max = self.step_max[mask]
        self.v0 = None if self.v0 is None else self.v0[mask]
        self.v1 = None if self.v1 is None else self.v1[mask]
        self.ll0 = None if self.ll0 is None else self.ll0[mask]
        self.ll1 = None if self.ll1 is None else self.ll1[mask]
