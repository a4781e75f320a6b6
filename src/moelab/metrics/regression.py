"""Estimation error of least-squares (regression) mixtures of experts.

For f_G(x) = Σ_k g_k(x) h(x, η_k) (:class:`moelab.RegressionMoE`) with atoms
ω_i = (β_{1i}, a_i, b_i) and masses m_i (normalised exp(β_{0i}) for softmax,
sigmoid(β_{0i}) for the sigmoid gate: the gate's weights at x = 0),

* :func:`lse_loss` — the Voronoi loss of :func:`moelab.metrics.voronoi_loss`
  with :func:`lse_exponents`: exponent 1 on cells holding one fitted atom and
  2 on every parameter group of cells holding more (the loss of the
  least-squares theory for strongly identifiable experts, in moelab's reading
  of Nguyen, Ho & Rinaldo, arXiv 2402.02952: a loss of order n^{-1/2} puts the
  over-specified atoms at n^{-1/4});
* :func:`regression_distance` — ‖f_Ĝ − f_G*‖ in L²(μ), the root mean square
  difference of the regression functions over points of the x distribution
  (the papers' regression-function estimation rate is parametric, Õ(n^{-1/2})).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .voronoi import D1_EXPONENTS, voronoi_loss

__all__ = ["lse_exponents", "lse_loss", "regression_distance"]


def lse_exponents(cell_size: int) -> Dict[str, float]:
    """Exponents of :func:`lse_loss` for a Voronoi cell of ``cell_size`` fitted atoms: 1 if one atom, else 2.

    Raises
    ------
    ValueError
        ``cell_size`` < 1.
    """
    if cell_size < 1:
        raise ValueError(f"cell_size must be >= 1, got {cell_size}")
    return dict(D1_EXPONENTS) if cell_size == 1 else {g: 2.0 for g in D1_EXPONENTS}


def lse_loss(model, truth, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Over-specified Voronoi loss of a least-squares fit (exponents :func:`lse_exponents`): shape B.

    Parameters
    ----------
    model : RegressionMoE
        Fitted model, batch shape B.
    truth : RegressionMoE
        True model, batch shape () or B, same gate family, expert kind and features.
    x : tensor of shape (m, d), optional
        Points of the x distribution (decide the softmax gate's translation invariance).

    Raises
    ------
    ValueError
        Different gate families or feature counts.
    """
    return voronoi_loss(model, truth, lse_exponents, x)


def regression_distance(model, truth, x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_m (f_model(x_m) − f_truth(x_m))²) over the points ``x`` (m, d): shape B.

    Raises
    ------
    ValueError
        ``x`` of the wrong number of features.
    """
    x = torch.as_tensor(x, dtype=model.dtype)
    if x.dim() != 2 or x.shape[-1] != model.n_features:
        raise ValueError(f"x must have shape (m, {model.n_features}), got {tuple(x.shape)}")
    f = model.predict(x.expand(*model.batch_shape, *x.shape))
    f0 = truth.to(dtype=model.dtype).predict(x)
    return (f - f0).square().mean(-1).sqrt()
