"""Standardisation of (x, y) for fitting, and the exact map of parameters back.

Fitting on x' = (x − m_x)/s_x and y' = (y − m_y)/s_y keeps Newton steps well
conditioned whatever the units (mcycle's optimum has gate slopes > 1000 per
ms). For gates whose logits are not affine in x (activation gates), x is only
rescaled (m_x = 0), because σ(β_1ᵀx) has no inner intercept to absorb a shift.
The log-likelihood in original units is ll' − n log s_y.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import tiny
from .experts import GaussianExperts
from .gates import Gate
from .model import GaussianMoE

__all__ = ["Scaling"]


@dataclass
class Scaling:
    """Per-problem location/scale of x (B, d) and y (B,)."""

    x_loc: torch.Tensor
    x_scale: torch.Tensor
    y_loc: torch.Tensor
    y_scale: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, center_x: bool) -> "Scaling":
        """x (B, n, d), y (B, n) → scaling; raises ValueError on constant columns."""
        x_scale = x.std(-2)
        y_scale = y.std(-1)
        const = x_scale <= 1e-12 * (x.abs().amax(-2) + tiny(x.dtype))
        if bool(const.any()):
            cols = sorted(set(const.nonzero()[:, -1].tolist()))
            raise ValueError(
                f"x column(s) {cols} are constant; drop them (the model already has an intercept) "
                "or add variation"
            )
        if bool((y_scale <= 1e-12 * (y.abs().amax(-1) + tiny(y.dtype))).any()):
            raise ValueError("y is constant; there is nothing to model — check the response column")
        x_loc = x.mean(-2) if center_x else torch.zeros_like(x_scale)
        return cls(x_loc, x_scale, y.mean(-1), y_scale)

    def expand(self, S: int) -> "Scaling":
        """Repeat each problem's scaling S times (problem-major), for restarts."""
        r = lambda t: t.repeat_interleave(S, 0)  # noqa: E731
        return Scaling(r(self.x_loc), r(self.x_scale), r(self.y_loc), r(self.y_scale))

    def transform(self, x, y=None):
        xs = (x - self.x_loc.unsqueeze(-2)) / self.x_scale.unsqueeze(-2)
        if y is None:
            return xs
        return xs, (y - self.y_loc.unsqueeze(-1)) / self.y_scale.unsqueeze(-1)

    # ------------------------------------------------------------ parameters
    def gate_to_original(self, gate: Gate) -> Gate:
        """Gate fitted on x' → the same function of x (the gate's own map, :meth:`Gate.to_original`)."""
        return gate.to_original(self.x_loc, self.x_scale)

    def gate_to_scaled(self, gate: Gate) -> Gate:
        """Inverse of :meth:`gate_to_original`."""
        return gate.to_scaled(self.x_loc, self.x_scale)

    def experts_to_original(self, experts: GaussianExperts) -> GaussianExperts:
        sy = self.y_scale.unsqueeze(-1)  # [B, 1]
        a = experts.slope * sy.unsqueeze(-1) / self.x_scale.unsqueeze(-2)
        b = sy * (experts.intercept - (experts.slope * (self.x_loc / self.x_scale).unsqueeze(-2)).sum(-1)) + self.y_loc.unsqueeze(-1)
        return GaussianExperts(a, b, experts.variance * sy.square())

    def experts_to_scaled(self, experts: GaussianExperts) -> GaussianExperts:
        sy = self.y_scale.unsqueeze(-1)
        a = experts.slope / sy.unsqueeze(-1) * self.x_scale.unsqueeze(-2)
        b = (experts.intercept - self.y_loc.unsqueeze(-1) + (experts.slope * self.x_loc.unsqueeze(-2)).sum(-1)) / sy
        return GaussianExperts(a, b, experts.variance / sy.square())

    def model_to_original(self, model: GaussianMoE) -> GaussianMoE:
        return GaussianMoE(self.gate_to_original(model.gate), self.experts_to_original(model.experts))

    def model_to_scaled(self, model: GaussianMoE) -> GaussianMoE:
        return GaussianMoE(self.gate_to_scaled(model.gate), self.experts_to_scaled(model.experts))
