"""The true model of a study, its data, and truth-perturbed starting values.

Reproducibility: the data of cell (n, replicate) come from a generator seeded
by ``numpy.random.SeedSequence([seed, n, replicate])``, so they do not depend
on the order, batching or sharding of the run. With a fixed design
(``x = { design = "linspace" }``) x is linspace(low, high, n) in every
replicate and only y is drawn.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..experts import GaussianExperts
from ..gates import gate_family
from ..model import GaussianMoE
from .config import FitSpec, Study, TruthSpec
from .starts import gaussian_start, table_start

__all__ = ["true_model", "cell_seed", "sample_x", "simulate_cells", "x_points", "study_x_points", "loss_x_points",
           "truth_perturbed", "ROUTING_X_POINTS"]

DTYPE = torch.float64
#: points of the x distribution for the Voronoi losses of a routing-only (top-1) truth: the routing masses
#: E_X[g_i(X)] are averaged over them, so their resolution is 1/ROUTING_X_POINTS (3.8e-6) for d = 1 uniform x
ROUTING_X_POINTS = 1 << 18


def true_model(truth: TruthSpec, learn_temperature: bool = False):
    """The true model (batch shape ()) of a study: a GaussianMoE, or a RegressionMoE for a regression truth."""
    family = gate_family(truth.gate)
    experts = GaussianExperts(torch.tensor(truth.expert_slope, dtype=DTYPE), torch.tensor(truth.expert_intercept, dtype=DTYPE),
                              torch.tensor(truth.variance, dtype=DTYPE))
    if truth.gate_params:  # a gate that models x (Gaussian)
        p = {k: torch.tensor(v, dtype=DTYPE) for k, v in truth.gate_params.items()}
        return GaussianMoE(family(**p), experts)
    slope = torch.tensor(truth.gate_slope, dtype=DTYPE)
    icpt = torch.tensor(truth.gate_intercept, dtype=DTYPE)
    family = gate_family(truth.gate)
    takes = {o.name for o in family.options}
    opts = dict(truth.gate_options)
    if truth.temperature is not None:
        opts["temperature"] = truth.temperature
    if truth.activation is not None:
        opts["activation"] = truth.activation
    if "learn_temperature" in takes:
        opts["learn_temperature"] = learn_temperature
    gate = family(slope, icpt, **opts)
    if truth.regression:
        from ..regression import RegressionExperts, RegressionMoE

        return RegressionMoE(gate, RegressionExperts(torch.tensor(truth.expert_slope, dtype=DTYPE),
                                                     torch.tensor(truth.expert_intercept, dtype=DTYPE),
                                                     truth.expert_kind, truth.degree))
    return GaussianMoE(gate, experts)


def cell_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1, 2**31], dtype=np.uint64)) % (2**63 - 1)


def sample_x(xspec: dict, n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n draws from the study's x distribution, or its fixed design: shape (n, d).

    A ``linspace`` design (d = 1) gives x = linspace(low, high, n) and draws nothing from ``generator``.
    """
    if xspec.get("design") == "linspace":
        return torch.linspace(xspec["low"], xspec["high"], n, dtype=DTYPE).unsqueeze(-1).expand(n, d).clone()
    if xspec["distribution"] == "uniform":
        u = torch.rand(n, d, generator=generator, dtype=DTYPE)
        return xspec["low"] + (xspec["high"] - xspec["low"]) * u
    return xspec["mean"] + xspec["sd"] * torch.randn(n, d, generator=generator, dtype=DTYPE)


def x_points(xspec: dict, m: int, d: int, seed: int = 0) -> torch.Tensor:
    """Points representing the x distribution for density distances: shape (m, d).

    Uniform with d = 1, or a linspace design (whose empirical distribution
    tends to Uniform(low, high)): midpoints of m equal bins (midpoint rule);
    otherwise a fixed-seed Monte Carlo sample.
    """
    if xspec.get("distribution") == "gate":
        raise ValueError("x drawn from the true gate: use study_x_points(study, truth)")
    if xspec.get("design") == "linspace" or (xspec["distribution"] == "uniform" and d == 1):
        u = (torch.arange(m, dtype=DTYPE) + 0.5) / m
        return (xspec["low"] + (xspec["high"] - xspec["low"]) * u).unsqueeze(-1)
    return sample_x(xspec, m, d, torch.Generator().manual_seed(seed))


def study_x_points(study: Study, truth: GaussianMoE) -> torch.Tensor:
    """:func:`x_points` of a study; for a gate that models x, a fixed-seed sample of ``study.x_points`` draws from it."""
    if study.truth.x.get("distribution") == "gate":
        return truth.gate.sample_x(study.x_points, torch.Generator().manual_seed(study.seed))[0]
    return x_points(study.truth.x, study.x_points, truth.n_features, seed=study.seed)


def loss_x_points(study: Study, truth, xpts: torch.Tensor) -> torch.Tensor:
    """Points of the x distribution for the Voronoi losses and per-parameter errors.

    ``xpts`` (:func:`study_x_points`) for every gate that varies with its parameters; for a true gate
    that acts only through its routing partition (top-1, :func:`moelab.gates.identifiability.routing_only`)
    :data:`ROUTING_X_POINTS` points (midpoints for d = 1 uniform or a linspace design, else a fixed-seed
    sample), since the routing masses E_X[g_i(X)] are averages over them and the switch points they
    measure move by O(1/n).
    """
    from ..gates.identifiability import routing_only

    if truth.gate.models_x or study.truth.regression or not routing_only(truth.gate, xpts):
        return xpts
    return x_points(study.truth.x, ROUTING_X_POINTS, truth.n_features, seed=study.seed)


def simulate_cells(study: Study, truth: GaussianMoE, n: int, replicates: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Data of cells (n, r) for r in ``replicates``: x (R, n, d), y (R, n).

    With ``x = { distribution = "gate" }`` (a gate that models x) x is drawn from the
    true gate's mixture Σ π_k N(c_k, Γ_k), then y from p(y | x).
    """
    d = truth.n_features
    xs, ys = [], []
    for r in replicates:
        gen = torch.Generator().manual_seed(cell_seed(study.seed, n, r))
        if study.truth.x.get("distribution") == "gate":
            x = truth.gate.sample_x(n, gen)[0]
        else:
            x = sample_x(study.truth.x, n, d, gen)
        xs.append(x)
        ys.append(truth.sample(x, study.truth.noise_sd, gen) if study.truth.regression else truth.sample(x, gen))
    return torch.stack(xs), torch.stack(ys)


def truth_perturbed(truth: GaussianMoE, fit: FitSpec, seeds: Sequence[int], n: Optional[int] = None) -> GaussianMoE:
    """Starting values near the truth, as in the papers' simulations (batch shape (len(seeds),)).

    One start per seed. Without ``fit.start`` (moelab's start): with K
    fitted experts and K* ≤ K true ones, each start duplicates randomly
    chosen true experts until there are K atoms (a duplicated expert's gate
    mass exp(β_0) is split equally between its copies), then adds N(0,
    perturbation²) noise to the gate slope, gate intercept, expert slope and
    intercept, and multiplies variances (and an estimated τ) by exp(N(0,
    perturbation²)). The true reference expert's copy is put last and the
    gate re-expressed so that the last expert has zero slope and intercept,
    as the estimators require. With ``fit.start`` (a [fit.start] table) the
    start is :func:`moelab.studies.starts.table_start` at sample size ``n``.

    Raises
    ------
    ValueError
        ``fit.start`` is given without ``n``.
    """
    g, e = truth.gate, truth.experts
    Kt, K, d = truth.n_experts, fit.n_experts, truth.n_features
    p = fit.perturbation
    if g.models_x:
        return gaussian_start(truth, fit, seeds, n)
    if fit.start is not None and n is None:
        raise ValueError(f"setting {fit.name!r} has a [fit.start] table, whose noise depends on n; pass n")
    sl, ic, es, ei, ev, tau = [], [], [], [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        if fit.start is not None:
            parts = table_start(truth, fit, gen, n)
            for acc, v in zip((sl, ic, es, ei, ev), parts[:5]):
                acc.append(v)
            if parts[5] is not None:
                tau.append(parts[5])
            continue
        extra = torch.randint(Kt, (K - Kt,), generator=gen).tolist()
        atoms = list(range(Kt)) + extra
        counts = torch.bincount(torch.tensor(atoms, dtype=torch.long), minlength=Kt).to(DTYPE)
        # put one copy of the reference (last true) expert at the end
        order = [a for a in atoms if a != Kt - 1] + [a for a in atoms if a == Kt - 1]
        idx = torch.tensor(order)
        noise = lambda shape: p * torch.randn(shape, generator=gen, dtype=DTYPE)  # noqa: E731
        gs = g.slope[idx] + noise((K, d))
        gi = g.intercept[idx] - counts[idx].log() + noise((K,))
        if g.affine_invariant:  # a common slope shift is absorbed (softmax, temperature gates)
            gs = gs - gs[-1]
        else:
            gs[-1] = 0.0
        gi = gi - gi[-1]
        sl.append(gs)
        ic.append(gi)
        es.append(e.slope[idx] + noise((K, d)))
        ei.append(e.intercept[idx] + noise((K,)))
        ev.append(e.variance[idx] * noise((K,)).exp())
        if getattr(g, "temperature", None) is not None:
            tau.append(g.temperature * (noise(()).exp() if fit.gate_options.get("learn_temperature") else 1.0))
    S = lambda v: torch.stack(v)  # noqa: E731
    # the true gate's options, then the fitted setting's (temperature handled below)
    takes = {o.name for o in type(g).options}
    opts = {k: v for k, v in g.hyperparams().items() if k in takes and k not in ("temperature", "learn_temperature")}
    opts.update({k: v for k, v in fit.gate_options.items() if k not in ("temperature",)})
    if getattr(g, "temperature", None) is not None:
        learn = bool(fit.gate_options.get("learn_temperature"))
        opts["temperature"] = S(tau) if learn else torch.full((len(seeds),), float(fit.gate_options.get("temperature", g.temperature)), dtype=DTYPE)
        opts["learn_temperature"] = learn
    gate = type(g)(S(sl), S(ic), **opts)
    return GaussianMoE(gate, GaussianExperts(S(es), S(ei), S(ev)))
