"""Distances between conditional densities p(y | x), averaged over the x distribution.

    h(p, q)   = E_X [ ( ½ ∫ (√p(y|X) − √q(y|X))² dy )^{1/2} ]      (Hellinger)
    V(p, q)   = E_X [ ½ ∫ |p(y|X) − q(y|X)| dy ]                    (total variation)

These are the density losses of Ho & Nguyen-style MoE analyses (e.g. Nguyen,
Akbarian & Ho, ICML 2024, Theorem 1: E_X[h(p_Ĝ, p_G*)] = Õ(n^{-1/2})). The
expectation over X is an average over the supplied points (a quadrature grid
or a Monte Carlo sample of the x distribution); the y integral is the
trapezoidal rule on a common grid covering every expert's mean ± 10 standard
deviations, with spacing a tenth of the smallest expert standard deviation.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..model import GaussianMoE

__all__ = ["density_distances"]


def density_distances(model: GaussianMoE, truth: GaussianMoE, x, *, max_grid: int = 6000, chunk: int = 16) -> Dict[str, torch.Tensor]:
    """Hellinger and total-variation distance between fitted and true p(y | x), averaged over x.

    Parameters
    ----------
    model : GaussianMoE
        Fitted model, batch shape B.
    truth : GaussianMoE
        True model, batch shape () or B.
    x : tensor of shape (m, n_features)
        Points representing the x distribution (equal weights).
    max_grid : int, default 6000
        Cap on the number of y grid points (the spacing grows if needed).
    chunk : int, default 16
        x points evaluated at a time (memory ~ B · chunk · grid · K).

    Returns
    -------
    dict
        ``hellinger`` and ``tv``, tensors of shape B, in [0, 1].
    """
    dtype = model.dtype
    truth = truth.to(dtype=dtype)
    x = torch.as_tensor(x, dtype=dtype)
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    means = torch.cat([model.expert_means(x).flatten(), truth.expert_means(x).flatten()])
    sds = torch.cat([model.experts.variance.flatten(), truth.experts.variance.flatten()]).sqrt()
    sd_max = float(sds.max())
    lo, hi = float(means.min()) - 10 * sd_max, float(means.max()) + 10 * sd_max
    step = max(float(sds.min()) / 10, (hi - lo) / max_grid)
    G = int((hi - lo) / step) + 2
    y = torch.linspace(lo, hi, G, dtype=dtype)
    w = torch.full((G,), (hi - lo) / (G - 1), dtype=dtype)
    w[0] = w[-1] = w[0] / 2
    hel, tv = [], []
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk]  # [c, d]
        c = xc.shape[0]
        xx = xc.repeat_interleave(G, 0)  # [c*G, d]
        yy = y.repeat(c)  # [c*G]
        lp = model.log_prob(xx, yy).reshape(*model.batch_shape, c, G)
        lq = truth.log_prob(xx, yy).reshape(*truth.batch_shape, c, G)
        p, q = lp.exp(), lq.exp()
        h2 = 0.5 * ((p.sqrt() - q.sqrt()).square() * w).sum(-1)
        hel.append(h2.clamp(0, 1).sqrt())
        tv.append((0.5 * ((p - q).abs() * w).sum(-1)).clamp(0, 1))
    return {"hellinger": torch.cat(hel, -1).mean(-1), "tv": torch.cat(tv, -1).mean(-1)}
