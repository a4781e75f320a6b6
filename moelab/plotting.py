"""Plots of a fitted Gaussian mixture of experts.

Uses matplotlib's object-oriented API only (no pyplot, no global backend
change), so importing or calling it has no side effects on the caller's
matplotlib state.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["plot_fit"]


def _grid(x: np.ndarray, column: int, n_points: int) -> np.ndarray:
    """Rows varying ``column`` over its observed range, other columns at their means: (n_points, d)."""
    lo, hi = x[:, column].min(), x[:, column].max()
    grid = np.repeat(x.mean(0, keepdims=True), n_points, 0)
    grid[:, column] = np.linspace(lo, hi, n_points)
    return grid


def plot_fit(
    model,
    x,
    y,
    *,
    column: int = 0,
    feature_names: Optional[Sequence[str]] = None,
    response_name: str = "y",
    title: Optional[str] = None,
    n_points: int = 400,
) -> Figure:
    """Data, expert regression lines, mixture mean and gate weights against one input column.

    Upper panel: the data (coloured by the most probable expert a posteriori),
    each expert's mean a_kᵀx + b_k (drawn solid where its gate weight is at
    least 0.5, dashed elsewhere) and the mixture mean E[y | x]. Lower panel:
    the gate weights g_k(x). Other input columns are held at their means.

    Parameters
    ----------
    model : GaussianMoE
        Fitted model with batch shape () (e.g. ``MixtureOfExpertsRegressor.model_``).
    x : array-like of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    column : int, default 0
        Input column on the horizontal axis.
    feature_names : sequence of str, optional
        Names of the input columns (axis labels); default ``x0, x1, ...``.
    response_name : str, default "y"
    title : str, optional
    n_points : int, default 400
        Grid points for the curves.

    Returns
    -------
    matplotlib.figure.Figure
        Save with ``fig.savefig(path)``.

    Raises
    ------
    ValueError
        If ``column`` is out of range or the model is batched.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    d = x.shape[1]
    if len(model.batch_shape):
        raise ValueError(f"plot_fit needs a single model (batch shape ()), got batch shape {tuple(model.batch_shape)}")
    if not 0 <= column < d:
        raise ValueError(f"column={column} is out of range for {d} input column(s)")
    names = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(d)]
    K = model.n_experts
    grid = _grid(x, column, n_points)
    with torch.no_grad():
        gt = torch.tensor(grid)
        weights = model.gate_weights(gt).numpy()  # [G, K]
        means = model.expert_means(gt).numpy()  # [G, K]
        mix = model.mean(gt).numpy()  # [G]
        label = model.responsibilities(torch.tensor(x), torch.tensor(y)).numpy().argmax(-1)
    sd = model.experts.variance.sqrt().numpy()
    colors = [f"C{k % 10}" for k in range(K)]
    gx = grid[:, column]

    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    for k in range(K):
        pts = label == k
        top.scatter(x[pts, column], y[pts], s=14, color=colors[k], alpha=0.75, edgecolors="none")
        top.plot(gx, means[:, k], color=colors[k], lw=1, ls="--", alpha=0.6)
        strong = np.where(weights[:, k] >= 0.5, means[:, k], np.nan)
        top.plot(gx, strong, color=colors[k], lw=2.2, label=f"expert {k + 1} (σ = {sd[k]:.3g})")
        bottom.plot(gx, weights[:, k], color=colors[k], lw=2)
    top.plot(gx, mix, color="black", lw=1.5, label="mixture mean E[y | x]")
    pad = 0.08 * (y.max() - y.min())
    top.set_ylim(y.min() - pad, y.max() + pad)
    top.set_ylabel(response_name)
    top.legend(loc="best", fontsize=8, frameon=False)
    others = [n for j, n in enumerate(names) if j != column]
    note = f" ({', '.join(others)} held at {'its mean' if len(others) == 1 else 'their means'})" if others else ""
    top.set_title(title or f"{response_name} ~ {names[column]}: {K}-expert mixture{note}", fontsize=10)
    bottom.set_ylim(-0.03, 1.03)
    bottom.set_ylabel("gate weight $g_k(x)$")
    bottom.set_xlabel(names[column] + note)
    return fig
