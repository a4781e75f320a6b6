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

__all__ = ["plot_fit", "plot_criteria"]


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
    level: float = 0.9,
) -> Figure:
    """Data, expert lines, mixture mean with its prediction band, gate weights and residuals.

    Top panel: the data against one input column (coloured by the most
    probable expert a posteriori), each expert's mean a_kᵀx + b_k (solid
    where its gate weight is at least 0.5, dashed elsewhere), the mixture
    mean E[y | x] and the equal-tailed ``level`` prediction band of the
    mixture (:func:`moelab.prediction.prediction_interval`). Middle panel:
    the gate weights g_k(x). Other input columns are held at their means in
    these two panels. Bottom panel: with one input, the residuals
    y_n − E[y | x_n] against it with the band around the mean; with several
    inputs, observed y_n against predicted E[y | x_n] with each sample's
    interval. Both give the share of samples inside their interval.

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
    level : float, default 0.9
        Probability of the prediction band, 0 < level < 1.

    Returns
    -------
    matplotlib.figure.Figure
        Save with ``fig.savefig(path)``.

    Raises
    ------
    ValueError
        If ``column`` is out of range, ``level`` is outside (0, 1) or the model is batched.
    """
    from .prediction import prediction_interval

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
        fitted = model.mean(torch.tensor(x)).numpy()  # [n]
    band_lo, band_hi = prediction_interval(model, grid, level)  # [G]
    lo, hi = prediction_interval(model, x, level)  # [n]
    inside = float(np.mean((y >= lo) & (y <= hi)))
    sd = model.experts.variance.sqrt().numpy()
    colors = [f"C{k % 10}" for k in range(K)]
    gx = grid[:, column]
    pct = f"{100 * level:g}%"

    fig = Figure(figsize=(7.5, 8.0), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, height_ratios=(3, 1.1, 1.6))
    middle.sharex(top)
    top.fill_between(gx, band_lo, band_hi, color="0.85", lw=0, label=f"{pct} prediction interval (equal-tailed)")
    for k in range(K):
        pts = label == k
        top.scatter(x[pts, column], y[pts], s=14, color=colors[k], alpha=0.75, edgecolors="none")
        top.plot(gx, means[:, k], color=colors[k], lw=1, ls="--", alpha=0.6)
        strong = np.where(weights[:, k] >= 0.5, means[:, k], np.nan)
        top.plot(gx, strong, color=colors[k], lw=2.2, label=f"expert {k + 1} (σ = {sd[k]:.3g})")
        middle.plot(gx, weights[:, k], color=colors[k], lw=2)
    top.plot(gx, mix, color="black", lw=1.5, label="mixture mean E[y | x]")
    pad = 0.08 * (y.max() - y.min())
    top.set_ylim(y.min() - pad, y.max() + pad)
    top.set_ylabel(response_name)
    top.legend(loc="best", fontsize=8, frameon=False)
    others = [n for j, n in enumerate(names) if j != column]
    note = f" ({', '.join(others)} held at {'its mean' if len(others) == 1 else 'their means'})" if others else ""
    top.set_title(title or f"{response_name} ~ {names[column]}: {K}-expert mixture{note}", fontsize=10)
    top.tick_params(labelbottom=False)
    middle.set_ylim(-0.03, 1.03)
    middle.set_ylabel("gate weight $g_k(x)$")
    middle.set_xlabel(names[column] + note)
    cover = f"{100 * inside:.0f}% of samples inside their {pct} interval"
    if d == 1:
        bottom.sharex(top)
        order = np.argsort(x[:, 0])
        bottom.fill_between(x[order, 0], (lo - fitted)[order], (hi - fitted)[order], color="0.85", lw=0)
        bottom.axhline(0.0, color="black", lw=1)
        for k in range(K):
            pts = label == k
            bottom.scatter(x[pts, 0], (y - fitted)[pts], s=10, color=colors[k], alpha=0.75, edgecolors="none")
        bottom.set_xlabel(names[0])
        bottom.set_ylabel(f"residual {response_name} − E[y | x]")
    else:
        bottom.vlines(fitted, lo, hi, color="0.8", lw=0.8)
        for k in range(K):
            pts = label == k
            bottom.scatter(fitted[pts], y[pts], s=10, color=colors[k], alpha=0.75, edgecolors="none")
        span = [min(fitted.min(), y.min()), max(fitted.max(), y.max())]
        bottom.plot(span, span, color="black", lw=1)
        bottom.set_xlabel(f"predicted E[y | x] (all of {', '.join(names)})")
        bottom.set_ylabel(f"observed {response_name}")
    bottom.set_title(cover, fontsize=9)
    return fig


def plot_criteria(table, *, criterion: str = "bic", title: Optional[str] = None) -> Figure:
    """BIC, AIC and ICL against the number of experts, the chosen K marked.

    Parameters
    ----------
    table : DataFrame
        From :func:`moelab.select_n_experts` (columns ``n_experts``, ``bic``,
        ``aic``, ``icl``, ``degenerate``; ``attrs["chosen"]``).
    criterion : {"bic", "aic", "icl"}, default "bic"
        The criterion that chose K (drawn bold).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        Unknown criterion or missing columns.
    """
    if criterion not in ("bic", "aic", "icl"):
        raise ValueError(f"criterion must be bic, aic or icl, got {criterion!r}")
    missing = [c for c in ("n_experts", "bic", "aic", "icl") if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}; pass the table of select_n_experts")
    ks = table["n_experts"].to_numpy()
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, color in (("bic", "C0"), ("aic", "C1"), ("icl", "C2")):
        bold = name == criterion
        ax.plot(ks, table[name], marker="o", color=color, lw=2.4 if bold else 1.2, ms=6 if bold else 4,
                label=name.upper() + (" (chooses K)" if bold else ""))
    if "degenerate" in table.columns and table["degenerate"].any():
        bad = table[table["degenerate"]]
        ax.scatter(bad["n_experts"], bad[criterion], marker="x", s=70, color="red", zorder=3,
                   label="collapsed fit (not chosen)")
    chosen = table.attrs.get("chosen")
    if chosen is not None:
        ax.axvline(chosen, color="0.5", ls=":", lw=1)
        value = float(table.loc[table["n_experts"] == chosen, criterion].iloc[0])
        last = chosen == ks.max()
        ax.annotate(f"chosen K = {chosen}", (chosen, value), textcoords="offset points", xytext=(-6 if last else 6, 10),
                    ha="right" if last else "left", fontsize=9)
    ax.set_xticks(ks)
    ax.margins(x=0.08)
    ax.set_xlabel("number of experts K")
    ax.set_ylabel("criterion (lower is better)")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "information criteria against K", fontsize=10)
    return fig
