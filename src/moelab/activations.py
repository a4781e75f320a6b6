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

__all__ = ["ACTIVATIONS", "resolve_activation", "activation_name", "activation_derivatives", "closed_form_derivatives"]

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


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _tanh3(z):
    # tanh(z) = expm1(2z) / (expm1(2z) + 2): in a compiled pass this costs 0.43x torch.tanh (Sleef's
    # vectorised tanh; measured 19 vs 44 ms for three tanh over 40 x 21,544 float64 samples, one thread)
    # and agrees with it to a few ulp; |z| >= 20 gives +-1 to double precision, so the clamp loses nothing
    t = torch.expm1(2 * z.clamp(-20.0, 20.0))
    s = t / (t + 2)
    s1 = 1 - s * s
    return s, s1, -2 * s * s1


def _sigmoid3(z):
    s = torch.sigmoid(z)
    s1 = s * (1 - s)
    return s, s1, s1 * (1 - 2 * s)


def _gelu3(z):  # exact (erf) GELU, torch's default: z Φ(z)
    cdf = 0.5 * (1 + torch.erf(z * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    return z * cdf, cdf + z * pdf, pdf * (2 - z * z)


def _softplus3(z):  # torch's softplus (beta 1, threshold 20): the identity above it; its autograd gives
    p = torch.sigmoid(z)  # σ' = 1 for z > 20 and σ'' = 0 for z >= 20
    zero = torch.zeros_like(p)
    return F.softplus(z), torch.where(z > 20, torch.ones_like(p), p), torch.where(z >= 20, zero, p * (1 - p))


def _relu3(z):  # derivative 0 at 0, as torch's autograd
    return torch.relu(z), (z > 0).to(z.dtype), torch.zeros_like(z)


def _identity3(z):
    return z, torch.ones_like(z), torch.zeros_like(z)


_CLOSED_FORMS = {"tanh": _tanh3, "sigmoid": _sigmoid3, "gelu": _gelu3, "softplus": _softplus3, "relu": _relu3,
                 "identity": _identity3}


def closed_form_derivatives(name: str) -> Callable:
    """For a named activation: z ↦ (σ(z), σ'(z), σ''(z)) in closed form (elementwise, traceable by torch.compile).

    The derivatives are those torch's autograd gives for :data:`ACTIVATIONS` (relu'(0) = 0; softplus
    above its threshold 20 is the identity: σ' = 1 for z > 20, σ'' = 0 for z ≥ 20). Raises KeyError for other names.
    """
    return _CLOSED_FORMS[name]


def activation_derivatives(activation: Union[str, Activation]) -> Callable:
    """z ↦ (σ(z), σ'(z), σ''(z)) for an activation name or an elementwise callable.

    Named activations use :func:`closed_form_derivatives`; a callable is
    differentiated by forward-mode autograd (``torch.func.jvp``, twice), so it
    must be elementwise and twice differentiable by torch.

    Raises
    ------
    ValueError, TypeError
        As :func:`resolve_activation`.
    """
    if isinstance(activation, str):
        resolve_activation(activation)
        return _CLOSED_FORMS[activation]
    sigma = resolve_activation(activation)

    def derivs(z):
        one = torch.ones_like(z)

        def first(t):
            return torch.func.jvp(sigma, (t,), (one,))

        (s, s1), (_, s2) = first(z), torch.func.jvp(lambda t: first(t)[1], (z,), (one,))
        return s, s1, s2

    return derivs
