"""What every gated model shares: a gate and experts that agree, and the sizes read off them.

:class:`moelab.GaussianMoE` (conditional density) and :class:`moelab.RegressionMoE`
(regression function) are both a gating network g(x) over K experts; this base
checks the pair once and names its sizes.
"""

from __future__ import annotations

import torch

from .gates import Gate

__all__ = ["GatedModel"]


class GatedModel:
    """A gate and experts with the same ``n_experts``, ``n_features`` and batch shape.

    Subclasses set ``experts_type`` (the class their experts must be an instance of).

    Raises
    ------
    TypeError
        ``gate`` is not a :class:`moelab.gates.Gate`, or ``experts`` not an ``experts_type``.
    ValueError
        Gate and experts disagree on n_experts, n_features or batch shape.
    """

    experts_type: type = object

    def __init__(self, gate: Gate, experts):
        if not isinstance(gate, Gate):
            raise TypeError(f"gate must be a moelab.gates.Gate, got {type(gate).__name__}")
        if not isinstance(experts, self.experts_type):
            raise TypeError(f"experts must be {self.experts_type.__name__}, got {type(experts).__name__}")
        if gate.n_experts != experts.n_experts:
            raise ValueError(f"gate has {gate.n_experts} experts but experts has {experts.n_experts}")
        if gate.n_features != experts.n_features:
            raise ValueError(f"gate has {gate.n_features} features but experts has {experts.n_features}")
        if gate.batch_shape != experts.batch_shape:
            raise ValueError(f"gate batch shape {tuple(gate.batch_shape)} differs from experts batch shape "
                             f"{tuple(experts.batch_shape)}")
        self.gate = gate
        self.experts = experts

    @property
    def n_experts(self) -> int:
        return self.gate.n_experts

    @property
    def n_features(self) -> int:
        return self.gate.n_features

    @property
    def batch_shape(self) -> torch.Size:
        return self.gate.batch_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.slope.dtype

    def n_free_parameters(self) -> int:
        """Free parameters per problem: the gate's (without the reference expert where the gate
        normalises) plus the experts'."""
        return self.gate.n_free_parameters() + self.experts.n_free_parameters()
