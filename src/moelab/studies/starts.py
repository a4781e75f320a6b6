"""Truth-perturbed starts described by a ``[fit.start]`` table (see :mod:`moelab.studies.config`).

One start of a K-expert fit to a K*-expert truth (K ≥ K*) is drawn in three
steps, all from one ``torch.Generator``:

1. **Assignment** — which true expert each fitted expert starts from
   (:func:`assign_atoms`). ``"cover"``: every true expert once plus K − K*
   uniform extras (moelab's default). ``"resample"``: K uniform draws with
   the last one fixed to the true reference expert, redrawn until every true
   expert appears; for K* = 2 this starts the reference twice in 2 of 3
   starts at K = 3 and 6 of 7 at K = 4. (This is the rule of the
   ``nearTrue`` initialisation of the R package meteoritsSim used by
   Nguyen, Nguyen & Ho, NeurIPS 2023; re-implemented from its description,
   not copied.)
2. **Gate masses** — ``"split"``: the copies of a true expert share its
   exp(β₀) equally (intercept − log copies); ``"copy"``: every copy keeps the
   true logit, so a duplicated expert starts with that many times its mass.
   The gate is then re-expressed with the last fitted expert (a copy of the
   true reference) as reference: zero slope and intercept.
3. **Noise** — with s_g = sd_g · n^{n_power_g} for group g at sample size n:
   the K − 1 non-reference gate rows (slope and intercept) + N(0, s_gate²);
   expert slopes and intercepts + N(0, s_experts²); variances
   ν + |N(0, s_variance²)| (``mode = "additive-abs"``) or
   ν·exp(N(0, s_variance²)) (``"multiplicative"``); an estimated temperature
   τ·exp(N(0, s_temperature²)). ``draw = "independent"`` draws every
   coefficient separately; ``"shared"`` draws once per expert and group and
   adds that value to all the expert's coefficients of the group (intercept
   and slopes alike), as meteoritsSim does.
"""

from __future__ import annotations

from typing import List

import torch

__all__ = ["assign_atoms", "table_start", "gaussian_start"]

DTYPE = torch.float64

#: redraws allowed before "resample" gives up (the acceptance probability is ≥ K!/K^K·… > 0; never reached in practice)
_MAX_REDRAWS = 100_000


def assign_atoms(n_true: int, n_fit: int, rule: str, generator: torch.Generator) -> List[int]:
    """True expert (0-based) each fitted expert starts from; the last entry is the true reference ``n_true - 1``.

    Parameters
    ----------
    n_true, n_fit : int
        K* true and K ≥ K* fitted experts.
    rule : {"cover", "resample", "resample-all"}
        See the module docstring.
    generator : torch.Generator

    Returns
    -------
    list of int, length n_fit
        Every true expert appears at least once.

    Raises
    ------
    ValueError
        ``n_fit < n_true`` or an unknown rule.
    """
    if n_fit < n_true:
        raise ValueError(f"a truth-perturbed start needs n_fit >= n_true, got {n_fit} < {n_true}")
    ref = n_true - 1
    if rule == "cover":
        atoms = list(range(n_true)) + torch.randint(n_true, (n_fit - n_true,), generator=generator).tolist()
        return [a for a in atoms if a != ref] + [a for a in atoms if a == ref]
    if rule == "resample-all":  # no reference expert (Gaussian gate): K uniform draws until every true expert appears
        for _ in range(_MAX_REDRAWS):
            s = torch.randint(n_true, (n_fit,), generator=generator).tolist()
            if len(set(s)) == n_true:
                return s
        raise RuntimeError(f"resample-all: no covering assignment in {_MAX_REDRAWS} draws")  # pragma: no cover
    if rule == "resample":
        for _ in range(_MAX_REDRAWS):
            s = torch.randint(n_true, (n_fit,), generator=generator).tolist()
            s[-1] = ref
            if len(set(s)) == n_true:
                return s
        raise RuntimeError(f"resample: no covering assignment in {_MAX_REDRAWS} draws")  # pragma: no cover
    raise ValueError(f"unknown assignment rule {rule!r}; choose 'cover', 'resample' or 'resample-all'")


def _sd(group: dict, n: int) -> float:
    return group["sd"] * float(n) ** group["n_power"]


def table_start(truth, fit, generator: torch.Generator, n: int):
    """One start from ``fit.start`` at sample size ``n``.

    Parameters
    ----------
    truth : GaussianMoE
        The true model, batch shape ().
    fit : FitSpec
        A setting whose ``start`` is a validated [fit.start] table.
    generator : torch.Generator
    n : int
        Sample size (the noise sd is sd·n^n_power).

    Returns
    -------
    tuple of tensors
        gate slope (K, d), gate intercept (K,) with a zero last row, expert
        slope (K, d), expert intercept (K,), variance (K,), and the start's
        temperature (a 0-d tensor; the true one unless it is estimated).
    """
    spec = fit.start
    g, e = truth.gate, truth.experts
    Kt, K, d = truth.n_experts, fit.n_experts, truth.n_features
    atoms = assign_atoms(Kt, K, spec["assign"], generator)
    idx = torch.tensor(atoms)
    gs, gi = g.slope[idx].clone(), g.intercept[idx].clone()
    if spec["mass"] == "split":
        counts = torch.bincount(idx, minlength=Kt).to(DTYPE)
        gi = gi - counts[idx].log()
    if g.affine_invariant:  # a common slope shift is absorbed (softmax, temperature gates)
        gs = gs - gs[-1]
    gi = gi - gi[-1]
    shared = spec["draw"] == "shared"

    def noise(group, rows, cols):
        s = _sd(spec[group], n)
        if shared:  # one draw per expert, added to each of its coefficients
            return s * torch.randn(rows, 1, generator=generator, dtype=DTYPE).expand(rows, cols)
        return s * torch.randn(rows, cols, generator=generator, dtype=DTYPE)

    eg = noise("gate", K - 1, d + 1)  # non-reference rows: [slope, intercept]
    gs[:-1] += eg[:, :d]
    gi[:-1] += eg[:, d]
    ee = noise("experts", K, d + 1)
    es = e.slope[idx] + ee[:, :d]
    ei = e.intercept[idx] + ee[:, d]
    ev = noise("variance", K, 1)[:, 0]
    var = e.variance[idx] + ev.abs() if spec["variance"]["mode"] == "additive-abs" else e.variance[idx] * ev.exp()
    tau = getattr(g, "temperature", None)
    if tau is not None and fit.gate_options.get("learn_temperature"):
        tau = tau * (_sd(spec["temperature"], n) * torch.randn((), generator=generator, dtype=DTYPE)).exp()
    return gs, gi, es, ei, var, tau


def gaussian_start(truth, fit, seeds, n=None):
    """Truth-perturbed starts of a Gaussian-gated fit, one per seed (batch shape (len(seeds),)).

    With a ``[fit.start]`` table (the CRPE-GMoE design, ``init_params_GLLiM`` re-implemented
    from its description): atoms by ``assign`` ("resample-all" there: K uniform draws until
    every true expert appears); π_i = π*_j / copies ("split"; "copy" keeps π*_j, then
    renormalised); c, A, b + N(0, s²) per coefficient with s = sd·n^n_power of groups ``gate``
    (c) and ``experts`` (A, b); Γ + diag|N(0, s²)| (group ``covariance``); ν + |N(0, s²)|
    (group ``variance``, "additive-abs"; "multiplicative": ν·exp(N(0, s²))).
    Without it (moelab's start): "cover", split masses, N(0, p²) on c, A, b and Γ, ν
    multiplied by exp(N(0, p²)), p = ``fit.perturbation``.

    Raises
    ------
    ValueError
        ``fit.start`` is given without ``n``.
    """
    g, e = truth.gate, truth.experts
    Kt, K, d = truth.n_experts, fit.n_experts, truth.n_features
    spec = fit.start
    if spec is not None and n is None:
        raise ValueError(f"setting {fit.name!r} has a [fit.start] table, whose noise depends on n; pass n")
    out = {k: [] for k in ("pi", "c", "G", "A", "b", "nu")}
    eye = torch.eye(d, dtype=DTYPE)
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        atoms = assign_atoms(Kt, K, spec["assign"] if spec else "cover", gen)
        idx = torch.tensor(atoms)
        counts = torch.bincount(idx, minlength=Kt).to(DTYPE)
        pi = g.proportions[idx] / (counts[idx] if spec is None or spec["mass"] == "split" else 1.0)
        sd = (lambda grp: _sd(spec[grp], n)) if spec else (lambda grp: fit.perturbation)  # noqa: E731
        noise = lambda grp, *shape: sd(grp) * torch.randn(*shape, generator=gen, dtype=DTYPE)  # noqa: E731
        c = g.means[idx] + noise("gate", K, d)
        if spec is not None:
            G = g.covariances[idx] + noise("covariance", K, d).abs().unsqueeze(-1) * eye
        else:
            G = g.covariances[idx] * noise("gate", K, 1, 1).exp()
        A = e.slope[idx] + noise("experts", K, d)
        b = e.intercept[idx] + noise("experts", K)
        if spec is not None and spec["variance"]["mode"] == "additive-abs":
            nu = e.variance[idx] + noise("variance", K).abs()
        else:
            nu = e.variance[idx] * noise("variance", K).exp()
        for k, v in zip(out, (pi / pi.sum(), c, G, A, b, nu)):
            out[k].append(v)
    S = {k: torch.stack(v) for k, v in out.items()}
    opts = {k: v for k, v in fit.gate_options.items() if k in {o.name for o in type(g).options}}
    from ..experts import GaussianExperts
    from ..model import GaussianMoE

    return GaussianMoE(type(g)(S["pi"], S["c"], S["G"], **opts), GaussianExperts(S["A"], S["b"], S["nu"]))
