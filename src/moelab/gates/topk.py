"""Top-K sparse softmax gate.

    g_k(x) = softmax over {j : l_j(x) among the top_k largest} of l_j(x),
    and g_k(x) = 0 exactly for every other expert,

with linear logits l_k(x) = β_{1k}ᵀx + β_{0k}. Source: Shazeer et al. (ICLR
2017), eq. (3) without noise; Nguyen, Nguyen & Ho, "Statistical perspective
of top-K sparse softmax gating mixture of experts" (ICLR 2024), eq. (2).

Identifiability: with ``top_k = 1`` the weights are 0 or 1 and do not change
with any parameter except through the routing partition (which expert has
the largest logit at x), so β_1 and the masses exp(β_0) are not identified,
only the partition (every (cβ_1, cβ_0), c > 0, routes x the same way). This is
decided numerically (:func:`moelab.gates.identifiability.routing_only`) and
the Voronoi losses then use routing masses (:mod:`moelab.metrics.voronoi`).
With ``top_k ≥ 2`` the weights inside a routing set are a softmax of the
selected logits and the parameters are identified up to translation.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Gate
from .registry import GateOption, experts_kept

__all__ = ["TopKGate"]


class TopKGate(Gate):
    """Top-K sparse softmax gate on linear logits.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
    intercept : tensor of shape (..., n_experts)
    top_k : int
        Number of experts kept per input, 1 ≤ top_k ≤ n_experts.

    Raises
    ------
    ValueError
        If ``top_k`` is not an integer in [1, n_experts].
    """

    name: ClassVar[str] = "topk"
    description: ClassVar[str] = "softmax over the top_k largest logits b1'x + b0"
    options: ClassVar[tuple] = (
        GateOption("top_k", experts_kept, None, "the number of experts kept per input", required=True),
    )
    sparse_routing: ClassVar[bool] = True
    #: EM keeps each sample's routing set from the start; an extrapolated point could change it
    em_extrapolation: ClassVar[bool] = False
    rate_studies: ClassVar[bool] = True
    #: EM's one-pass iteration: Newton on the linear logits with each sample's routing set kept
    em_pass: ClassVar[str] = "newton"

    def __init__(self, slope, intercept, top_k: int = 1):
        super().__init__(slope, intercept)
        self.top_k = experts_kept.check(top_k, "top_k", self.n_experts)

    @classmethod
    def from_dense(cls, dense: Gate, *, top_k: int) -> "TopKGate":
        """The top-``top_k`` sparsification of a dense softmax gate (same slope and intercept)."""
        return cls(dense.slope, dense.intercept, top_k=top_k)

    def em_pass_spec(self):
        """``("topk", top_k)``."""
        return ("topk", self.top_k)

    def hyperparams(self) -> dict:
        return {"top_k": self.top_k}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Dense logits β_1ᵀx + β_0 before top-K selection: (..., n, K)."""
        return self._linear(x) + self.intercept.unsqueeze(-2)

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        """log g(x) with −inf outside the top_k logits: (..., n, K)."""
        logits = self.logits(x)
        if self.top_k == self.n_experts:
            return torch.log_softmax(logits, dim=-1)
        kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
        masked = logits.masked_fill(logits < kth, float("-inf"))
        return torch.log_softmax(masked, dim=-1)

    def describe(self) -> str:
        return f"top-{self.top_k} softmax"
