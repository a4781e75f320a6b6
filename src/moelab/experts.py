"""Gaussian linear experts f_k(y | x) = N(y; a_kᵀx + b_k, ν_k).

Source: Jordan & Jacobs (1994); the expert model of Nguyen, Nguyen & Ho
(NeurIPS 2023) and Nguyen, Akbarian & Ho (ICML 2024), eq. (1).
"""

from __future__ import annotations

import math

import torch

from ._validation import as_tensor, check_finite, check_positive, check_shape

__all__ = ["GaussianExperts"]

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianExperts:
    """K Gaussian experts with linear means, batched over leading dimensions.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
        a_k.
    intercept : tensor of shape (..., n_experts)
        b_k.
    variance : tensor of shape (..., n_experts)
        ν_k > 0 (a variance, in squared units of y).

    Raises
    ------
    ValueError
        On shape mismatch, non-finite values or a non-positive variance.
    """

    def __init__(self, slope, intercept, variance):
        slope = as_tensor(slope, "expert slope")
        if slope.dim() < 2:
            raise ValueError(
                f"expert slope must have shape (..., n_experts, n_features), got {tuple(slope.shape)}"
            )
        intercept = as_tensor(intercept, "expert intercept", dtype=slope.dtype, device=slope.device)
        variance = as_tensor(variance, "expert variance", dtype=slope.dtype, device=slope.device)
        K = slope.shape[-2]
        check_shape(intercept, "expert intercept", (K,))
        check_shape(variance, "expert variance", (K,))
        for t, nm in ((intercept, "expert intercept"), (variance, "expert variance")):
            if t.shape[:-1] != slope.shape[:-2]:
                raise ValueError(
                    f"{nm} has batch shape {tuple(t.shape[:-1])} but the expert slope has "
                    f"{tuple(slope.shape[:-2])}; they must match"
                )
        for t, nm in ((slope, "expert slope"), (intercept, "expert intercept"), (variance, "expert variance")):
            check_finite(t, nm)
        check_positive(variance, "expert variance", "variances are ν_k = σ_k², pass σ_k² > 0")
        self.slope = slope  # [..., K, d]
        self.intercept = intercept  # [..., K]
        self.variance = variance  # [..., K]

    @property
    def n_experts(self) -> int:
        return self.slope.shape[-2]

    @property
    def n_features(self) -> int:
        return self.slope.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.slope.shape[:-2]

    def params(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "variance": self.variance}

    def replace(self, **params) -> "GaussianExperts":
        """New experts with some of ``slope``, ``intercept``, ``variance`` replaced (validated)."""
        return GaussianExperts(**{**self.params(), **params})

    def map_tensors(self, fn) -> "GaussianExperts":
        """Apply ``fn`` to every parameter tensor (e.g. to select problems or change dtype)."""
        new = object.__new__(GaussianExperts)
        new.slope, new.intercept, new.variance = fn(self.slope), fn(self.intercept), fn(self.variance)
        return new

    def n_free_parameters(self) -> int:
        return self.n_experts * (self.n_features + 2)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Expert means a_kᵀx + b_k: x (..., n, d) → (..., n, K)."""
        if x.shape[-1] != self.n_features:
            raise ValueError(f"x has {x.shape[-1]} features but the experts were built for {self.n_features}")
        return x @ self.slope.transpose(-1, -2) + self.intercept.unsqueeze(-2)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log N(y_n; a_kᵀx_n + b_k, ν_k) for every sample and expert: (..., n, K)."""
        resid = y.unsqueeze(-1) - self.mean(x)
        var = self.variance.unsqueeze(-2)
        return -0.5 * (_LOG_2PI + var.log() + resid.square() / var)

    def __repr__(self) -> str:
        return f"GaussianExperts(n_experts={self.n_experts}, n_features={self.n_features}, batch_shape={tuple(self.batch_shape)})"
