"""Gating functions: maps from x (..., n_samples, n_features) to log gate weights (..., n_samples, n_experts).

==============  ===============================================  =================
name            logits l_k(x)                                    class
==============  ===============================================  =================
softmax         β_{1k}ᵀx + β_{0k}                                 SoftmaxGate
temperature     (β_{1k}ᵀx)/τ + β_{0k}, τ fixed or estimated       TemperatureGate
activation      σ(β_{1k}ᵀx)/τ + β_{0k}                            ActivationGate
topk            softmax over the top_k largest linear logits      TopKGate
sigmoid         sigmoid(β_{1k}ᵀx + β_{0k}), not normalised         SigmoidGate
gaussian        log π_k + log N(x; c_k, Γ_k) (models x too)       GaussianGate
==============  ===============================================  =================

Which parameters a gate identifies (translation of the slopes, (β_1, τ)
scaling, routing only: top-1) is decided numerically from the gate itself:
:func:`~moelab.gates.identifiability.gate_invariances`, :func:`~moelab.gates.identifiability.routing_only`.
"""

from __future__ import annotations

import torch

from .activation import ActivationGate
from .base import Gate
from .gaussian import GaussianGate
from .identifiability import GateInvariances, IdentifiabilityWarning, gate_invariances, routing_only, temperature_identified
from .registry import (GATES, GateOption, GateSpec, families_taking, gate_family, gate_spec, register_gate,
                       unregister_gate)
from .sigmoid import SigmoidGate
from .softmax import SoftmaxGate, TemperatureGate
from .topk import TopKGate

__all__ = ["Gate", "SoftmaxGate", "TemperatureGate", "ActivationGate", "TopKGate", "SigmoidGate", "GaussianGate",
           "GATES", "make_gate",
           "GateOption", "GateSpec", "gate_spec", "gate_family", "register_gate", "unregister_gate", "families_taking",
           "GateInvariances", "IdentifiabilityWarning", "gate_invariances", "routing_only", "temperature_identified"]

for _cls in (SoftmaxGate, TemperatureGate, ActivationGate, TopKGate, SigmoidGate, GaussianGate):
    register_gate(_cls)
del _cls


def make_gate(
    name: str,
    n_experts: int,
    n_features: int,
    batch_shape=(),
    *,
    dtype=torch.float64,
    device=None,
    **options,
) -> Gate:
    """Build a gate of family ``name`` with all-zero slope and intercept (uniform weights).

    Parameters
    ----------
    name : str
        A registered family (:data:`GATES`): "softmax", "temperature",
        "activation", "topk", "gaussian", or one added with :func:`register_gate`.
    n_experts, n_features : int
    batch_shape : tuple of int
        Leading batch dimensions of the parameters.
    **options
        Hyper-parameters of the family, as it declares them (``Gate.options``):
        ``temperature``, ``learn_temperature`` (temperature, activation),
        ``activation`` (activation), ``top_k`` (topk), ``reg_covariance``
        (gaussian). None means "not set".

    Returns
    -------
    Gate
        Parameters of shape batch_shape + (n_experts, n_features) and batch_shape + (n_experts,)
        (the Gaussian gate: π_k = 1/K, c_k = 0, Γ_k = I).

    Raises
    ------
    ValueError
        Unknown gate name, an option the family does not take or outside its
        constraint, a missing required option, n_experts not a positive integer.
    """
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    spec = gate_spec(name, options, n_experts=n_experts)
    return spec.template(n_experts, n_features, batch_shape, dtype=dtype, device=device)
