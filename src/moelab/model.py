"""The Gaussian mixture of experts p(y | x) = Σ_k g_k(x) N(y; a_kᵀx + b_k, ν_k).

Source: Jordan & Jacobs (1994); Nguyen, Akbarian & Ho (ICML 2024), eq. (1),
with any gate from :mod:`moelab.gates`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validation import as_tensor, check_xy
from .experts import GaussianExperts
from ._gated import GatedModel

__all__ = ["GaussianMoE"]


class GaussianMoE(GatedModel):
    """Gaussian mixture of experts with any gate, batched over leading dimensions.

    Parameters
    ----------
    gate : moelab.gates.Gate
        Gating network; parameters of shape (..., n_experts, ...).
    experts : GaussianExperts
        Same ``n_experts``, ``n_features`` and batch shape as ``gate``.

    All methods take x of shape (..., n_samples, n_features) and y of shape
    (..., n_samples); leading dimensions broadcast against the batch shape.

    Raises
    ------
    TypeError
        Wrong component types.
    ValueError
        If gate and experts disagree on n_experts, n_features or batch shape.
    """

    experts_type = GaussianExperts

    def _xy(self, x, y=None):
        x = as_tensor(x, "x", dtype=self.dtype)
        if x.dim() == 1 and self.n_features == 1:
            x = x.unsqueeze(-1)
        if y is None:
            if x.dim() < 2:
                raise ValueError(f"x must have shape (..., n_samples, n_features), got {tuple(x.shape)}")
            return x, None
        y = as_tensor(y, "y", dtype=self.dtype)
        check_xy(x, y)
        return x, y

    # -------------------------------------------------------------- densities
    def joint_log_prob(self, x, y) -> torch.Tensor:
        """log g_k(x_n) + log f_k(y_n | x_n): shape (..., n_samples, n_experts)."""
        x, y = self._xy(x, y)
        return self.gate.log_weights(x) + self.experts.log_prob(x, y)

    def log_prob(self, x, y) -> torch.Tensor:
        """log p(y_n | x_n) per sample, shape (..., n_samples), computed with logsumexp."""
        return torch.logsumexp(self.joint_log_prob(x, y), dim=-1)

    def loglik(self, x, y) -> torch.Tensor:
        """Total log-likelihood Σ_n log p(y_n | x_n), shape batch (...)."""
        return self.log_prob(x, y).sum(-1)

    def responsibilities(self, x, y) -> torch.Tensor:
        """Posterior expert probabilities P(k | x_n, y_n), shape (..., n_samples, n_experts)."""
        return torch.softmax(self.joint_log_prob(x, y), dim=-1)

    # ------------------------------------------------------------- predictions
    def gate_weights(self, x) -> torch.Tensor:
        """g(x): shape (..., n_samples, n_experts)."""
        x, _ = self._xy(x)
        return self.gate.weights(x)

    def expert_means(self, x) -> torch.Tensor:
        """a_kᵀx + b_k: shape (..., n_samples, n_experts)."""
        x, _ = self._xy(x)
        return self.experts.mean(x)

    def expert_variances(self) -> torch.Tensor:
        """ν_k: shape (..., n_experts)."""
        return self.experts.variance

    def mean(self, x) -> torch.Tensor:
        """Conditional mean E[y | x] = Σ_k g_k(x)(a_kᵀx + b_k): shape (..., n_samples)."""
        x, _ = self._xy(x)
        return (self.gate.weights(x) * self.experts.mean(x)).sum(-1)

    def variance(self, x) -> torch.Tensor:
        """Conditional variance Var[y | x] = Σ_k g_k(x)(ν_k + (a_kᵀx + b_k − E[y | x])²) (law of total
        variance): shape (..., n_samples).

        Where the direct sum overflows (x far outside the data: an expert with weight
        g_k = exp(−10^200) = 0 but (a_kᵀx + b_k − E[y | x])² = inf, which would give 0·inf = NaN)
        the same sum is evaluated in log space, log g_k + log(ν_k + d_k²) with
        log(ν_k + d_k²) = logaddexp(log ν_k, 2 log|d_k|), so such an expert contributes 0 as
        it should. The result is +inf only where Var[y | x] itself exceeds the dtype's range,
        and NaN only where the gate weights or expert means are (logits or means that overflow).
        """
        x, _ = self._xy(x)
        logw = self.gate.log_weights(x)
        g = logw.exp()
        m = self.experts.mean(x)
        mean = (g * m).sum(-1, keepdim=True)
        nu = self.experts.variance.unsqueeze(-2)
        direct = (g * (nu + (m - mean).square())).sum(-1)
        bad = ~torch.isfinite(direct)
        if bool(bad.any()):
            log_dev = 2 * (m - mean).abs().log()  # finite wherever m and the mean are
            log_var = torch.logsumexp(logw + torch.logaddexp(nu.log().expand_as(log_dev), log_dev), -1)
            direct = torch.where(bad, log_var.exp(), direct)
        return direct

    def sample(self, x, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw y ~ p(y | x) for every row of x: shape (..., n_samples).

        The expert label is drawn from g(x), then y from that expert's Gaussian.
        """
        x, _ = self._xy(x)
        return self.sample_with_labels(x, generator)[0]

    def sample_with_labels(self, x, generator: Optional[torch.Generator] = None):
        """Like :meth:`sample`, also returning the expert labels (..., n_samples) (int64)."""
        x, _ = self._xy(x)
        g = self.gate.weights(x)
        flat = g.reshape(-1, self.n_experts)
        labels = torch.multinomial(flat, 1, generator=generator).reshape(g.shape[:-1])
        m = self.experts.mean(x).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        var = self.experts.variance.unsqueeze(-2).expand(g.shape).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        noise = torch.randn(m.shape, generator=generator, dtype=m.dtype, device=m.device)
        return m + var.sqrt() * noise, labels

    def __getitem__(self, index) -> "GaussianMoE":
        """Select problems along the batch dimensions, e.g. ``model[3]``."""
        if not len(self.batch_shape):
            raise IndexError("this model has no batch dimensions to index")

        def pick(t):
            return t[index]

        return GaussianMoE(self.gate.map_tensors(pick), self.experts.map_tensors(pick))

    def to(self, dtype=None, device=None) -> "GaussianMoE":
        """A copy with every parameter moved to ``dtype``/``device``."""
        fn = lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device)  # noqa: E731
        return GaussianMoE(self.gate.map_tensors(fn), self.experts.map_tensors(fn))

    def __repr__(self) -> str:
        return f"GaussianMoE(gate={self.gate.describe()}, n_experts={self.n_experts}, n_features={self.n_features}, batch_shape={tuple(self.batch_shape)})"
