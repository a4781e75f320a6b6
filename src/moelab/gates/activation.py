"""Activation dense-to-sparse gate.

    g_k(x) = softmax_k(σ(β_{1k}ᵀx)/τ + β_{0k})

Source: Nguyen, Akbarian & Ho (ICML 2024, arXiv 2401.13875), Section 4, eq. (9):
a non-linear σ between the linear gate and the softmax removes the PDE
interaction between β_1 and τ and restores polynomial parameter rates.
σ = identity reduces to :class:`~moelab.gates.TemperatureGate`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..activations import activation_name, resolve_activation
from .base import Gate
from .registry import GateOption, activation_function, boolean, positive_real

__all__ = ["ActivationGate"]


class ActivationGate(Gate):
    """Gate with logits σ(β_{1k}ᵀx)/τ + β_{0k}.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, n_features)
    intercept : tensor of shape (..., n_experts)
    temperature : float or tensor of shape batch_shape, default 1.0
        τ > 0.
    activation : str or callable, default "tanh"
        σ: ``"tanh"``, ``"sigmoid"``, ``"gelu"``, ``"softplus"``, ``"relu"``,
        ``"identity"`` or an elementwise differentiable callable.
    learn_temperature : bool, default False
        Estimate τ as a parameter.

    Notes
    -----
    σ acts on β_{1k}ᵀx without an inner intercept, so centring x changes the
    model: estimators only rescale x for this gate (``affine_invariant`` is
    False).

    Raises
    ------
    ValueError
        Unknown activation, τ ≤ 0, shape mismatch or non-finite values.
    """

    name: ClassVar[str] = "activation"
    description: ClassVar[str] = "softmax(act(b1'x)/tau + b0)"
    options: ClassVar[tuple] = (
        GateOption("temperature", positive_real, 1.0, "fixed temperature tau > 0 (the start when estimated)"),
        GateOption("learn_temperature", boolean, False, "estimate tau", of_estimation=True),
        GateOption("activation", activation_function, "tanh", "the activation act applied to b1'x"),
    )
    affine_invariant: ClassVar[bool] = False
    #: EM's one-pass iteration: Newton on (β_1, β_0, log τ) from σ, σ', σ'' in closed form
    em_pass: ClassVar[str] = "newton"
    positive_params: ClassVar[tuple] = ("temperature",)
    batched_attrs: ClassVar[tuple] = ("slope", "intercept", "temperature")

    def __init__(self, slope, intercept, temperature=1.0, activation="tanh", learn_temperature: bool = False):
        super().__init__(slope, intercept)
        self.activation = activation
        self._sigma = resolve_activation(activation)
        self.temperature = self._check_temperature(temperature)
        self.learn_temperature = bool(learn_temperature)

    def params(self):
        p = super().params()
        if self.learn_temperature:
            p["temperature"] = self.temperature
        return p

    def em_pass_spec(self):
        """``("activation", name, learn_temperature, reference_at_zero)`` for a named σ; None for a
        callable (its derivatives are not in closed form: EM runs the autograd gate step).

        ``reference_at_zero``: the reference expert's slope (fixed in EM) is zero in every problem,
        so its logit is the constant σ(0)/τ + β_{0K} and the pass skips σ there (one of K
        activations per sample)."""
        if isinstance(self.activation, str):
            ref_zero = bool((self.slope[..., -1, :] == 0).all()) if self.slope.numel() else True
            return ("activation", self.activation, self.learn_temperature, ref_zero)
        return None

    def hyperparams(self) -> dict:
        h = {"activation": self.activation, "learn_temperature": self.learn_temperature}
        if not self.learn_temperature:
            h["temperature"] = self.temperature
        return h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """σ(β_1ᵀx)/τ + β_0: x (..., n, d) → (..., n, K)."""
        tau = self.temperature[..., None, None]
        return self._sigma(self._linear(x)) / tau + self.intercept.unsqueeze(-2)

    def describe(self) -> str:
        s = f"activation ({activation_name(self.activation)})"
        if self.learn_temperature:
            return s + ", tau estimated"
        t = self.temperature.flatten()
        return s + (f", tau={float(t[0]):g} fixed" if t.numel() else "")
