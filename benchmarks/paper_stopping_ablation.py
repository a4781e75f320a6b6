"""The softmax-2023-paper over-specified fits under two stopping rules (same data, same starts).

Runs the K=3 setting of the ``softmax-2023-paper`` preset (the authors' design:
fixed x, their near-truth starts, best of 5 tries) at a few n, once with the
authors' rule (relative log-likelihood change < 1e-6) and once with moelab's
softmax-2023 rule (change of the mean log-likelihood < 1e-10); at most 2000
EM iterations either way. Every fit uses the fused kernel (``compile=True``),
which gives the eager loop's fits to rounding. About 6-7 minutes on 2 cores::

    python benchmarks/paper_stopping_ablation.py --out /tmp/ablate
"""

from __future__ import annotations

import argparse
import shutil
import time
from functools import partial
from pathlib import Path

import pandas as pd

from moelab import fit_em
from moelab.studies import load_preset, run_study
from moelab.studies import runner as runner_mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[10000, 31623, 100000])
    ap.add_argument("--replicates", type=int, default=6)
    args = ap.parse_args(argv)
    runner_mod.fit_em = partial(fit_em, compile=True)
    for rule, tol in (("relative", 1e-6), ("mean", 1e-10)):
        (s,) = load_preset("softmax-2023-paper")
        s.fits = [f for f in s.fits if f.name == "over-K3"]
        s.fits[0].n, s.fits[0].convergence, s.fits[0].tol = list(args.n), rule, tol
        s.replicates, s.name = args.replicates, f"ablate-{rule}"
        out = args.out / rule
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        res = run_study(s, out, progress=False)
        print(f"\n{rule} (tol {tol:g}): {time.perf_counter() - t:.0f} s; status {res.status.value_counts().to_dict()}")
        g = res.groupby("n")
        print(pd.DataFrame({"iterations": g.n_iter.mean(), "D2 median": g.loss.median(), "hellinger median": g.hellinger.median(),
                            "err_gate_slope median": g.err_gate_slope.median()}).to_string(float_format=lambda v: f"{v:.3g}"))
        rates = pd.read_csv(out / "rates.csv")
        print(rates[["quantity", "aggregate", "slope", "ci_low", "ci_high"]].to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
