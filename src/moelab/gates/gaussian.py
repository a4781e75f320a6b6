"""Gaussian gate: the gate of the Gaussian-gated mixture of experts, a model of (x, y) jointly.

    X | k ~ N(c_k, Γ_k),   P(k) = π_k,   Y | X = x, k ~ N(a_kᵀx + b_k, ν_k),

so the gate is the posterior of the label given x,

    g_k(x) = π_k N(x; c_k, Γ_k) / Σ_j π_j N(x; c_j, Γ_j),

and the model's likelihood is the joint one, p(x, y) = Σ_k π_k N(x; c_k, Γ_k) N(y; a_kᵀx + b_k, ν_k)
= p(x) p(y | x) with p(x) = Σ_k π_k N(x; c_k, Γ_k). Every M-step of EM on the joint likelihood
is in closed form: π_k = N_k / n, c_k and Γ_k the responsibility-weighted mean and covariance of x
(eigenvalues floored at ``reg_covariance``), the experts by weighted least squares.

Sources: Xu, Jordan & Hinton (NIPS 1994), "An alternative model for mixtures of experts"
(the localized/Gaussian gate and its closed-form EM); Deleforge, Forbes & Horaud (2015),
GLLiM, eqs. (28)–(38) (the same model with x and y swapped); Nguyen, Nguyen, Nguyen & Ho,
"Towards convergence rates for parameter estimation in Gaussian-gated mixture of experts"
(AISTATS 2024, arXiv 2305.07572), eq. (1).

Comparing with conditional gates. A softmax-type gate models only p(y | x); its log-likelihood
is Σ_n log p(y_n | x_n). This gate's is Σ_n log p(x_n, y_n) = Σ_n log p(x_n) + Σ_n log p(y_n | x_n).
The conditional part (:meth:`GaussianGate.log_weights` with the experts) is comparable with a
softmax fit's log-likelihood; the joint one is comparable only with a conditional fit plus a
model for x. As a model of y given x the gate is a softmax gate with quadratic logits
log π_k − ½ log|Γ_k| − ½ (x − c_k)ᵀΓ_k⁻¹(x − c_k), which identifies
(K − 1)(1 + d + d(d + 1)/2) parameters (the logits are defined up to a common quadratic);
the joint model has (K − 1) + K d + K d(d + 1)/2.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .._validation import as_tensor, check_finite
from .base import Gate
from .registry import GateOption, positive_real

__all__ = ["GaussianGate"]

_LOG_2PI = math.log(2.0 * math.pi)


def _tril_count(d: int) -> int:
    return d * (d + 1) // 2


class GaussianGate(Gate):
    """Gaussian gate g_k(x) ∝ π_k N(x; c_k, Γ_k), the gate of the Gaussian-gated MoE.

    Parameters
    ----------
    proportions : tensor of shape (..., n_experts)
        Mixing proportions π_k > 0 summing to 1 over the experts (named so
        because ``weights(x)`` is every gate's map x → g(x)).
    means : tensor of shape (..., n_experts, n_features)
        Gate means c_k (where expert k's inputs lie), in units of x.
    covariances : tensor of shape (..., n_experts, n_features, n_features)
        Gate covariances Γ_k, symmetric positive definite, in squared units of x.
    reg_covariance : float, default 1e-6
        A setting of EM, not of the model: the M-step floors the eigenvalues
        of every Γ_k at ``reg_covariance`` (in the standardised units the
        estimators fit in, i.e. a fraction of var(x)); the floored Γ_k is the
        exact maximiser of the expected complete log-likelihood over
        {Γ : Γ ⪰ floor·I}, so EM stays monotone.

    Raises
    ------
    ValueError
        Mismatched shapes, non-finite values, weights that are not positive
        or do not sum to 1, covariances that are not symmetric positive definite.

    Notes
    -----
    ``models_x`` is True: fits report the joint log-likelihood log p(x, y)
    and count the x-model parameters in BIC/AIC (:meth:`n_free_parameters`);
    :meth:`log_marginal` gives log p(x). See the module docstring for what
    is comparable with conditional (softmax-type) gates.
    """

    name: ClassVar[str] = "gaussian"
    description: ClassVar[str] = "pi_k N(x; c_k, Gamma_k) / sum_j pi_j N(x; c_j, Gamma_j), a model of (x, y)"
    #: the mixing weights lie on a simplex and the covariances are positive definite: plain EM
    em_extrapolation: ClassVar[bool] = False
    options: ClassVar[tuple] = (
        GateOption("reg_covariance", positive_real, 1e-6,
                   "EM floor of the eigenvalues of each gate covariance, as a fraction of var(x)", of_estimation=True),
    )
    models_x: ClassVar[bool] = True
    estimators: ClassVar[tuple] = ("em",)
    batched_attrs: ClassVar[tuple] = ("proportions", "means", "covariances")

    def __init__(self, proportions, means, covariances, reg_covariance: float = 1e-6):
        means = as_tensor(means, "gate means")
        if means.dim() < 2:
            raise ValueError(f"gate means must have shape (..., n_experts, n_features), got {tuple(means.shape)}")
        weights = as_tensor(proportions, "gate proportions", dtype=means.dtype, device=means.device)
        covariances = as_tensor(covariances, "gate covariances", dtype=means.dtype, device=means.device)
        K, d = means.shape[-2:]
        batch = means.shape[:-2]
        if tuple(weights.shape) != tuple(batch) + (K,):
            raise ValueError(f"gate proportions must have shape {tuple(batch) + (K,)} (one per expert), got {tuple(weights.shape)}")
        if tuple(covariances.shape) != tuple(batch) + (K, d, d):
            raise ValueError(f"gate covariances must have shape {tuple(batch) + (K, d, d)} (one d x d matrix per expert), "
                             f"got {tuple(covariances.shape)}")
        for t, nm in ((weights, "gate proportions"), (means, "gate means"), (covariances, "gate covariances")):
            check_finite(t, nm)
        if bool((weights <= 0).any()):
            raise ValueError(f"gate proportions must be > 0, got min {float(weights.min()):g}; every expert needs a positive mixing weight")
        total = weights.sum(-1)
        if bool(((total - 1).abs() > 1e-6).any()):
            raise ValueError(f"gate proportions must sum to 1 over the experts, got sums in [{float(total.min()):g}, "
                             f"{float(total.max()):g}]; divide them by their sum")
        if not torch.allclose(covariances, covariances.transpose(-1, -2), rtol=1e-8, atol=1e-12):
            raise ValueError("gate covariances must be symmetric; pass (Γ + Γᵀ)/2")
        _, info = torch.linalg.cholesky_ex(covariances)
        if bool((info > 0).any()):
            bad = sorted(set((info > 0).nonzero()[:, -1].tolist()))
            raise ValueError(f"gate covariance(s) of expert(s) {bad} are not positive definite; every Γ_k needs "
                             "positive eigenvalues")
        self.proportions = weights  # [..., K]
        self.means = means  # [..., K, d]
        self.covariances = covariances  # [..., K, d, d]
        self.reg_covariance = positive_real.check(reg_covariance, "reg_covariance")

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, n_experts: int, n_features: int, batch_shape=(), *, dtype=torch.float64, device=None, **options):
        """π_k = 1/K, c_k = 0, Γ_k = I: equal weights everywhere (the template the estimators start from)."""
        shape = tuple(batch_shape)
        w = torch.full((*shape, n_experts), 1.0 / n_experts, dtype=dtype, device=device)
        c = torch.zeros(*shape, n_experts, n_features, dtype=dtype, device=device)
        g = torch.eye(n_features, dtype=dtype, device=device).expand(*shape, n_experts, n_features, n_features).clone()
        return cls(w, c, g, **options)

    # ------------------------------------------------------------------ shapes
    @property
    def n_experts(self) -> int:
        return self.means.shape[-2]

    @property
    def n_features(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    # ------------------------------------------------------------------ parameters
    def params(self):
        """π (..., K), c (..., K, d), Γ (..., K, d, d)."""
        return {"proportions": self.proportions, "means": self.means, "covariances": self.covariances}

    def hyperparams(self) -> dict:
        return {"reg_covariance": self.reg_covariance}

    def n_free_parameters(self) -> int:
        """Free parameters of the joint model's gate part: (K − 1) + K d + K d(d + 1)/2 (x-model included)."""
        K, d = self.n_experts, self.n_features
        return (K - 1) + K * d + K * _tril_count(d)

    def n_conditional_parameters(self) -> int:
        """Gate parameters identified by p(y | x) alone: (K − 1)(1 + d + d(d + 1)/2).

        The gate's logits are quadratic in x and defined up to a common quadratic
        (the softmax's invariance), so one expert's quadratic is a reference.
        """
        K, d = self.n_experts, self.n_features
        return (K - 1) * (1 + d + _tril_count(d))

    def logit_coefficients(self):  # pragma: no cover - not a linear-logit gate
        raise NotImplementedError("the Gaussian gate's logits are quadratic in x")

    # ------------------------------------------------------------------ units
    def to_original(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "GaussianGate":
        """The gate fitted on x' = (x − x_loc)/x_scale as the same function of x: c = s c' + m, Γ = S Γ' S."""
        s = x_scale.unsqueeze(-2)  # [..., 1, d]
        cov = self.covariances * s.unsqueeze(-1) * s.unsqueeze(-2)
        return self.replace(means=self.means * s + x_loc.unsqueeze(-2), covariances=cov)

    def to_scaled(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "GaussianGate":
        """Inverse of :meth:`to_original`."""
        s = x_scale.unsqueeze(-2)
        cov = self.covariances / (s.unsqueeze(-1) * s.unsqueeze(-2))
        return self.replace(means=(self.means - x_loc.unsqueeze(-2)) / s, covariances=cov)

    # ------------------------------------------------------------------ the map
    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x_n; c_k, Γ_k) for every sample and expert: x (..., n, d) → (..., n, K)."""
        return self.logits_kn(x, with_proportions=False).transpose(-1, -2)

    def logits_kn(self, x: torch.Tensor, with_proportions: bool = True) -> torch.Tensor:
        """log π_k + log N(x_n; c_k, Γ_k) in the experts-first layout of EM: x (..., n, d) → (..., K, n).

        ``with_proportions=False`` leaves out log π_k.
        """
        if x.shape[-1] != self.n_features:
            raise ValueError(f"x has {x.shape[-1]} features but the gate was built for {self.n_features}")
        d = self.n_features
        if d == 1:  # scalar fast path (no Cholesky)
            v = self.covariances[..., 0].expand(*self.covariances.shape[:-2], 1)  # [..., K, 1]
            z = x.transpose(-1, -2) - self.means  # [..., K, n]
            out = z.square_().div_(v).add_(_LOG_2PI + v.log()).mul_(-0.5)
        else:
            L = torch.linalg.cholesky(self.covariances)  # [..., K, d, d]
            diff = x.unsqueeze(-3) - self.means.unsqueeze(-2)  # [..., K, n, d]
            sol = torch.linalg.solve_triangular(L, diff.transpose(-1, -2), upper=False)  # [..., K, d, n]
            logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [..., K]
            out = sol.square().sum(-2).add_((d * _LOG_2PI + logdet).unsqueeze(-1)).mul_(-0.5)  # [..., K, n]
        if with_proportions:
            out = out + self.proportions.log().unsqueeze(-1)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(x; c_k, Γ_k): x (..., n, d) → (..., n, K); log_softmax of it is log g(x)."""
        return self.logits_kn(x).transpose(-1, -2)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n) = log Σ_k π_k N(x_n; c_k, Γ_k): x (..., n, d) → (..., n)."""
        return torch.logsumexp(self.logits_kn(x), -2)

    def sample_x(self, n: int, generator=None):
        """Draw n inputs from p(x) (batch shape ()): x (n, d) and the labels (n,) (int64)."""
        if len(self.batch_shape):
            raise ValueError(f"sample_x needs a gate of batch shape (), got {tuple(self.batch_shape)}; index one problem first")
        labels = torch.multinomial(self.proportions, n, replacement=True, generator=generator)
        z = torch.randn(n, self.n_features, generator=generator, dtype=self.dtype, device=self.means.device)
        L = torch.linalg.cholesky(self.covariances)[labels]  # [n, d, d]
        return self.means[labels] + (L @ z.unsqueeze(-1)).squeeze(-1), labels

    # ------------------------------------------------------------------ EM
    def m_step(self, x: torch.Tensor, resp: torch.Tensor) -> "GaussianGate":
        """Closed-form M-step of the gate part of Q = Σ_n Σ_k r_nk [log π_k + log N(x_n; c_k, Γ_k)].

        π_k = N_k/n, c_k = Σ_n r_nk x_n / N_k, Γ_k = Σ_n r_nk (x_n − c_k)(x_n − c_k)ᵀ / N_k with its
        eigenvalues floored at ``reg_covariance`` (the exact maximiser over Γ ⪰ floor·I), N_k = Σ_n r_nk.
        Experts with N_k ≈ 0 keep their parameters (π_k at a tiny positive value).

        Parameters
        ----------
        x : tensor of shape (R, n, d)
        resp : tensor of shape (R, K, n)
            Responsibilities (experts-first layout of :mod:`moelab.mstep`).

        Returns
        -------
        GaussianGate
            Batch shape (R,).

        Source: Xu, Jordan & Hinton (1994); GLLiM (Deleforge et al. 2015), eqs. (28)–(30).
        """
        n = x.shape[-2]
        tiny = torch.finfo(x.dtype).tiny
        nk = resp.sum(-1)  # [R, K]
        dead = nk < 1e-8 * n
        safe = nk.clamp_min(tiny).unsqueeze(-1)
        means = (resp @ x) / safe  # [R, K, d]
        diff = x.unsqueeze(-3) - means.unsqueeze(-2)  # [R, K, n, d]
        scatter = (resp.unsqueeze(-1) * diff).transpose(-1, -2) @ diff / safe.unsqueeze(-1)  # [R, K, d, d]
        scatter = 0.5 * (scatter + scatter.transpose(-1, -2))
        floor = self.reg_covariance
        if x.shape[-1] == 1:
            cov = scatter.clamp_min(floor)
        else:
            evals, evecs = torch.linalg.eigh(scatter)
            cov = (evecs * evals.clamp_min(floor).unsqueeze(-2)) @ evecs.transpose(-1, -2)
            cov = 0.5 * (cov + cov.transpose(-1, -2))
        weights = (nk / n).clamp_min(tiny)
        if bool(dead.any()):
            means = torch.where(dead[..., None], self.means, means)
            cov = torch.where(dead[..., None, None], self.covariances, cov)
        weights = weights / weights.sum(-1, keepdim=True)
        new = self.replace(proportions=weights, means=means, covariances=cov)
        return new

    def describe(self) -> str:
        return "gaussian"
