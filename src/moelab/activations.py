"""Activation functions σ used by the activation dense-to-sparse gate.

Shared by the statistical gates (:mod:`moelab.gates`) and the neural routers
(:mod:`moelab.nn`), so both sides mean the same thing by ``"tanh"``.

Source: Nguyen, Akbarian & Ho (ICML 2024, arXiv 2401.13875), Section 4:
gate logits σ(β_1ᵀx)/τ + β_0 with a non-linear σ restore polynomial rates.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "resolve_activation", "activation_name"]

Activation = Callable[[torch.Tensor], torch.Tensor]

def identity(t: torch.Tensor) -> torch.Tensor:
    """σ(t) = t (reduces the activation gate to the temperature gate)."""
    return t


ACTIVATIONS: dict[str, Activation] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "softplus": F.softplus,
    "relu": F.relu,
    "identity": identity,
}


def resolve_activation(activation: Union[str, Activation]) -> Activation:
    """Return the callable for ``activation``.

    Parameters
    ----------
    activation : str or callable
        One of ``"tanh"``, ``"sigmoid"``, ``"gelu"``, ``"softplus"``,
        ``"relu"``, ``"identity"``, or a callable mapping a tensor to a tensor
        of the same shape (elementwise, differentiable).

    Raises
    ------
    ValueError
        If ``activation`` is an unknown name.
    TypeError
        If it is neither a string nor a callable.
    """
    if isinstance(activation, str):
        try:
            return ACTIVATIONS[activation]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of "
                f"{', '.join(sorted(ACTIVATIONS))} or pass a callable"
            ) from None
    if callable(activation):
        return activation
    raise TypeError(
        f"activation must be a name ({', '.join(sorted(ACTIVATIONS))}) or a callable, "
        f"got {type(activation).__name__}"
    )


def activation_name(activation: Union[str, Activation]) -> str:
    """A printable name for ``activation`` (the name itself, or the callable's ``__name__``)."""
    if isinstance(activation, str):
        return activation
    return getattr(activation, "__name__", type(activation).__name__)
