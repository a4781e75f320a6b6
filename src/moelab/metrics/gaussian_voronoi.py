"""Voronoi losses for the Gaussian-gated MoE (atoms ω = (c, Γ, A, b, ν) with masses π).

Source: Nguyen, Nguyen, Nguyen & Ho (AISTATS 2024, arXiv 2305.07572), the losses D̄
(Type I: every true gate mean c*_j ≠ 0) and D̃ (Type II: some c*_j = 0), as the
authors' code computes them (CRPE-GMoE, ``discrepancies.py``; re-implemented from
its description, not copied):

* cells: fitted atom i belongs to the cell A_j of the true atom j minimising
  ‖c_i − c*_j‖ + ‖Γ_i − Γ*_j‖ + ‖A_i − A*_j‖ + ‖b_i − b*_j‖ + ‖ν_i − ν*_j‖
  (Euclidean / Frobenius norms; π not used; ties → lowest j);
* D = Σ_j |Σ_{i∈A_j} π_i − π*_j|
  + Σ_{j: |A_j| = 1} π_i (‖Δc‖ + ‖ΔΓ‖ + ‖ΔA‖ + ‖Δb‖ + ‖Δν‖)
  + Σ_{j: |A_j| > 1} Σ_{i∈A_j} π_i (‖Δc‖^r + ‖ΔΓ‖^{r/2} + ‖ΔA‖^{e_A} + ‖Δb‖^r + ‖Δν‖^{r/2}),
  r = r̄(|A_j|) (r̄(2) = 4, r̄(3) = 6: :func:`moelab.metrics.r_bar`; the paper's
  r̃ has the same values in the authors' code), e_A = 2 where c*_j ≠ 0 and
  e_A = r/2 where c*_j = 0 (the Type II cells; exactly zero, as the code tests).

Where moelab differs from that code: the cell size used for the exponents is
the size of the atom's own cell (the code indexes ``np.unique``'s counts by the
cell label, which picks another cell's size when some true atom has an empty
cell); a tie between two true atoms puts the fitted atom in one cell (the code
appends it to both and misaligns the list). Neither occurs in a fit near the truth.
With ``exponents="exact"`` every exponent is 1 (the loss for K = K*).
"""

from __future__ import annotations

from typing import Dict

import torch

from ..model import GaussianMoE
from .voronoi import r_bar

__all__ = ["GAUSSIAN_GROUPS", "gaussian_atoms", "gaussian_cells", "gaussian_voronoi_loss", "gaussian_parameter_errors"]

#: the atom's parameter groups and the rates.csv names of their errors (err_<name>)
GAUSSIAN_GROUPS = {"mean": "gate_mean", "cov": "gate_covariance", "A": "expert_slope", "b": "expert_intercept", "nu": "variance"}


def gaussian_atoms(model: GaussianMoE) -> Dict[str, torch.Tensor]:
    """mass π (B, K) and the groups flattened per atom: c (B, K, d), Γ (B, K, d²), A (B, K, d), b, ν (B, K, 1)."""
    g, e = model.gate, model.experts
    if not getattr(g, "models_x", False):
        raise ValueError(f"Gaussian-gate Voronoi losses need a Gaussian-gated model, got a {g.name!r} gate")
    return {"mass": g.proportions, "mean": g.means, "cov": g.covariances.flatten(-2), "A": e.slope,
            "b": e.intercept.unsqueeze(-1), "nu": e.variance.unsqueeze(-1)}


def _dists(f, t) -> Dict[str, torch.Tensor]:
    """‖θ_{g,i} − θ*_{g,j}‖ for every group, fitted atom i and true atom j: (B, K, K*)."""
    return {k: (f[k].unsqueeze(-2) - t[k].unsqueeze(-3)).norm(dim=-1) for k in GAUSSIAN_GROUPS}


def gaussian_cells(model: GaussianMoE, truth: GaussianMoE) -> torch.Tensor:
    """Index of the true atom whose cell holds each fitted atom (the authors' sum-of-norms distance): B + (K,)."""
    f, t = gaussian_atoms(model), gaussian_atoms(truth.to(dtype=model.dtype))
    return sum(_dists(f, t).values()).argmin(-1)


def _setup(model, truth):
    if model.n_features != truth.n_features:
        raise ValueError(f"fitted model has {model.n_features} features but the truth has {truth.n_features}")
    f, t = gaussian_atoms(model), gaussian_atoms(truth.to(dtype=model.dtype))
    D = _dists(f, t)
    cells = sum(D.values()).argmin(-1)  # [B, K]
    Kt = t["mass"].shape[-1]
    onehot = torch.nn.functional.one_hot(cells, Kt).to(f["mass"].dtype)  # [B, K, K*]
    mass_err = ((onehot * f["mass"].unsqueeze(-1)).sum(-2) - t["mass"]).abs().sum(-1)
    sizes = onehot.sum(-2).gather(-1, cells)  # [B, K] size of each atom's cell
    matched = {k: v.gather(-1, cells.unsqueeze(-1)).squeeze(-1) for k, v in D.items()}  # [B, K]
    return f, t, cells, sizes, mass_err, matched


def gaussian_voronoi_loss(model: GaussianMoE, truth: GaussianMoE, exponents: str = "over") -> torch.Tensor:
    """The authors' Voronoi loss D̄ / D̃ (``exponents="over"``) or the all-exponents-1 loss (``"exact"``).

    Parameters
    ----------
    model : GaussianMoE
        Fitted Gaussian-gated model, batch shape B.
    truth : GaussianMoE
        True model, batch shape (), same features.
    exponents : {"over", "exact"}

    Returns
    -------
    tensor of shape B; 0 when ``model`` equals ``truth`` up to a permutation and splits of atoms.

    Raises
    ------
    ValueError
        A gate that is not Gaussian, different feature counts, an unknown ``exponents``.
    """
    if exponents not in ("over", "exact"):
        raise ValueError(f"exponents must be 'over' or 'exact', got {exponents!r}")
    f, t, cells, sizes, loss, m = _setup(model, truth)
    zc = (t["mean"] == 0).all(-1)  # [K*] true cells with c*_j = 0 (Type II)
    zero_c = zc.expand(*cells.shape[:-1], zc.shape[-1]).gather(-1, cells)
    single = (sizes <= 1) | (exponents == "exact")
    r = sizes.clone()
    for sz in torch.unique(sizes).tolist():
        r = torch.where(sizes == sz, torch.as_tensor(r_bar(max(int(sz), 1)), dtype=r.dtype), r)
    e_a = torch.where(zero_c, r / 2, torch.full_like(r, 2.0))
    multi = m["mean"].pow(r) + m["cov"].pow(r / 2) + m["A"].pow(e_a) + m["b"].pow(r) + m["nu"].pow(r / 2)
    lin = sum(m.values())
    return loss + (f["mass"] * torch.where(single, lin, multi)).sum(-1)


def gaussian_parameter_errors(model: GaussianMoE, truth: GaussianMoE) -> Dict[str, torch.Tensor]:
    """Per-group errors inside the cells, each of shape B.

    ``gate_mass`` = Σ_j |Σ_{i∈A_j} π_i − π*_j|; for every other group Σ_i π_i ‖θ_i − θ*_{cell(i)}‖
    (exponent 1): ``gate_mean`` (c), ``gate_covariance`` (Γ, Frobenius), ``expert_slope`` (A),
    ``expert_intercept`` (b), ``variance`` (ν).
    """
    f, _, _, _, mass_err, m = _setup(model, truth)
    out = {"gate_mass": mass_err}
    for k, name in GAUSSIAN_GROUPS.items():
        out[name] = (f["mass"] * m[k]).sum(-1)
    return out
