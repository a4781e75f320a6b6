"""Gating functions: maps from x (..., n_samples, n_features) to log gate weights (..., n_samples, n_experts).

==============  ===============================================  =================
name            logits l_k(x)                                    class
==============  ===============================================  =================
softmax         β_{1k}ᵀx + β_{0k}                                 SoftmaxGate
temperature     (β_{1k}ᵀx)/τ + β_{0k}, τ fixed or estimated       TemperatureGate
activation      σ(β_{1k}ᵀx)/τ + β_{0k}                            ActivationGate
topk            softmax over the top_k largest linear logits      TopKGate
==============  ===============================================  =================

Which parameters a gate identifies (translation of the slopes, (β_1, τ)
scaling) is decided numerically from the gate itself:
:func:`~moelab.gates.identifiability.gate_invariances`.
"""

from __future__ import annotations

import torch

from .activation import ActivationGate
from .base import Gate
from .identifiability import GateInvariances, IdentifiabilityWarning, gate_invariances, temperature_identified
from .softmax import SoftmaxGate, TemperatureGate
from .topk import TopKGate

__all__ = ["Gate", "SoftmaxGate", "TemperatureGate", "ActivationGate", "TopKGate", "GATES", "make_gate",
           "GateInvariances", "IdentifiabilityWarning", "gate_invariances", "temperature_identified"]

GATES = {
    "softmax": SoftmaxGate,
    "temperature": TemperatureGate,
    "activation": ActivationGate,
    "topk": TopKGate,
}


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
    name : {"softmax", "temperature", "activation", "topk"}
    n_experts, n_features : int
    batch_shape : tuple of int
        Leading batch dimensions of the parameters.
    **options
        Hyper-parameters of the family: ``temperature``, ``learn_temperature``
        (temperature, activation), ``activation`` (activation), ``top_k`` (topk).

    Raises
    ------
    ValueError
        Unknown gate name, or an option the family does not take.
    """
    if name not in GATES:
        raise ValueError(f"unknown gate {name!r}; choose one of {', '.join(GATES)}")
    allowed = {
        "softmax": set(),
        "temperature": {"temperature", "learn_temperature"},
        "activation": {"temperature", "learn_temperature", "activation"},
        "topk": {"top_k"},
    }[name]
    extra = set(k for k, v in options.items() if v is not None) - allowed
    if extra:
        raise ValueError(
            f"gate {name!r} does not take option(s) {sorted(extra)}; it takes {sorted(allowed) or 'no options'}"
        )
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    shape = tuple(batch_shape)
    slope = torch.zeros(*shape, n_experts, n_features, dtype=dtype, device=device)
    intercept = torch.zeros(*shape, n_experts, dtype=dtype, device=device)
    opts = {k: v for k, v in options.items() if v is not None}
    if name == "topk" and "top_k" not in opts:
        raise ValueError("gate 'topk' needs top_k (the number of experts kept per input)")
    return GATES[name](slope, intercept, **opts)
