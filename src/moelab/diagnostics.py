"""Checks of a fit and its data that end in a warning when, and only when, it is true.

Every check is a pure function returning what it found, plus a ``warn_*``
function that emits one one-line warning of the classes in
:mod:`moelab.exceptions`. :func:`moelab.fit_em` and :func:`moelab.fit_mle`
run them at the end of a fit (``warn=True``, the default; rate studies fit
with ``warn=False``):

* **Rank of x** (:func:`design_rank`): the numerical rank of the
  standardised design, from its singular values. Columns z_j = (x_j − mean)/sd
  (unit variance, so units do not matter; centring makes the intercept column
  orthogonal to them, so rank [1, Z] = 1 + rank Z); a singular value counts
  as zero when σ_i ≤ ``tol`` · σ_max, ``tol`` = 1e-7, the tolerance R's
  ``lm.fit`` uses for its pivoted QR (a column whose part not explained by the
  others is below 1e-7 of its size is aliased). [t, t], [t, 2t] and
  [t, t + 1e-9·noise] are all rank 1. → :class:`RankDeficientWarning`.
* **Effective expert sizes** (:func:`small_experts`): expert k's effective
  size n_k = Σ_n P(k | x_n, y_n) must leave at least 5 residual degrees of
  freedom after its d + 1 regression coefficients: n_k ≥ d + 6 (d = number of
  x columns). Below that its slope, intercept and variance (and the
  likelihood, which a near-interpolating expert inflates) are not estimates
  one can use. → :class:`SmallExpertWarning`.
* **Number of starts** (:func:`warn_few_starts`): EM and L-BFGS converge to a
  local maximum, and mixtures of experts have many; with ``n_init`` < 10
  the best of the starts is often not the maximum (mcycle, 2 experts:
  one start reaches −643.39, the default 160 starts −614.54).
  → :class:`FewStartsWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .exceptions import FewStartsWarning, RankDeficientWarning, SmallExpertWarning

__all__ = ["RANK_TOL", "MIN_RESIDUAL_DF", "MIN_STARTS", "DesignRank", "design_rank", "warn_rank_deficient",
           "small_experts", "warn_small_experts", "warn_few_starts", "warn_fit"]

#: relative singular-value tolerance of the rank check (R's lm.fit tol)
RANK_TOL = 1e-7
#: residual degrees of freedom an expert needs beyond its d + 1 regression coefficients
MIN_RESIDUAL_DF = 5
#: fewer starts than this give a FewStartsWarning
MIN_STARTS = 10
#: a column belongs to a dependency when its loading on the null space exceeds this (loadings have norm ≤ 1)
_LOADING = 1e-3


@dataclass(frozen=True)
class DesignRank:
    """Result of :func:`design_rank` for one design x of shape (n_samples, n_features).

    Attributes
    ----------
    rank : int
        Numerical rank of the standardised columns (the intercept not counted).
    n_features : int
    singular_values : ndarray of shape (n_features,)
        Singular values of the standardised design divided by the largest, descending.
    dependent : tuple of int
        Columns with a loading above 1e-3 on the numerical null space (empty when rank == n_features).
    relation : tuple (column, coefficients, constant) or None
        When the null space is one-dimensional: x[:, column] ≈ x @ coefficients + constant in the
        original units (coefficients of shape (n_features,), 0 at ``column``).
    """

    rank: int
    n_features: int
    singular_values: np.ndarray
    dependent: tuple
    relation: Optional[tuple] = None

    @property
    def deficient(self) -> bool:
        return self.rank < self.n_features

    def describe(self, names: Optional[Sequence[str]] = None) -> str:
        """One line naming the dependent columns (and the relation, when there is one)."""
        names = [f"x[:, {j}]" for j in range(self.n_features)] if names is None else [str(c) for c in names]
        cols = ", ".join(repr(names[j]) for j in self.dependent)
        text = f"x has numerical rank {self.rank} < {self.n_features} columns: {cols} are linearly dependent"
        if self.relation is not None:
            col, coef, const = self.relation
            terms = [names[j] if _g(coef[j]) == "1" else f"{_g(coef[j])}·{names[j]}" for j in self.dependent if j != col]
            rhs = " + ".join(terms).replace("+ -", "− ")
            if abs(const) > 0:
                rhs += f" {'−' if const < 0 else '+'} {_g(abs(const))}"
            text += f" ({names[col]} ≈ {rhs})"
        return text


def _g(v: float) -> str:
    return f"{v:.4g}"


def design_rank(x, *, tol: float = RANK_TOL) -> DesignRank:
    """Numerical rank of the standardised design and the columns that make it deficient.

    Parameters
    ----------
    x : array-like or tensor of shape (n_samples, n_features)
        The inputs in their original units (no intercept column); computed in float64.
    tol : float, default 1e-7
        A singular value σ_i of Z = (x − mean)/sd counts as zero when σ_i ≤ tol · σ_max
        (R's ``lm.fit`` tolerance).

    Returns
    -------
    DesignRank

    Raises
    ------
    ValueError
        If x is not two-dimensional or has a constant column (its sd is 0; the model
        already has an intercept — drop the column).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64).cpu()
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n_samples, n_features), got {tuple(x.shape)}")
    n, d = x.shape
    loc, scale = x.mean(0), x.std(0)
    if bool((scale == 0).any()):
        cols = (scale == 0).nonzero().flatten().tolist()
        raise ValueError(f"x column(s) {cols} are constant; drop them (the model already has an intercept)")
    z = (x - loc) / scale
    _, s, vh = torch.linalg.svd(z, full_matrices=False)  # s descending, vh (d, d)
    rel = (s / s[0]).numpy()
    rank = int((rel > tol).sum())
    if rank == d:
        return DesignRank(rank, d, rel, ())
    null = vh[rank:].T  # (d, d - rank) orthonormal basis of the numerical null space of Z
    loading = null.norm(dim=1)
    dependent = tuple(int(j) for j in (loading > _LOADING).nonzero().flatten())
    relation = None
    if d - rank == 1:
        v = null[:, 0] / scale  # Σ_j v_j x_j ≈ Σ_j v_j loc_j  in original units
        load = null[:, 0].abs()
        col = int((load >= 0.5 * load.max()).nonzero().flatten()[-1])  # of the main ones, the last column
        coef = (-v / v[col]).numpy()
        coef[col] = 0.0
        const = float((v * loc).sum() / v[col])
        # drop constants at rounding level: relative to the size of the column's values
        if abs(const) <= 1e-9 * float(x[:, col].abs().max()):
            const = 0.0
        relation = (col, coef, const)
    return DesignRank(rank, d, rel, dependent, relation)


def warn_rank_deficient(x: torch.Tensor, names: Optional[Sequence[str]] = None, *, stacklevel: int = 2) -> None:
    """Emit one :class:`RankDeficientWarning` if x (..., n, d) is rank deficient in any problem.

    The message describes the first deficient problem (:meth:`DesignRank.describe`).
    """
    x = x.reshape(-1, *x.shape[-2:])
    if x.shape[-1] < 2:  # one non-constant column always has rank 1
        return
    xd = x.detach().to(torch.float64)
    z = (xd - xd.mean(-2, keepdim=True)) / xd.std(-2, keepdim=True)
    s = torch.linalg.svdvals(z)  # (B, d), descending: one batched call, details only where deficient
    deficient = (s[..., -1] <= RANK_TOL * s[..., 0]).nonzero().flatten().tolist()
    if not deficient:
        return
    bad = [design_rank(x[b]) for b in deficient[:1]]
    where = f" in {len(deficient)} of {x.shape[0]} problems (first shown)" if x.shape[0] > 1 else ""
    warnings.warn(
        f"{bad[0].describe(names)}{where}; their slopes in the gate and the experts are not identified (only their "
        f"combination is; singular values of the standardised x below {RANK_TOL:g} of the largest count as 0): "
        "drop or combine the dependent columns.",
        RankDeficientWarning,
        stacklevel=stacklevel + 1,
    )


def small_experts(expert_size, n_features: int) -> np.ndarray:
    """Which experts have fewer effective samples than n_features + 6 (5 residual degrees of freedom).

    Parameters
    ----------
    expert_size : array-like of shape (..., n_experts)
        Effective sizes Σ_n P(k | x_n, y_n).
    n_features : int
        d, the number of x columns (each expert has d + 1 regression coefficients and a variance).

    Returns
    -------
    ndarray of bool, shape (..., n_experts)
    """
    size = np.asarray(expert_size, dtype=np.float64)
    return size < n_features + 1 + MIN_RESIDUAL_DF


def warn_small_experts(expert_size, n_features: int, *, stacklevel: int = 2) -> None:
    """Emit one :class:`SmallExpertWarning` if any expert has fewer than n_features + 6 effective samples."""
    size = np.asarray(expert_size, dtype=np.float64)
    size2 = size.reshape(-1, size.shape[-1])
    small = small_experts(size2, n_features)
    if not small.any():
        return
    need = n_features + 1 + MIN_RESIDUAL_DF
    b = int(np.flatnonzero(small.any(-1))[0])
    ks = np.flatnonzero(small[b])
    which = ", ".join(str(k + 1) for k in ks)
    sizes = ", ".join(f"{size2[b, k]:.3g}" for k in ks)
    where = f" in {int(small.any(-1).sum())} of {size2.shape[0]} problems (first shown)" if size2.shape[0] > 1 else ""
    warnings.warn(
        f"expert{'s' if len(ks) > 1 else ''} {which} of {size2.shape[1]} (numbered from 1) "
        f"{'have' if len(ks) > 1 else 'has'} effective size{'s' if len(ks) > 1 else ''} {sizes} (Σ_n P(k | x_n, y_n)), "
        f"fewer than n_features + 6 = {need}{where}: {n_features + 1} regression coefficients and a variance per expert "
        f"leave under {MIN_RESIDUAL_DF} residual degrees of freedom, so those experts (and the log-likelihood, which a "
        "near-interpolating expert inflates) are not reliable; use fewer experts or more data.",
        SmallExpertWarning,
        stacklevel=stacklevel + 1,
    )


def warn_few_starts(n_init: int, start_loglik=None, *, atol: float = 1e-3, stacklevel: int = 2) -> None:
    """Emit one :class:`FewStartsWarning` if ``n_init`` < 10.

    Parameters
    ----------
    n_init : int
        Starts run per problem.
    start_loglik : array-like of shape (..., n_init), optional
        Final log-likelihood of every start (−inf: collapsed); when given, the message says how
        many starts reached the best one (within ``atol``) in the first problem.
    """
    if n_init >= MIN_STARTS:
        return
    fix = f"use n_init >= {MIN_STARTS} (CLI --n-init; default 160 for EM)"
    if n_init == 1:
        msg = ("a single start (n_init=1) is unreliable: EM converges to a local maximum of the likelihood and "
               f"mixtures of experts have many, so this fit may be far from the best; {fix}.")
    else:
        msg = f"n_init={n_init} starts are few: EM converges to a local maximum, and fewer than {MIN_STARTS} starts often miss the best one"
        if start_loglik is not None:
            ll = np.asarray(start_loglik, dtype=np.float64).reshape(-1, n_init)[0]
            best = np.max(ll)
            hit = int(np.sum(np.isfinite(ll) & (ll >= best - atol))) if np.isfinite(best) else 0
            msg += f" (here {hit} of {n_init} starts reached the best log-likelihood found)"
        msg += f"; {fix}."
    warnings.warn(msg, FewStartsWarning, stacklevel=stacklevel + 1)


def warn_fit(x: torch.Tensor, expert_size, start_loglik, *, n_init: int, user_starts: bool, degenerate=None,
             feature_names: Optional[Sequence[str]] = None, stacklevel: int = 2) -> None:
    """The checks above for one fit (called by the fitting core at the end of a fit).

    Parameters
    ----------
    x : tensor of shape (B, n_samples, n_features)
        The data in original units.
    expert_size : tensor of shape (..., n_experts)
        Effective sizes of the selected fit.
    start_loglik : tensor of shape (..., n_init)
    n_init : int
    user_starts : bool
        The starts were the user's (``init_model``): no FewStartsWarning (nor with one expert, fitted from one start).
    degenerate : bool tensor of shape (...), optional
        Problems where every start collapsed (a DegenerateFitWarning already said so): no
        SmallExpertWarning for them.
    feature_names : sequence of str, optional
        Names of the x columns for the messages.
    """
    warn_rank_deficient(x, feature_names, stacklevel=stacklevel + 1)
    size = torch.as_tensor(expert_size).detach().cpu().to(torch.float64).clone()
    if degenerate is not None:
        size[torch.as_tensor(degenerate).cpu()] = float("inf")
    warn_small_experts(size.numpy(), x.shape[-1], stacklevel=stacklevel + 1)
    if not user_starts and size.shape[-1] > 1:  # one expert: one start is the least-squares fit
        warn_few_starts(n_init, torch.as_tensor(start_loglik).cpu().numpy(), stacklevel=stacklevel + 1)


def check_finite_predictions(values: torch.Tensor, x: torch.Tensor, what: str, *, allow_inf: bool = False) -> None:
    """Raise ``ValueError`` where a prediction is not a number (or not finite) instead of returning it.

    Parameters
    ----------
    values : tensor of shape (n_samples,) or (n_samples, n_experts)
        The predictions for the rows of x.
    x : tensor of shape (n_samples, n_features)
    what : str
        What was predicted, for the message (e.g. ``"predict_variance: Var[y | x]"``).
    allow_inf : bool, default False
        Accept ±inf (a log density of −inf is a value), reject only NaN.

    Raises
    ------
    ValueError
        Naming how many rows, the first row (0-based position) and its x: float64 overflowed for
        inputs that far outside the data (gate logits or expert means beyond ~1.8e308, or a
        variance beyond that).
    """
    bad = torch.isnan(values) if allow_inf else ~torch.isfinite(values)
    if bad.dim() > 1:
        bad = bad.reshape(bad.shape[0], -1).any(-1)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    xi = ", ".join(f"{v:.4g}" for v in x[i].tolist())
    raise ValueError(
        f"{what} is not a finite number for {int(bad.sum())} of {bad.shape[0]} row(s) (first: row {i}, counted from 0, "
        f"x = [{xi}]): the gate logits, expert means or variance overflow {str(x.dtype).replace('torch.', '')} "
        "for inputs this far outside the data; predict at x nearer the training range (or rescale x before fitting)."
    )
