"""Racing the starts of one fit: stop a start early when it cannot end above the best converged start.

``fit_em`` runs many starts per problem in one batch and keeps the best
valid one; starts heading to a worse optimum (or creeping along a flat
direction towards one) need not run to convergence. Once some start of a
problem has *converged* to a valid (non-collapsed) fit with log-likelihood
ℓ*, a still-running start at ℓ_t is stopped when even a generous forecast of
its final log-likelihood stays below ℓ*:

    ℓ_t < ℓ*   and   ℓ_t + M · ĝ_t < ℓ* + ε,

with ĝ_t the Aitken forecast of its remaining gain. EM converges linearly,
Δ_{t+1} ≈ a·Δ_t, so the remaining gain is Σ_{j≥1} a^j Δ_t = Δ_t · a / (1 − a)
(Aitken's δ² extrapolation of the log-likelihood; Böhning, Dietz, Schaub,
Schlattmann & Lindsay 1994, Ann. Inst. Statist. Math. 46, eq. 3; McNicholas
2010 uses it as a stopping rule). The rate a is the *slowest* of the last
:data:`RATE_WINDOW` increment ratios, and a start whose increments do not
shrink (a ≥ 1, e.g. a gate switch still hardening) is never stopped.
M = :data:`SAFETY` = 1000 (the forecast may underestimate the gain a
thousand-fold), ε = the stopping rule's own resolution (tol · n for the mean
rule), and no start is stopped before :data:`MIN_ITER` = 50 iterations. A
stopped start is not selected (ℓ_t < ℓ*), so the returned fit is the best of
the starts that ran to the end, as without racing whenever the forecasts hold.

The forecasts do not always hold, which is why ``fit_em`` races only when
asked (``prune_starts=True``): a start can sit on a plateau (near a saddle)
with shrinking increments for hundreds of iterations and then climb again.
On faithful ``waiting ~ eruptions`` with 4 experts (seed 0) the best start
gains 3.7 log-likelihood units after iteration 170 at increments of ~2·10⁻⁴;
with M = 10 and a 5-iteration window it was stopped there (best −842.41
instead of −841.47); M = 1000, a 20-iteration window and 50 iterations first
keep it, and still stop 148 of 160 starts (28% fewer start-iterations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StartRace", "aitken_gain", "SAFETY", "RATE_WINDOW", "MIN_ITER"]

#: factor by which the forecast gain may be too small
SAFETY = 1000.0
#: increment ratios whose largest is the rate a
RATE_WINDOW = 20
#: iterations every start runs before it may be stopped
MIN_ITER = 50


def aitken_gain(h: torch.Tensor) -> torch.Tensor:
    """Forecast remaining log-likelihood gain Δ_t·a/(1 − a) per start from its latest log-likelihoods.

    h (R, w + 2): the log-likelihood at the last w + 2 iterations, latest last → (R,).
    a is the largest of the w increment ratios Δ_j/Δ_{j−1}; +inf where a ≥ 1 or an
    increment is not finite (no forecast); 0 where the last increment is ≤ 0.
    """
    inc = h.diff(dim=-1)  # [R, window + 1]
    last = inc[:, -1]
    prev, nxt = inc[:, :-1], inc[:, 1:]
    rate = torch.where(prev > 0, nxt / prev, torch.full_like(prev, math.inf)).amax(-1)
    gain = last * rate / (1 - rate)
    gain = torch.where((rate < 1) & (rate >= 0), gain, torch.full_like(gain, math.inf))
    gain = torch.where(torch.isfinite(inc).all(-1), gain, torch.full_like(gain, math.inf))
    return torch.where(last <= 0, torch.zeros_like(gain), gain)


@dataclass
class StartRace:
    """Per-fit racing state for B problems with ``n_keep`` starts each (problem-major, R = B·n_keep).

    ``min_size`` and ``min_sd`` are the collapse thresholds (standardised y).
    """

    n_problems: int
    n_keep: int
    min_size: float
    min_sd: float
    best: torch.Tensor = None  # [B] best valid converged log-likelihood so far (−inf: none yet)
    stopped: int = 0

    def __post_init__(self):
        if self.best is None:
            self.best = torch.full((self.n_problems,), -math.inf, dtype=torch.float64)

    def record(self, active, ll, converged, sizes, var) -> None:
        """Starts ``active`` (r,) just converged where ``converged`` (r,): keep the best valid ℓ per problem."""
        if not bool(converged.any()):
            return
        valid = converged & torch.isfinite(ll) & ~((sizes < self.min_size).any(-1) | (var.sqrt() < self.min_sd).any(-1))
        if not bool(valid.any()):
            return
        prob = (active // self.n_keep)[valid].to(self.best.device)
        self.best = self.best.to(ll.dtype).scatter_reduce(0, prob, ll[valid].to(self.best.device), "amax")

    def stop(self, active, ll, history, it: int, eps) -> torch.Tensor:
        """(r,) bool: running starts ``active`` at log-likelihood ``ll`` to stop now (see the module doc).

        ``history`` (R, T) holds every start's log-likelihood per iteration (column ``it`` the latest);
        ``eps`` (scalar or (r,)) is the stopping rule's resolution in total log-likelihood.
        """
        if it < max(MIN_ITER, RATE_WINDOW + 1) or not bool(torch.isfinite(self.best).any()):
            return torch.zeros_like(ll, dtype=torch.bool)
        ref = self.best.to(ll.device)[active // self.n_keep]
        gain = aitken_gain(history[:, it - RATE_WINDOW - 1 : it + 1][active])
        out = (ll < ref) & (ll + SAFETY * gain < ref + eps)
        self.stopped += int(out.sum())
        return out
