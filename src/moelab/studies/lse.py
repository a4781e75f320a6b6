"""Least-squares settings of a study (``estimator = "lse"``): starts near the truth, fits, metrics.

A regression truth (``[truth.experts] kind = "relu"``, ``noise_sd``) is a
:class:`moelab.RegressionMoE`; its data are y = f*(x) + ε with x drawn as for
every study (:mod:`moelab.studies.simulate`). Each batch of replicates is one
:func:`moelab.fit_lse` call, started near the truth (:func:`truth_perturbed`),
and every fit is measured by

* ``loss_D1`` (every exponent 1) and ``loss_D2`` (:func:`moelab.metrics.lse_loss`,
  exponent 2 on multi-atom cells), the per-parameter errors
  (:func:`moelab.metrics.parameter_errors`; no variance group), and
* ``regression_l2``: ‖f̂ − f*‖ in L²(μ) over the study's x points
  (:func:`moelab.metrics.regression_distance`).

``loglik``, ``hellinger`` and ``tv`` are left empty (a least-squares fit has no
density); the fit's mean squared error is not a column of the results table.
"""

from __future__ import annotations

import time
import warnings
from typing import List, Sequence

import torch

from ..lse import fit_lse
from ..metrics import d1_loss, lse_loss, parameter_errors, regression_distance
from ..regression import RegressionExperts, RegressionMoE

__all__ = ["truth_perturbed", "fit_batch"]

DTYPE = torch.float64


def truth_perturbed(truth: RegressionMoE, fit, seeds: Sequence[int]) -> RegressionMoE:
    """Starts near the truth for K ≥ K* fitted experts, one per seed (batch shape (len(seeds),)).

    moelab's start, as for Gaussian truths (:func:`moelab.studies.simulate.truth_perturbed`):
    every true expert once plus K − K* uniformly drawn copies; a true expert's mass is shared
    equally by its copies (softmax: β_0 − log c; sigmoid: sigmoid(β_0')= sigmoid(β_0)/c, the
    weight at x = 0 divided by the number of copies c); then N(0, perturbation²) on every gate
    and expert coefficient. Softmax starts are re-expressed with the last expert (a copy of the
    true reference) as reference.
    """
    g, e = truth.gate, truth.experts
    Kt, K = truth.n_experts, fit.n_experts
    p = fit.perturbation
    sigmoid = g.name == "sigmoid"
    out = {k: [] for k in ("gs", "gi", "es", "ei")}
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        atoms = list(range(Kt)) + torch.randint(Kt, (K - Kt,), generator=gen).tolist()
        counts = torch.bincount(torch.tensor(atoms), minlength=Kt).to(DTYPE)
        order = [a for a in atoms if a != Kt - 1] + [a for a in atoms if a == Kt - 1]
        idx = torch.tensor(order)
        noise = lambda shape: p * torch.randn(shape, generator=gen, dtype=DTYPE)  # noqa: E731
        c = counts[idx]
        gi = torch.logit(torch.sigmoid(g.intercept[idx]) / c) if sigmoid else g.intercept[idx] - c.log()
        gs = g.slope[idx] + noise((K, g.n_features))
        gi = gi + noise((K,))
        if not sigmoid:
            gs, gi = gs - gs[-1], gi - gi[-1]
        out["gs"].append(gs)
        out["gi"].append(gi)
        out["es"].append(e.slope[idx] + noise((K, e.slope.shape[-1])))
        out["ei"].append(e.intercept[idx] + noise((K,)))
    S = {k: torch.stack(v) for k, v in out.items()}
    gate = type(g)(S["gs"], S["gi"])
    return RegressionMoE(gate, RegressionExperts(S["es"], S["ei"], e.kind, e.degree if e.kind == "polynomial" else None))


def fit_batch(x, y, truth: RegressionMoE, fit, starts, base: dict, reps: Sequence[int], xpts, seed: int) -> List[dict]:
    """Fit replicates ``reps`` (x (R, n, d), y (R, n)) by least squares; one results row per replicate."""
    kw = dict(gate=fit.gate, expert=truth.experts.kind, max_iter=fit.max_iter, tol=fit.tol, warn=False, random_state=seed)
    if truth.experts.kind == "polynomial":
        kw["degree"] = truth.experts.degree
    if starts is not None:
        kw["init_model"] = starts
    else:
        kw.update(init=fit.init, n_init=fit.n_init)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit_lse(x, y, fit.n_experts, **kw)
        model = res.model
        with torch.no_grad():
            d1, d2 = d1_loss(model, truth, xpts), lse_loss(model, truth, xpts)
            errs = parameter_errors(model, truth, xpts)
            l2 = regression_distance(model, truth, xpts)
    except Exception as exc:  # recorded, never dropped
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        return [dict(base, replicate=r, status="failed", converged=False, degenerate=False, error=msg,
                     seconds=(time.perf_counter() - t0) / len(reps)) for r in reps]
    seconds = (time.perf_counter() - t0) / len(reps)
    rows = []
    for j, r in enumerate(reps):
        conv = bool(res.converged[j])
        row = dict(base, replicate=r, converged=conv, degenerate=False, status="ok" if conv else "not_converged",
                   n_iter=int(res.n_iter[j]), seconds=seconds, error="", loss_D1=float(d1[j]), loss_D2=float(d2[j]),
                   regression_l2=float(l2[j]))
        row["loss"] = row["loss_D1"] if row["loss_name"] == "D1" else row["loss_D2"]
        for k, v in errs.items():
            row["err_" + k] = float(v[j])
        rows.append(row)
    return rows


#: quantities compared between the sigmoid and the softmax fits (results columns; "loss" is the setting's loss)
COMPARED = ("loss", "err_expert_slope", "err_expert_intercept", "err_gate_slope", "err_gate_mass", "regression_l2")


def _pairs(results):
    """{key: {gate: setting}} pairing settings that differ only by their gate prefix ("relu-over-K3")."""
    pairs = {}
    for (setting, gate), _ in results.groupby(["setting", "gate"], sort=False):
        key = setting[len(gate) + 1:] if setting.startswith(gate + "-") else setting
        pairs.setdefault(key, {})[gate] = setting
    return {k: v for k, v in pairs.items() if {"sigmoid", "softmax"} <= set(v)}


def compare_gates(results, rates):
    """Sigmoid vs softmax on the same data, per paired setting and quantity (moelab's comparison rule).

    Columns: ``setting`` (the pair's key, e.g. ``relu-over-K3``), ``quantity``, ``slope_sigmoid``,
    ``slope_softmax`` (log-log slopes of the mean, with 95% intervals ``ci_*``), ``median_sigmoid``,
    ``median_softmax`` and ``mean_sigmoid``, ``mean_softmax`` over replicates at the largest common n
    (``n_max``), ``ratio`` (softmax / sigmoid median there), ``n_sigmoid_to_match`` (the smallest n of
    the grid at which the sigmoid fit's median is at most the softmax fit's median at ``n_max``: the
    sample size sigmoid gating needs for the error softmax gating has at n_max; NaN if none), and
    ``verdict`` on the published claim "sigmoid gating needs fewer samples": ``consistent`` if the
    sigmoid median is lower at each of the three largest n, ``inconsistent`` if higher at each, else
    ``unclear``. Medians, because a few over-specified fits with diverging gate parameters dominate
    the means.
    """
    import numpy as np
    import pandas as pd

    rows = []
    for key, by in _pairs(results).items():
        for q in COMPARED:
            stats, rr = {}, {}
            for g in ("sigmoid", "softmax"):
                df = results[results["setting"] == by[g]]
                if q not in df:
                    continue
                v = pd.to_numeric(df[q], errors="coerce").groupby(df["n"].astype(int))
                stats[g] = (v.median(), v.mean())
                qname = f"loss_{df['loss_name'].iloc[0]}" if q == "loss" else q
                sel = rates[(rates["setting"] == by[g]) & (rates["quantity"] == qname) & (rates["aggregate"] == "mean")]
                rr[g] = sel.iloc[0] if len(sel) else None
            if len(stats) < 2 or not all(np.isfinite(m[0]).any() for m in stats.values()):
                continue
            common = sorted(set(stats["sigmoid"][0].index) & set(stats["softmax"][0].index))
            s, f = stats["sigmoid"][0][common], stats["softmax"][0][common]
            lower = [bool(s[n] < f[n]) for n in common[-3:]]
            verdict = "consistent" if all(lower) else ("inconsistent" if not any(lower) else "unclear")
            target = f[common[-1]]
            match = [n for n in common if s[n] <= target]
            row = dict(setting=key, quantity=qname, n_max=common[-1], median_sigmoid=float(s[common[-1]]),
                       median_softmax=float(target), mean_sigmoid=float(stats["sigmoid"][1][common[-1]]),
                       mean_softmax=float(stats["softmax"][1][common[-1]]), ratio=float(target / s[common[-1]]),
                       n_sigmoid_to_match=float(match[0]) if match else float("nan"), verdict=verdict)
            for g in ("sigmoid", "softmax"):
                r = rr.get(g)
                row[f"slope_{g}"] = float(r["slope"]) if r is not None else float("nan")
                row[f"ci_{g}"] = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r is not None else ""
            rows.append(row)
    cols = ["setting", "quantity", "slope_sigmoid", "ci_sigmoid", "slope_softmax", "ci_softmax", "n_max", "median_sigmoid",
            "median_softmax", "mean_sigmoid", "mean_softmax", "ratio", "n_sigmoid_to_match", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def plot_gate_comparison(results, path, title: str, quantities=("loss", "err_expert_slope", "err_expert_intercept")) -> None:
    """One row per paired setting, one panel per quantity: median over replicates (10–90% band), sigmoid vs softmax."""
    import numpy as np
    import pandas as pd

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import DPI, FONT  # the report's figure conventions
    pairs = _pairs(results)
    if not pairs:
        return
    fig, axes = plt.subplots(len(pairs), len(quantities), figsize=(6.0 * len(quantities), 4.2 * len(pairs)), squeeze=False)
    for i, (key, by) in enumerate(pairs.items()):
        for j, q in enumerate(quantities):
            ax = axes[i, j]
            for g, c in (("sigmoid", "C0"), ("softmax", "C3")):
                df = results[results["setting"] == by[g]]
                v = pd.to_numeric(df[q], errors="coerce")
                m = v.groupby(df["n"].astype(int)).median()
                lo, hi = v.groupby(df["n"].astype(int)).quantile(0.1), v.groupby(df["n"].astype(int)).quantile(0.9)
                if np.isfinite(m).any():
                    ax.fill_between(lo.index, lo.values, hi.values, color=c, alpha=0.15, lw=0)
                    ax.plot(m.index, m.values, "o-", color=c, lw=2, ms=6, label=f"{g} gate (median, 10-90%)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            name = f"loss_{results[results['setting'] == by['sigmoid']]['loss_name'].iloc[0]}" if q == "loss" else q
            ax.set_title(f"{key}: {name}", fontsize=FONT["title"] - 2)
            ax.set_xlabel("n", fontsize=FONT["label"])
            ax.tick_params(labelsize=FONT["tick"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=FONT["legend"])
    fig.suptitle(f"{title}: sigmoid vs softmax gating on the same data (median over replicates)", fontsize=FONT["suptitle"])
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / len(pairs) / 4.2))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
