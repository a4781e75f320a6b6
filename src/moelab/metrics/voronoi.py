"""Voronoi cells and Voronoi losses between a fitted and a true Gaussian MoE.

Notation (Nguyen, Nguyen & Ho, NeurIPS 2023, "Demystifying Softmax Gating
Function in Gaussian Mixture of Experts", Section 3): a model is a set of atoms
ω_i = (β_{1i}, a_i, b_i, ν_i) with gate masses exp(β_{0i}). Each fitted atom
belongs to the Voronoi cell A_j of its nearest true atom j (eq. 6):

    A_j = {i : ‖ω_i − ω*_j‖ ≤ ‖ω_i − ω*_l‖ for all l}   (ties → lowest j).

The Voronoi loss with per-group exponents r_g(|A_j|) is

    D(G, G*) = Σ_j |Σ_{i∈A_j} m_i − m*_j|
             + Σ_j Σ_{i∈A_j} m_i Σ_g ‖θ_{g,i} − θ*_{g,j}‖^{r_g(|A_j|)},

over groups g ∈ {gate_slope β_1, expert_slope a, expert_intercept b,
variance ν} (and temperature τ for gates with a temperature). Presets:

* **D1** (exact specification, NeurIPS 2023 eq. 7): every exponent 1.
* **D2** (over-specification, NeurIPS 2023 eq. 9): exponent 1 on cells with one
  atom; on cells with |A_j| > 1, r̄(|A_j|) on β_1 and b and r̄(|A_j|)/2 on a
  and ν, with r̄(2) = 4 and r̄(3) = 6 (the solvability thresholds of the
  paper's polynomial system, its Table/eq. 8).

Regression mixtures of experts (least squares, :class:`moelab.RegressionMoE`)
use the same losses with atoms ω_i = (β_{1i}, a_i, b_i) (no variance group);
a sigmoid gate's masses are sigmoid(β_{0i}), its weights at x = 0
(:meth:`Gate.atom_masses`), and it has no translation invariance.

Normalisation: masses. The softmax is unchanged when every logit is shifted
by the same c_1ᵀx + c_0, so raw exp(β_0) are defined only up to a common
factor. moelab uses **normalised masses** m_i = exp(β_{0i}) / Σ_l exp(β_{0l})
for both models (masses sum to 1), which removes c_0 whatever expert is the
reference.

Normalisation: slopes (translation-invariant gates). Write s_i for the slope
the logits use per unit of x (β_{1i}, or β_{1i}/τ for gates with a
temperature). Whether the gate absorbs a common shift s_i → s_i + c is decided
from the gate itself (:func:`moelab.gates.identifiability.gate_invariances`,
true for softmax, temperature, top-K, and activation gates with σ affine over
the logits' range). For such gates only differences s_i − s_l are defined, so
the loss must be a function of the fitted atoms *modulo* a common c. moelab
compares

    s̃_i = s_i − c(G),    s̃*_j = s*_j − s*_{K*}   (the truth's reference, K*)

with a centre c(G) that moves with the model, c(G + c') = c(G) + c' (so the
loss is translation-invariant), is permutation-invariant, and is the
parameter the truth's normalisation fixes: the **mass-weighted centre of the
fitted atoms in the Voronoi cell of the true reference expert**,

    c(G) = Σ_{i∈A_{K*}} m_i s_i / Σ_{i∈A_{K*}} m_i.

Why this centre. Expanding the conditional density of the fitted atoms of a
cell A_j around the true atom (Taylor in s_i − s*_j), the first-order term is
Σ_{i∈A_j} m_i (s_i − s*_j) x g_j(x) f_j(y|x): it is the cell's mass-weighted
mean slope that the density sees at first order, and only higher moments are
left to the cell's atoms. In the reference cell that first moment is exactly
what a common translation moves, so choosing c with Σ_{i∈A_{K*}} m_i (s_i − c) = 0
puts the translation's whole freedom into c and leaves every loss term an
invariant of the model. Consequences (tested): an exact split of any expert
into copies with any mass shares gives loss 0; a near-split of any expert j
into copies s*_j + δu_i with Σ p_i u_i = 0 gives D2 = m*_j Σ_i p_i ‖u_i‖^{r̄} δ^{r̄}
whichever j is split (the reference included); permuting fitted experts
changes nothing; with one fitted atom in the reference cell (exact fits) c is
that atom's slope, i.e. re-referencing to it, as moelab did before.

The cell A_{K*} depends on c through the slope part of the cell distance, so c
is found by a fixed point: cells from the expert parameters (a, b, ν) only
(translation-free), c from the reference cell, cells in the full ω with the
centred slopes, repeated until the reference cell no longer changes (at most
K + 1 rounds). If the reference cell is empty, the fitted atom closest to the
true reference in (a, b, ν) stands in for it.

Gates without translation invariance (activation gates with a non-affine σ)
have their slopes used as they are (the estimators fix the reference expert's
slope at 0).

Routing-only true gates (top-1). When the true gate acts only through its
routing partition (:func:`moelab.gates.identifiability.routing_only`: top-1
gating, whose weights are 0 or 1), neither exp(β_0) nor β_1 is identified:
(cβ_1, cβ_0) with any c > 0 routes every x the same way. The losses then
use only what the model identifies: each atom's **routing mass**
m_i = E_X[g_i(X)] (the share of the x distribution routed to it, weighted by
its gate weight; averaged over the points ``x``, so pass a fine grid of the
x distribution), cells from the expert parameters (a, b, ν) alone, and no
gate-slope group. The mass term Σ_j |Σ_{i∈A_j} m_i − m*_j| then measures the
routing partition: for two experts in d = 1 and x ~ U(0, 1) it is
2·|x̂_0 − x*_0|, twice the error of the switch point. The same definition is
used for both models, whatever the fitted gate (a fitted top-2 gate's masses
are its expected weights). :func:`parameter_errors` still reports
``gate_slope`` (the slopes as fitted, against the truth's re-referenced to
its last expert) so the divergence of a hard switch is visible; it is not
identified and never part of D1 or D2.

Temperature. For gates with a temperature the cell distance uses s = β_1/τ.
If τ is fixed, or estimated but identified (σ not positively homogeneous over
the logits' range, e.g. tanh), the loss has β_1 and τ as separate groups (as
the ICML 2024 paper's loss does). If τ is estimated and the gate is invariant
to (β_1, τ) → (cβ_1, cτ) (temperature gate, identity, relu, any homogeneous
σ), β_1 and τ are not identified: D1/D2 then use the identified combination
β_1/τ as the gate-slope group and no temperature group, while
:func:`parameter_errors` still reports β_1 and τ (so their drift along the
non-identified direction is visible) next to ``gate_slope_over_tau``.

``x`` (points of the x distribution) decides the invariances over the
logits' range; without it :func:`moelab.gates.identifiability.default_x` is used.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Union

import torch

from ..gates.identifiability import default_x, gate_invariances
from ..model import GaussianMoE

__all__ = [
    "PARAMETER_GROUPS",
    "D1_EXPONENTS",
    "r_bar",
    "d2_exponents",
    "normalised_atoms",
    "voronoi_cells",
    "voronoi_loss",
    "d1_loss",
    "d2_loss",
    "parameter_errors",
]

PARAMETER_GROUPS = ("gate_slope", "temperature", "expert_slope", "expert_intercept", "variance")

D1_EXPONENTS: Dict[str, float] = {g: 1.0 for g in PARAMETER_GROUPS}

#: at most about this many of the points ``x`` decide the gate's invariances (evenly strided)
_INVARIANCE_POINTS = 4096

Exponents = Union[Mapping[str, float], Callable[[int], Mapping[str, float]]]


def r_bar(cell_size: int) -> float:
    """r̄(m) of Nguyen, Nguyen & Ho (NeurIPS 2023), eq. (8): r̄(2) = 4, r̄(3) = 6.

    For m ≥ 4 the paper gives no value; moelab extrapolates r̄(m) = 2m (the
    pattern of the known values) and says so here. r̄(1) = 1 (exact cell).

    Raises
    ------
    ValueError
        If ``cell_size`` < 1.
    """
    if cell_size < 1:
        raise ValueError(f"cell_size must be >= 1, got {cell_size}")
    return 1.0 if cell_size == 1 else 2.0 * cell_size


def d2_exponents(cell_size: int) -> Dict[str, float]:
    """Exponents of the loss D2 for a cell with ``cell_size`` fitted atoms.

    Source: Nguyen, Nguyen & Ho (NeurIPS 2023), eq. (9).
    """
    if cell_size <= 1:
        return dict(D1_EXPONENTS)
    r = r_bar(cell_size)
    return {"gate_slope": r, "temperature": r, "expert_intercept": r, "expert_slope": r / 2, "variance": r / 2}


def _identified_slope(gate) -> torch.Tensor:
    """s = β_1 (or β_1/τ for gates with a temperature): the logits' slope per unit of x, (B, K, d)."""
    tau = getattr(gate, "temperature", None)
    return gate.slope if tau is None else gate.slope / tau[..., None, None]


def normalised_atoms(model: GaussianMoE, centre: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The atoms of ``model`` under moelab's normalisation (see the module docstring).

    Parameters
    ----------
    model : GaussianMoE or RegressionMoE
        Batch shape B, K experts, d features (a RegressionMoE has no variance group).
    centre : tensor of shape B + (d,), optional
        Subtracted from every identified slope s_i = β_{1i} (β_{1i}/τ with a
        temperature). Default: none (slopes as they are).

    Returns
    -------
    dict
        ``mass`` (B, K) summing to 1; ``gate_slope`` (B, K, d) = τ·(s_i − c)
        (β_{1i} − c without a temperature); ``expert_slope`` (B, K, d);
        ``expert_intercept`` (B, K, 1); ``variance`` (B, K, 1);
        ``temperature`` (B, K, 1) and ``gate_slope_over_tau`` (B, K, d) = s_i − c
        when the gate has a temperature; ``cell_slope`` (B, K, d) = s_i − c, the
        slope used for cell assignment.
    """
    gate, ex = model.gate, model.experts
    s = _identified_slope(gate)
    if centre is not None:
        s = s - centre.unsqueeze(-2)
    tau = getattr(gate, "temperature", None)
    out = {
        "mass": gate.atom_masses(),
        "gate_slope": s if tau is None else s * tau[..., None, None],
        "expert_slope": ex.slope,
        "expert_intercept": ex.intercept.unsqueeze(-1),
        "cell_slope": s,
    }
    if getattr(ex, "variance", None) is not None:  # regression experts (least squares) have none
        out["variance"] = ex.variance.unsqueeze(-1)
    if tau is not None:
        out["temperature"] = tau[..., None, None].expand(*s.shape[:-1], 1)
        out["gate_slope_over_tau"] = s
    return out


def _omega(at: Dict[str, torch.Tensor], with_gate: bool = True) -> torch.Tensor:
    parts = ([at["cell_slope"]] if with_gate else []) + [at[g] for g in ("expert_slope", "expert_intercept", "variance") if g in at]
    return torch.cat(parts, -1)


def _nearest(f_at, t_at, with_gate: bool = True) -> torch.Tensor:
    """Index of the nearest true atom for every fitted atom (ties → lowest index): (B, K)."""
    of, ot = _omega(f_at, with_gate), _omega(t_at, with_gate)
    return torch.cdist(of, ot.expand(*of.shape[:-2], *ot.shape[-2:])).argmin(-1)


def _reference_centre(model: GaussianMoE, t_at) -> torch.Tensor:
    """c(G): mass-weighted centre of the identified slopes in the true reference's cell, (B, d).

    Fixed point of (cells → centre → cells); see the module docstring.
    """
    raw = normalised_atoms(model)
    Kt, K = t_at["mass"].shape[-1], raw["mass"].shape[-1]
    s, mass = raw["cell_slope"], raw["mass"]

    def centre(in_ref):
        w = mass * in_ref
        tot = w.sum(-1, keepdim=True)
        w = torch.where(tot > 0, w / tot.clamp_min(torch.finfo(w.dtype).tiny), in_ref / in_ref.sum(-1, keepdim=True))
        return (w.unsqueeze(-1) * s).sum(-2)

    e_f, e_t = _omega(raw, False), _omega(t_at, False)
    closest = (e_f - e_t[..., -1:, :]).square().sum(-1).argmin(-1)  # [B] stand-in for an empty cell
    fallback = torch.nn.functional.one_hot(closest, K).to(mass.dtype)
    in_ref = (_nearest(raw, t_at, with_gate=False) == Kt - 1).to(mass.dtype)
    in_ref = torch.where(in_ref.any(-1, keepdim=True), in_ref, fallback)
    c = centre(in_ref)
    for _ in range(K + 1):
        new = (_nearest(normalised_atoms(model, c), t_at) == Kt - 1).to(mass.dtype)
        new = torch.where(new.any(-1, keepdim=True), new, in_ref)
        if bool((new == in_ref).all()):
            break
        in_ref = new
        c = centre(in_ref)
    return c


def _routing_masses(gate, x: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """E_X[g_i(X)] over the points ``x`` (m, d) for every atom: (B, K), summing to 1 (blocks of ``chunk`` points)."""
    total = None
    for s in range(0, x.shape[-2], chunk):
        part = gate.weights(x[..., s : s + chunk, :]).sum(-2)
        total = part if total is None else total + part
    return total / x.shape[-2]


def _aligned_atoms(model: GaussianMoE, truth: GaussianMoE, x: Optional[torch.Tensor] = None):
    """Normalised atoms of both models (module docstring) and what the true gate identifies.

    Returns (fitted atoms, true atoms, tau_identified: bool, routing_only: bool). With a
    routing-only true gate (top-1) the masses are the routing masses E_X[g_i(X)] on ``x``,
    ``cell_slope`` is empty (cells from the expert parameters) and ``gate_slope`` holds the
    slopes as they are (reported by :func:`parameter_errors`, never part of a loss).
    """
    if model.n_features != truth.n_features:
        raise ValueError(f"fitted model has {model.n_features} features but the truth has {truth.n_features}")
    if model.gate.name != truth.gate.name:
        raise ValueError(f"fitted gate {model.gate.name!r} differs from the true gate {truth.gate.name!r}")
    dtype = model.dtype
    truth = truth.to(dtype=dtype)
    if x is None:
        x = default_x(truth.n_features, dtype, truth.gate.slope.device)
    x = torch.as_tensor(x, dtype=dtype, device=truth.gate.slope.device)
    stride = max(1, x.shape[-2] // _INVARIANCE_POINTS)  # a fine grid (routing masses) is thinned for the derivatives
    inv = gate_invariances(truth.gate, x[..., ::stride, :])
    tau_identified = not (getattr(model.gate, "learn_temperature", False) and bool(inv.scaling.all()))
    routing = bool(inv.routing_only.all())
    if routing:  # only the routing partition is identified: routing masses, no slope in cells or losses
        t_at, f_at = normalised_atoms(truth, _identified_slope(truth.gate)[..., -1, :]), normalised_atoms(model)
        for at, m in ((t_at, truth), (f_at, model)):
            at["mass"] = _routing_masses(m.gate, x)
            at["cell_slope"] = at["cell_slope"][..., :0]
    elif bool(inv.translation.all()):
        s_t = _identified_slope(truth.gate)
        t_at = normalised_atoms(truth, s_t[..., -1, :])
        f_at = normalised_atoms(model, _reference_centre(model, t_at))
    else:
        t_at, f_at = normalised_atoms(truth), normalised_atoms(model)
    return f_at, t_at, tau_identified, routing


def voronoi_cells(model: GaussianMoE, truth: GaussianMoE, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the true atom whose Voronoi cell holds each fitted atom.

    Distance: Euclidean in ω = (s, a, b, ν), s = β_1 (β_1/τ for gates with a
    temperature) after the normalisation of the module docstring.
    Source: Nguyen, Nguyen & Ho (NeurIPS 2023), eq. (6).

    Parameters
    ----------
    model : GaussianMoE
        Fitted model, batch shape B, K fitted experts.
    truth : GaussianMoE
        True model, batch shape () or B, K* experts.
    x : tensor of shape (m, d), optional
        Points of the x distribution (decide the gate's invariances; see module docstring).

    Returns
    -------
    tensor of shape B + (K,), int64 in [0, K*)

    Raises
    ------
    ValueError
        Different gate families or feature counts.
    """
    f_at, t_at, _, _ = _aligned_atoms(model, truth, x)
    return _nearest(f_at, t_at)


def _resolve(exponents: Exponents, size: int) -> Dict[str, float]:
    e = exponents(size) if callable(exponents) else exponents
    unknown = set(e) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)} in exponents; use {PARAMETER_GROUPS}")
    return {g: float(e.get(g, 1.0)) for g in PARAMETER_GROUPS}


def _matched(f_at, t_at, g: str, cells: torch.Tensor) -> torch.Tensor:
    """‖θ_{g,i} − θ*_{g,cell(i)}‖ for every fitted atom: (B, K)."""
    tg = t_at[g].expand(*f_at[g].shape[:-2], *t_at[g].shape[-2:])
    matched = torch.gather(tg, -2, cells.unsqueeze(-1).expand(*cells.shape, tg.shape[-1]))
    return (f_at[g] - matched).norm(dim=-1)


def _mass_error(f_at, t_at, cells: torch.Tensor):
    """(Σ_j |Σ_{i∈A_j} m_i − m*_j| of shape B, cell sizes of shape B + (K*,))."""
    onehot = torch.nn.functional.one_hot(cells, t_at["mass"].shape[-1]).to(f_at["mass"].dtype)  # [B, K, Kt]
    cell_mass = (onehot * f_at["mass"].unsqueeze(-1)).sum(-2)
    return (cell_mass - t_at["mass"]).abs().sum(-1), onehot.sum(-2)


def voronoi_loss(model: GaussianMoE, truth: GaussianMoE, exponents: Exponents = D1_EXPONENTS,
                 x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Voronoi loss D(G, G*) with per-group exponents that may depend on the cell size.

    Parameters
    ----------
    model : GaussianMoE
        Fitted model, batch shape B.
    truth : GaussianMoE
        True model, batch shape () or B, same gate family and features.
    exponents : mapping or callable, default all 1 (D1)
        Either a mapping group → exponent used for every cell, or a callable
        ``cell_size -> mapping``. Groups: ``gate_slope``, ``temperature``,
        ``expert_slope``, ``expert_intercept``, ``variance`` (missing → 1;
        ``temperature`` is used only for gates with an identified temperature;
        where τ is estimated but not identified, ``gate_slope`` is β_1/τ).
    x : tensor of shape (m, d), optional
        Points of the x distribution, used to decide the gate's invariances
        over the logits' range (default: 256 draws of N(0, I)), and, for a
        routing-only true gate (top-1), to average the routing masses
        E_X[g_i(X)] (their resolution is that of the grid: use ~10⁵ points).

    Returns
    -------
    tensor of shape B
        0 when ``model`` equals ``truth`` up to a permutation of experts, a
        split of experts into copies, and the gate's invariances.

    Raises
    ------
    ValueError
        Unknown group names, different gate families or feature counts.

    Notes
    -----
    Masses are normalised and translation-invariant slopes centred; see the
    module docstring. Source: Nguyen, Nguyen & Ho (NeurIPS 2023), eqs. (7), (9);
    Nguyen, Akbarian & Ho (ICML 2024), Section 3 (temperature as a group).
    """
    f_at, t_at, tau_identified, routing = _aligned_atoms(model, truth, x)
    cells = _nearest(f_at, t_at)  # [B, K]
    loss, sizes = _mass_error(f_at, t_at, cells)
    if not tau_identified:  # the identified combination β_1/τ replaces (β_1, τ)
        for at in (f_at, t_at):
            at["gate_slope"] = at.pop("gate_slope_over_tau")
            at.pop("temperature")
    size_i = sizes.gather(-1, cells)  # [B, K]
    for g in (g for g in PARAMETER_GROUPS if g in f_at and not (routing and g == "gate_slope")):
        dist = _matched(f_at, t_at, g, cells)
        expo = torch.ones_like(dist)
        for sz in torch.unique(size_i).tolist():
            expo = torch.where(size_i == sz, torch.as_tensor(_resolve(exponents, int(sz))[g], dtype=dist.dtype), expo)
        loss = loss + (f_at["mass"] * dist.pow(expo)).sum(-1)
    return loss


def d1_loss(model: GaussianMoE, truth: GaussianMoE, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact-specified Voronoi loss D1 (every exponent 1): shape B.

    See :func:`voronoi_loss` for the arguments and errors.
    Source: Nguyen, Nguyen & Ho (NeurIPS 2023), eq. (7).
    """
    return voronoi_loss(model, truth, D1_EXPONENTS, x)


def d2_loss(model: GaussianMoE, truth: GaussianMoE, x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Over-specified Voronoi loss D2 (r̄ exponents on multi-atom cells): shape B.

    See :func:`voronoi_loss` for the arguments and errors.
    Source: Nguyen, Nguyen & Ho (NeurIPS 2023), eq. (9).
    """
    return voronoi_loss(model, truth, d2_exponents, x)


def parameter_errors(model: GaussianMoE, truth: GaussianMoE, x: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-parameter-group errors inside the Voronoi matching, each of shape B.

    ``gate_mass`` = Σ_j |Σ_{i∈A_j} m_i − m*_j|; for every other group g,
    Σ_j Σ_{i∈A_j} m_i ‖θ_{g,i} − θ*_{g,j}‖ (exponent 1, mass-weighted, so a
    perfect fit gives 0 and each group is on its own scale). Groups:
    ``gate_mass``, ``gate_slope``, ``expert_slope``, ``expert_intercept``,
    ``variance``; for gates with a temperature also ``temperature`` (|τ − τ*|)
    and ``gate_slope_over_tau`` (β_1/τ). ``gate_slope`` and ``temperature``
    are reported even where they are not identified (see
    :func:`moelab.gates.identifiability.temperature_identified`), so their
    drift is visible.

    Parameters
    ----------
    model, truth, x
        As in :func:`voronoi_loss`.

    Returns
    -------
    dict of str → tensor of shape B

    Raises
    ------
    ValueError
        Different gate families or feature counts.
    """
    f_at, t_at, _, _ = _aligned_atoms(model, truth, x)
    cells = _nearest(f_at, t_at)
    out = {"gate_mass": _mass_error(f_at, t_at, cells)[0]}
    for g in ("gate_slope", "gate_slope_over_tau", "temperature", "expert_slope", "expert_intercept", "variance"):
        if g in f_at:
            out[g] = (f_at["mass"] * _matched(f_at, t_at, g, cells)).sum(-1)
    return out
