"""Sigmoid gate: g_k(x) = sigmoid(β_{1k}ᵀx + β_{0k}), each expert on its own, *not* normalised.

Source: Nguyen, Ho & Rinaldo, "Sigmoid Gating is More Sample Efficient than
Softmax Gating in Mixture of Experts" (NeurIPS 2024, arXiv 2405.13997): the
regression function f(x) = Σ_k sigmoid(β_{1k}ᵀx + β_{0k}) h(x, η_k),
estimated by least squares (:func:`moelab.fit_lse`).

The weights do not sum to 1, so the gate defines no mixture density: it is
usable by the least-squares estimator only (``estimators = ("lse",)``; ``fit_em``
and ``fit_mle`` refuse it). There is no translation invariance either (adding
c to every logit changes every weight), so all K rows are free parameters and
no expert is a reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Gate

__all__ = ["SigmoidGate"]


class SigmoidGate(Gate):
    """Sigmoid gate with weights sigmoid(β_{1k}ᵀx + β_{0k}), one per expert, not normalised.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
        β_1 (every row free).
    intercept : tensor of shape (..., n_experts)
        β_0.

    Raises
    ------
    ValueError
        On mismatched shapes or non-finite values.
    """

    name: ClassVar[str] = "sigmoid"
    description: ClassVar[str] = "sigmoid(b1'x + b0) per expert, not normalised (least squares only: fit_lse)"
    estimators: ClassVar[tuple] = ("lse",)  # no mixture density: fit_em / fit_mle refuse it
    linear_logits: ClassVar[bool] = False  # the EM gate step (softmax IRLS) does not apply

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """β_1ᵀx + β_0: x (..., n, d) → (..., n, K)."""
        return self._linear(x) + self.intercept.unsqueeze(-2)

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        """log sigmoid(l_k(x)), shape (..., n_samples, n_experts); rows do not sum to 1 in weight."""
        return F.logsigmoid(self.logits(x))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(l_k(x)), shape (..., n_samples, n_experts), each in (0, 1)."""
        return torch.sigmoid(self.logits(x))

    def atom_masses(self) -> torch.Tensor:
        """sigmoid(β_0) (..., K): each expert's weight at x = 0 (the Voronoi losses' masses)."""
        return torch.sigmoid(self.intercept)

    def n_free_parameters(self) -> int:
        """K·(d + 1): no reference expert (no translation invariance)."""
        return self.n_experts * (self.n_features + 1)
