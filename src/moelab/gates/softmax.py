"""Softmax and temperature ("dense-to-sparse") gates.

Softmax gate (Jordan & Jacobs 1994; Nguyen, Nguyen & Ho NeurIPS 2023, eq. 1):
    g_k(x) = softmax_k(β_{1k}ᵀx + β_{0k}).

Temperature / dense-to-sparse gate (Nguyen, Akbarian & Ho ICML 2024, eq. 2):
    g_k(x) = softmax_k((β_{1k}ᵀx)/τ + β_{0k}),  τ > 0.

With τ estimated, (β_1, τ) and (cβ_1, cτ) give the same model for every c > 0:
the pair is not identifiable, only β_1/τ is. This is the paper's point, so the
gate keeps τ as a genuine parameter rather than folding it away.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Gate
from .registry import GateOption, boolean, positive_real

__all__ = ["SoftmaxGate", "TemperatureGate"]


class SoftmaxGate(Gate):
    """Softmax gate with logits β_{1k}ᵀx + β_{0k}.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
        β_1; the reference (last) expert's row is zero after fitting.
    intercept : tensor of shape (..., n_experts)
        β_0.

    Raises
    ------
    ValueError
        On mismatched shapes or non-finite values.
    """

    name: ClassVar[str] = "softmax"
    description: ClassVar[str] = "softmax(b1'x + b0)"
    linear_logits: ClassVar[bool] = True
    em_pass: ClassVar[str] = "linear"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """β_1ᵀx + β_0: x (..., n, d) → (..., n, K)."""
        return self._linear(x) + self.intercept.unsqueeze(-2)


class TemperatureGate(Gate):
    """Dense-to-sparse gate with logits (β_{1k}ᵀx)/τ + β_{0k}.

    Source: Nguyen, Akbarian & Ho (ICML 2024), eq. (2).

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
    intercept : tensor of shape (..., n_experts)
    temperature : float or tensor of shape batch_shape
        τ > 0.
    learn_temperature : bool, default False
        If True, τ is an estimable parameter (returned by :meth:`params`);
        otherwise it is fixed.

    Raises
    ------
    ValueError
        If τ ≤ 0 or non-finite, or on shape mismatches.
    """

    name: ClassVar[str] = "temperature"
    description: ClassVar[str] = "softmax(b1'x/tau + b0)"
    options: ClassVar[tuple] = (
        GateOption("temperature", positive_real, 1.0, "fixed temperature tau > 0 (the start when estimated)"),
        GateOption("learn_temperature", boolean, False, "estimate tau", of_estimation=True),
    )
    em_pass: ClassVar[str] = "linear"
    positive_params: ClassVar[tuple] = ("temperature",)
    batched_attrs: ClassVar[tuple] = ("slope", "intercept", "temperature")

    def __init__(self, slope, intercept, temperature=1.0, learn_temperature: bool = False):
        super().__init__(slope, intercept)
        self.temperature = self._check_temperature(temperature)
        self.learn_temperature = bool(learn_temperature)

    #: Logits are linear in θ = (β_1/τ, β_0). With τ estimated, Q depends on (β_1, τ)
    #: only through β_1/τ, so the EM gate step updates β_1/τ by exact Newton/IRLS and
    #: every τ is an equally good maximiser: EM keeps τ at its starting value (the
    #: non-identifiability is visible in the result); :func:`moelab.fit_mle` moves
    #: τ along the ridge by gradient.
    linear_logits: ClassVar[bool] = True

    def params(self):
        p = super().params()
        if self.learn_temperature:
            p["temperature"] = self.temperature
        return p

    def hyperparams(self) -> dict:
        h = {"learn_temperature": self.learn_temperature}
        if not self.learn_temperature:
            h["temperature"] = self.temperature
        return h

    # n_free_parameters: an estimated τ adds no identifiable parameter (the model depends on
    # (β_1, τ) only through β_1/τ), which the base rule finds numerically: BIC/AIC count as softmax.

    def logit_coefficients(self) -> torch.Tensor:
        """θ = [β_1/τ, β_0] (..., K, d+1)."""
        return torch.cat([self.slope / self.temperature[..., None, None], self.intercept.unsqueeze(-1)], -1)

    def with_logit_coefficients(self, theta: torch.Tensor) -> "TemperatureGate":
        """The gate with β_1 = τ·θ[..., :-1], β_0 = θ[..., -1] (τ unchanged)."""
        return self.replace(slope=theta[..., :-1] * self.temperature[..., None, None], intercept=theta[..., -1])

    def absorb_linear_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """A change ``shift`` of β_1ᵀx moves the logits by shift/τ."""
        return shift / self.temperature.unsqueeze(-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(β_1ᵀx)/τ + β_0: x (..., n, d) → (..., n, K)."""
        tau = self.temperature[..., None, None]
        return self._linear(x) / tau + self.intercept.unsqueeze(-2)

    def describe(self) -> str:
        if self.learn_temperature:
            return "temperature (tau estimated)"
        t = self.temperature.flatten()
        return f"temperature (tau={float(t[0]):g} fixed)" if t.numel() else "temperature"
