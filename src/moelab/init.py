"""Initial responsibilities for EM restarts (batched over starts).

Every strategy returns responsibilities of shape (S, n, K) for standardised
data x (n, d), y (n,); the estimator turns them into parameters with one
M-step. Different strategies find different basins, so the default start
strategy of :func:`moelab.fit_em` mixes them.
"""

from __future__ import annotations

import torch

__all__ = ["INIT_METHODS", "init_responsibilities"]

from ._validation import tiny

INIT_METHODS = ("kmeans", "random", "segments", "lines")


def _one_hot(labels: torch.Tensor, K: int, dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, K).to(dtype)


def kmeans_responsibilities(z, K, S, generator, n_iter: int = 15):
    """Hard k-means (k-means++ seeding, Lloyd iterations) on the rows of z (n, q), S times."""
    n = z.shape[0]
    dtype = z.dtype
    centers = torch.empty(S, K, z.shape[1], dtype=dtype, device=z.device)
    first = torch.randint(n, (S,), generator=generator, device=z.device)
    centers[:, 0] = z[first]
    d2 = (z.unsqueeze(0) - centers[:, :1]).square().sum(-1)  # [S, n]
    for k in range(1, K):
        probs = d2 / d2.sum(-1, keepdim=True).clamp_min(tiny(d2.dtype))
        probs = torch.where(probs.sum(-1, keepdim=True) > 0, probs, torch.full_like(probs, 1.0 / n))
        idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        centers[:, k] = z[idx]
        d2 = torch.minimum(d2, (z.unsqueeze(0) - centers[:, k : k + 1]).square().sum(-1))
    for _ in range(n_iter):
        dist = torch.cdist(z.unsqueeze(0).expand(S, -1, -1), centers)  # [S, n, K]
        lab = dist.argmin(-1)
        oh = _one_hot(lab, K, dtype)
        cnt = oh.sum(1)  # [S, K]
        new = oh.transpose(1, 2) @ z / cnt.clamp_min(1)[..., None]
        centers = torch.where(cnt[..., None] > 0, new, centers)
    dist = torch.cdist(z.unsqueeze(0).expand(S, -1, -1), centers)
    return _one_hot(dist.argmin(-1), K, dtype)


def random_responsibilities(n, K, S, generator, dtype, device=None):
    """Soft random responsibilities: each row drawn from a flat Dirichlet (as flexmix's random start)."""
    e = -torch.rand(S, n, K, generator=generator, dtype=dtype, device=device).clamp_min(tiny(dtype)).log()
    return e / e.sum(-1, keepdim=True)


def segment_responsibilities(x, K, S, generator):
    """Contiguous segments along a random direction of x: regime-switching starts.

    The rows are sorted by a random projection of x (by x itself when
    n_features = 1) and cut into K segments of random sizes, in random order.
    """
    n, d = x.shape
    dtype = x.dtype
    direction = torch.randn(S, d, generator=generator, dtype=dtype, device=x.device)
    if d == 1:
        direction = direction.abs()
    proj = x @ direction.T  # [n, S]
    order = proj.T.argsort(-1)  # [S, n]
    props = -torch.rand(S, K, generator=generator, dtype=dtype, device=x.device).clamp_min(tiny(dtype)).log()
    props = 0.5 / K + props / props.sum(-1, keepdim=True)  # no segment smaller than ~1/(2K) of the data
    cuts = (props.cumsum(-1) / props.sum(-1, keepdim=True) * n).round().long()  # [S, K]
    ranks = torch.arange(n, device=x.device).expand(S, n)
    seg = (ranks.unsqueeze(-1) >= cuts.unsqueeze(1)).sum(-1).clamp(max=K - 1)  # [S, n] segment of rank
    perm = torch.argsort(torch.rand(S, K, generator=generator, device=x.device), -1)
    seg = perm.gather(1, seg)
    lab = torch.empty_like(seg)
    lab.scatter_(1, order, seg)
    return _one_hot(lab, K, dtype)


def line_responsibilities(x, y, K, S, generator):
    """Random lines: each expert is the least-squares line through a random small subset;
    every row goes to the nearest line (the mixture-of-regressions analogue of k-means++)."""
    n, d = x.shape
    dtype = x.dtype
    m = min(n, d + 2)
    idx = torch.argsort(torch.rand(S, K, n, generator=generator, device=x.device), -1)[..., :m]  # [S, K, m]
    x1 = torch.cat([x, torch.ones(n, 1, dtype=dtype, device=x.device)], -1)
    Xs = x1[idx]  # [S, K, m, p]
    ys = y[idx]  # [S, K, m]
    A = Xs.transpose(-1, -2) @ Xs + 1e-6 * torch.eye(d + 1, dtype=dtype, device=x.device)
    coef = torch.linalg.solve(A, (Xs.transpose(-1, -2) @ ys.unsqueeze(-1))).squeeze(-1)  # [S, K, p]
    resid = (y.unsqueeze(0).unsqueeze(-1) - x1 @ coef.transpose(-1, -2)).abs()  # [S, n, K]
    return _one_hot(resid.argmin(-1), K, dtype)


def init_responsibilities(method, x, y, K, S, generator):
    """Responsibilities (S, n, K) from one strategy in :data:`INIT_METHODS`.

    x (n, d) and y (n,) should be standardised.

    Raises
    ------
    ValueError
        Unknown method.
    """
    if method == "kmeans":
        z = torch.cat([x, y.unsqueeze(-1)], -1)
        return kmeans_responsibilities(z, K, S, generator)
    if method == "random":
        return random_responsibilities(x.shape[0], K, S, generator, x.dtype, x.device)
    if method == "segments":
        return segment_responsibilities(x, K, S, generator)
    if method == "lines":
        return line_responsibilities(x, y, K, S, generator)
    raise ValueError(f"unknown init {method!r}; choose one of {', '.join(INIT_METHODS)}, 'auto', or pass init_model")
