"""Compare the authors' Voronoi loss (CRPE-SGaME, discrepancies.py) with moelab's D1/D2 on the same fits.

The fits are those of the ``softmax-2023-paper`` preset: fixed design
x = linspace(0, 1, n), the authors' near-truth starts (assignment redrawn until
every true expert is covered, each copy keeping the true gate logit,
n-dependent noise), EM stopped at a relative log-likelihood change of 1e-6.
Every try is fitted and kept (K = 3: 5 tries per replicate), so the loss can be
read per try and for the best-of-5 fit the study keeps.

The authors' function is imported from a local copy of their repository (no
network access here; moelab does not ship their code)::

    git clone https://github.com/Trung-TinNGUYEN/CRPE-SGaME /tmp/crpe
    python benchmarks/authors_loss.py --crpe /tmp/crpe

Their ``loss_SGaME_exact(betas, As, Sigmas, beta, A, Sigma)`` takes gate
parameters (2, K) (row 0 intercept, row 1 slope; last column the zero
reference), expert parameters (2, K) (row 0 intercept, row 1 slope) and
variances (1, K), true ones first; it uses *unnormalised* masses exp(β₀).
moelab's losses normalise the masses (exp β₀ / Σ exp β₀).

Prints, per n and setting: how many tries start with the reference expert
duplicated, how many fitted models have two or more atoms in the reference's
Voronoi cell, both losses, and their relative difference where no reference
duplication is involved.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from moelab import fit_em
from moelab.metrics import d1_loss, d2_loss, voronoi_cells
from moelab.studies import load_preset
from moelab.studies.runner import start_seeds
from moelab.studies.simulate import simulate_cells, true_model, truth_perturbed


def _authors_loss_fn(crpe: Path):
    path = crpe / "discrepancies.py"
    if not path.exists():
        sys.exit(f"{path} not found: pass --crpe, a local checkout of github.com/Trung-TinNGUYEN/CRPE-SGaME")
    spec = importlib.util.spec_from_file_location("crpe_discrepancies", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.loss_SGaME_exact


def _to_authors(model, b):
    """moelab model (batch index b) → the authors' (beta, A, Sigma) arrays."""
    g, e = model.gate, model.experts
    beta = np.stack([g.intercept[b].numpy(), g.slope[b, :, 0].numpy()])  # (2, K), last column 0
    A = np.stack([e.intercept[b].numpy(), e.slope[b, :, 0].numpy()])  # (2, K)
    return beta, A, e.variance[b].numpy()[None, :]


def _rule_draws(K: int, Ks: int, draws: int, seed: int) -> float:
    """Share of starts that duplicate the reference under the authors' assignment rule,
    re-implemented independently of moelab: K uniform draws in 1..Ks, the last set to Ks,
    redrawn until all Ks values appear."""
    rng = np.random.default_rng(seed)
    dup = 0
    for _ in range(draws):
        while True:
            s = rng.integers(1, Ks + 1, size=K)
            s[-1] = Ks
            if len(set(s.tolist())) == Ks:
                break
        dup += int((s == Ks).sum() > 1)
    return dup / draws


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crpe", type=Path, required=True, help="local checkout of CRPE-SGaME")
    ap.add_argument("--n", type=int, nargs="+", default=[10000, 31623, 100000])
    ap.add_argument("--replicates", type=int, default=8)
    args = ap.parse_args(argv)
    loss_authors = _authors_loss_fn(args.crpe)

    for K in (3, 4):
        print(f"authors' assignment rule, K={K}: reference duplicated in {_rule_draws(K, 2, 20000, K):.4f} "
              "of 20000 starts (independent re-implementation)")

    (study,) = load_preset("softmax-2023-paper")
    truth = true_model(study.truth)
    betas = np.array([[-8.0, 0.0], [25.0, 0.0]])
    As = np.array([[15.0, -5.0], [-20.0, 20.0]])
    Sigmas = np.array([[0.3, 0.4]]) ** 2  # as their params_to_metric_SGaME.py passes Sigmas**2
    reps = list(range(args.replicates))
    print("\nsetting n  tries  start_ref_dup  fit_ref_cell>1  kept_ref_cell>1  | theirs (ref dup: median [min, max]) "
          "| no ref dup: moelab, theirs, rel. diff median [max]")
    for fi, fit in enumerate(study.fits[:2]):  # exact-K2, over-K3
        for n in args.n:
            x, y = simulate_cells(study, truth, n, reps)
            T = fit.tries
            seeds = [s for r in reps for s in start_seeds(study, fi, n, r, T)]
            starts = truth_perturbed(truth, fit, seeds, n)  # (R*T,), replicate-major
            xr, yr = x.repeat_interleave(T, 0), y.repeat_interleave(T, 0)
            res = fit_em(xr, yr, fit.n_experts, init_model=starts, max_iter=fit.max_iter, tol=fit.tol,
                         convergence=fit.convergence, accelerate=None if fit.accelerate == "off" else fit.accelerate,
                         warn=False)
            m = res.model
            ours = (d1_loss if fit.n_experts == 2 else d2_loss)(m, truth).numpy()
            theirs = np.array([loss_authors(betas, As, Sigmas, *_to_authors(m, b)) for b in range(len(seeds))])
            start_dup = (starts.experts.intercept < 5).sum(-1).numpy() > 1  # copies of the reference (b* = -5)
            cells = voronoi_cells(m, truth)
            ref_cell = (cells == 1).sum(-1).numpy() > 1
            best = res.loglik.reshape(len(reps), T).argmax(-1).numpy() + np.arange(len(reps)) * T
            clean = ~ref_cell
            rel = np.abs(theirs[clean] - ours[clean]) / ours[clean]
            dup_txt = (f"{np.median(theirs[ref_cell]):.4f} [{theirs[ref_cell].min():.4f}, {theirs[ref_cell].max():.4f}]"
                       if ref_cell.any() else "-")
            print(f"{fit.name} {n} {len(seeds)} {start_dup.sum()}/{len(seeds)} {ref_cell.sum()}/{len(seeds)} "
                  f"{ref_cell[best].sum()}/{len(reps)} | {dup_txt} | "
                  f"{np.median(ours[clean]):.3e} {np.median(theirs[clean]):.3e} {np.median(rel):.2e} [{rel.max():.2e}]")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
