"""The regression mixture of experts f(x) = Σ_k g_k(x) h(x, η_k), estimated by least squares.

Model (Nguyen, Ho & Rinaldo, arXiv 2402.02952 for the softmax gate and
NeurIPS 2024, arXiv 2405.13997 for the sigmoid gate): y = f_G(x) + ε with

    f_G(x) = Σ_k g_k(x) h(x, η_k),

g_k a softmax (normalised) or sigmoid (not normalised) gate of
:mod:`moelab.gates`, and experts h(x, η_k) = σ(a_kᵀφ(x) + b_k) of one kind:

==============  ======================================  =========================
kind            h(x, (a, b))                            features φ(x)
==============  ======================================  =========================
linear          aᵀx + b                                 x
polynomial      b + Σ_{q=1..p} a_qᵀ x^q (x^q elementwise)  [x, x², …, x^p]
relu            max(aᵀx + b, 0)                         x
gelu            (aᵀx + b)·Φ(aᵀx + b) (exact, erf)        x
tanh            tanh(aᵀx + b)                           x
sigmoid         1 / (1 + exp(−(aᵀx + b)))               x
==============  ======================================  =========================

The one-neuron experts have no output weight (the papers' σ(aᵀx + b)).
Polynomial experts are moelab's choice of parameterisation: a polynomial of
degree p in each coordinate without cross terms (for d = 1 every polynomial
of degree p), linear in its coefficients; degree 1 is the linear expert.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Optional

import torch

from ._validation import as_tensor, check_finite, check_shape
from ._gated import GatedModel

__all__ = ["EXPERT_KINDS", "RegressionExperts", "RegressionMoE", "check_expert_kind", "expert_activation", "polynomial_features"]

#: expert kinds of :class:`RegressionExperts` (``fit_lse(expert=...)``)
EXPERT_KINDS = ("linear", "polynomial", "relu", "gelu", "tanh", "sigmoid")

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu(z):
    return torch.nn.functional.gelu(z)


def _gelu_grad(z):
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _relu_grad(z):
    return (z > 0).to(z.dtype)  # subgradient 0 at the kink


def _tanh_grad(z):
    return 1.0 - torch.tanh(z).square()


def _sigmoid_grad(z):
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def _identity(z):
    return z


def _one(z):
    return torch.ones_like(z)


#: kind → (σ, σ') ; read-only
_ACTIVATIONS = MappingProxyType({
    "linear": (_identity, _one),
    "polynomial": (_identity, _one),
    "relu": (torch.relu, _relu_grad),
    "gelu": (_gelu, _gelu_grad),
    "tanh": (torch.tanh, _tanh_grad),
    "sigmoid": (torch.sigmoid, _sigmoid_grad),
})


def expert_activation(kind: str):
    """(σ, σ') of expert kind ``kind`` (σ' of relu is 0 at the kink). ValueError for an unknown kind."""
    check_expert_kind(kind, 2 if kind == "polynomial" else None)
    return _ACTIVATIONS[kind]


def check_expert_kind(kind, degree=None) -> int:
    """Validate an expert kind and its degree; returns the degree (1 for every kind but polynomial).

    Raises
    ------
    ValueError
        Unknown kind; ``degree`` missing or not an integer >= 1 for "polynomial"; a degree other
        than None/1 for another kind.
    """
    if not isinstance(kind, str) or kind not in EXPERT_KINDS:
        raise ValueError(f"unknown expert {kind!r}; choose one of {', '.join(EXPERT_KINDS)}")
    if kind == "polynomial":
        if degree is None:
            raise ValueError("expert='polynomial' needs degree (an integer >= 1, e.g. degree=2; degree=1 is linear)")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        return degree
    if degree not in (None, 1):
        raise ValueError(f"degree applies to expert='polynomial' only (got expert={kind!r}, degree={degree!r}); "
                         "remove degree or use expert='polynomial'")
    return 1


def polynomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """φ(x) = [x, x², …, x^p] (elementwise powers, power-major): x (..., n, d) → (..., n, p·d)."""
    if degree == 1:
        return x
    return torch.cat([x.pow(q) for q in range(1, degree + 1)], -1)


class RegressionExperts:
    """K experts h(x, η_k) = σ(a_kᵀφ(x) + b_k) of one kind, batched over leading dimensions.

    Parameters
    ----------
    slope : tensor of shape (..., n_experts, degree·n_features)
        a_k on the features φ(x) (power-major for polynomial experts: x, then x², …).
    intercept : tensor of shape (..., n_experts)
        b_k.
    kind : str, default "linear"
        One of :data:`EXPERT_KINDS`.
    degree : int, optional
        p ≥ 1 for ``kind="polynomial"`` (required there); no other kind takes one.

    Raises
    ------
    ValueError
        Unknown kind or bad degree; shape mismatch (the slope's last dimension must be a
        multiple of the degree); non-finite values.
    """

    def __init__(self, slope, intercept, kind: str = "linear", degree: Optional[int] = None):
        self.degree = check_expert_kind(kind, degree)
        self.kind = kind
        slope = as_tensor(slope, "expert slope")
        if slope.dim() < 2:
            raise ValueError(f"expert slope must have shape (..., n_experts, degree*n_features), got {tuple(slope.shape)}")
        if slope.shape[-1] % self.degree:
            raise ValueError(f"expert slope has {slope.shape[-1]} columns, not a multiple of degree={self.degree} "
                             "(one block of n_features per power)")
        intercept = as_tensor(intercept, "expert intercept", dtype=slope.dtype, device=slope.device)
        check_shape(intercept, "expert intercept", (slope.shape[-2],))
        if intercept.shape[:-1] != slope.shape[:-2]:
            raise ValueError(f"expert intercept has batch shape {tuple(intercept.shape[:-1])} but the slope has "
                             f"{tuple(slope.shape[:-2])}; they must match")
        check_finite(slope, "expert slope")
        check_finite(intercept, "expert intercept")
        self.slope = slope  # [..., K, p*d]
        self.intercept = intercept  # [..., K]

    @property
    def n_experts(self) -> int:
        return self.slope.shape[-2]

    @property
    def n_features(self) -> int:
        return self.slope.shape[-1] // self.degree

    @property
    def batch_shape(self) -> torch.Size:
        return self.slope.shape[:-2]

    def params(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept}

    def map_tensors(self, fn) -> "RegressionExperts":
        """Apply ``fn`` to the parameter tensors (select problems, change dtype)."""
        new = object.__new__(RegressionExperts)
        new.kind, new.degree = self.kind, self.degree
        new.slope, new.intercept = fn(self.slope), fn(self.intercept)
        return new

    def n_free_parameters(self) -> int:
        return self.n_experts * (self.slope.shape[-1] + 1)

    def activation(self):
        """(σ, σ') of this kind."""
        return _ACTIVATIONS[self.kind]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x): (..., n, d) → (..., n, degree·d)."""
        if x.shape[-1] != self.n_features:
            raise ValueError(f"x has {x.shape[-1]} features but the experts were built for {self.n_features}")
        return polynomial_features(x, self.degree)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """a_kᵀφ(x) + b_k: (..., n, d) → (..., n, K)."""
        return self.features(x) @ self.slope.transpose(-1, -2) + self.intercept.unsqueeze(-2)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """h(x, η_k) for every sample and expert: (..., n, K)."""
        return self.activation()[0](self.pre_activation(x))

    def to_original(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "RegressionExperts":
        """Experts fitted on x' = (x − x_loc)/x_scale as the same functions of x (x_loc, x_scale (..., d))."""
        a, b = _affine_feature_map(self.slope, self.intercept, x_loc, x_scale, self.degree)
        return RegressionExperts(a, b, self.kind, self.degree if self.kind == "polynomial" else None)

    def to_scaled(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "RegressionExperts":
        """Inverse of :meth:`to_original`: x = x'·s + m, i.e. x' = (x − (−m/s))/(1/s)."""
        a, b = _affine_feature_map(self.slope, self.intercept, -x_loc / x_scale, 1.0 / x_scale, self.degree)
        return RegressionExperts(a, b, self.kind, self.degree if self.kind == "polynomial" else None)

    def describe(self) -> str:
        return f"polynomial (degree {self.degree})" if self.kind == "polynomial" else self.kind

    def __repr__(self) -> str:
        return (f"RegressionExperts(kind={self.describe()!r}, n_experts={self.n_experts}, n_features={self.n_features}, "
                f"batch_shape={tuple(self.batch_shape)})")


def _affine_feature_map(a_s, b_s, loc, scale, degree):
    """Coefficients (a, b) on φ(x) of the expert with coefficients (a_s, b_s) on φ(x'), x' = (x − loc)/scale.

    Per coordinate, x'^q = s^−q Σ_{j=0..q} C(q, j) x^j (−m)^{q−j}: a_j = Σ_{q≥j} C(q, j) (−m)^{q−j} s^−q a'_q and
    b = b' + Σ_q (−m)^q s^−q a'_q. a_s (..., K, p·d), b_s (..., K), loc/scale (..., d).
    """
    p = degree
    d = a_s.shape[-1] // p
    A = a_s.reshape(*a_s.shape[:-1], p, d)  # [..., K, q, c]
    m, s = (-loc).unsqueeze(-2), scale.unsqueeze(-2)  # [..., 1, d]
    out = torch.zeros_like(A)
    b = b_s.clone()
    for q in range(1, p + 1):
        aq = A[..., q - 1, :] * s.pow(-q)  # [..., K, d]
        b = b + (aq * m.pow(q)).sum(-1)
        for j in range(1, q + 1):
            out[..., j - 1, :] = out[..., j - 1, :] + math.comb(q, j) * aq * m.pow(q - j)
    return out.reshape(a_s.shape), b


class RegressionMoE(GatedModel):
    """The regression function f(x) = Σ_k g_k(x) h(x, η_k), batched over leading dimensions.

    Parameters
    ----------
    gate : moelab.gates.Gate
        "softmax" (reference expert K−1 at zero after fitting) or "sigmoid" (not normalised).
    experts : RegressionExperts
        Same n_experts, n_features and batch shape.

    Raises
    ------
    TypeError
        Wrong component types.
    ValueError
        Gate and experts disagree on n_experts, n_features or batch shape.
    """

    experts_type = RegressionExperts

    def _x(self, x) -> torch.Tensor:
        x = as_tensor(x, "x", dtype=self.dtype, device=self.experts.slope.device)
        if x.dim() == 1 and self.n_features == 1:
            x = x.unsqueeze(-1)
        if x.dim() < 2:
            raise ValueError(f"x must have shape (..., n_samples, n_features), got {tuple(x.shape)}")
        return x

    def predict(self, x) -> torch.Tensor:
        """f(x) = Σ_k g_k(x) h(x, η_k): x (..., n_samples, n_features) → (..., n_samples)."""
        x = self._x(x)
        return (self.gate.weights(x) * self.experts.outputs(x)).sum(-1)

    def sample(self, x, noise_sd, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """y = f(x) + ε, ε ~ N(0, noise_sd²): shape (..., n_samples).

        Raises
        ------
        ValueError
            ``noise_sd`` negative or not finite.
        """
        if not (math.isfinite(float(noise_sd)) and float(noise_sd) >= 0):
            raise ValueError(f"noise_sd must be a finite number >= 0, got {noise_sd!r}")
        f = self.predict(x)
        eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device) if generator is not None \
            else torch.randn_like(f)
        return f + float(noise_sd) * eps

    def map_tensors(self, fn) -> "RegressionMoE":
        return RegressionMoE(self.gate.map_tensors(fn), self.experts.map_tensors(fn))

    def to(self, dtype=None, device=None) -> "RegressionMoE":
        return self.map_tensors(lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device))

    def describe(self) -> str:
        return f"{self.gate.name} gate, {self.experts.describe()} experts"

    def __repr__(self) -> str:
        return (f"RegressionMoE(gate={self.gate.name!r}, experts={self.experts.describe()!r}, n_experts={self.n_experts}, "
                f"n_features={self.n_features}, batch_shape={tuple(self.batch_shape)})")
