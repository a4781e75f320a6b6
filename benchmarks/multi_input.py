"""A multi-input default fit (issue 11 item 4): every start run to convergence vs racing the starts.

Fits ``price ~ carat + depth + table`` on the first ``--rows`` rows of the
bundled diamonds data (default 6,000) with 3 experts and fit_em's defaults
(160 starts, tol 1e-8, compile="auto"):

* ``all starts`` — ``fit_em(...)``: every start to convergence (the default, SQUAREM-accelerated);
* ``plain EM`` — ``fit_em(..., accelerate=None)``: the same without acceleration;
* ``racing`` — ``fit_em(..., prune_starts=True)``: starts that cannot reach the
  best converged valid start are stopped (:mod:`moelab.racing`).

The cases take turns ``--repeats`` times after one warm-up (which compiles the
fused kernels if "auto" chooses them); the median wall seconds, the
log-likelihood, the starts stopped early and the summed start-iterations are printed.
``--per-iteration`` also measures the eager and fused EM cost per
sample·expert·iteration at 160 starts (the constants of :mod:`moelab.autocompile`).

Run::

    python benchmarks/multi_input.py --repeats 3
    python benchmarks/multi_input.py --rows 53940 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import moelab
from moelab import em as em_mod

CASES = (("all starts (default: SQUAREM)", dict()), ("plain EM (accelerate=None)", dict(accelerate=None)),
         ("racing (prune_starts=True)", dict(prune_starts=True)))


def _fit(x, y, kw, seed):
    cap = {}
    orig = em_mod._run_em

    def run(*a, **k):
        out = orig(*a, **k)
        cap["iters"] = int(out[2].sum())
        return out

    em_mod._run_em = run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, c = time.perf_counter(), time.process_time()
            res = moelab.fit_em(x, y, 3, random_state=seed, **kw)
            cap["cpu"] = time.process_time() - c
            return time.perf_counter() - t, res, cap["iters"], cap["cpu"]
    finally:
        em_mod._run_em = orig


def per_iteration(x, y, R=160, iters=20):
    """ns per sample·expert·iteration of the eager loop and the fused pass, R starts, exactly ``iters`` iterations."""
    out = {}
    for name, comp in (("eager", False), ("fused", True)):
        kw = dict(n_init=R, init="kmeans", max_iter=iters, tol=0.0, compile=comp, prune_starts=False, warn=False)
        moelab.fit_em(x, y, 3, random_state=0, **dict(kw, max_iter=2))  # warm-up / compile
        t = time.perf_counter()
        moelab.fit_em(x, y, 3, random_state=0, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        moelab.fit_em(x, y, 3, random_state=0, **dict(kw, max_iter=0))
        t0 = time.perf_counter() - t  # starts only
        out[name] = (t1 - t0) / (R * x.shape[0] * 3 * iters) * 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-iteration", action="store_true")
    args = ap.parse_args(argv)
    df = moelab.load_dataset("diamonds").iloc[: args.rows]
    x = torch.tensor(df[["carat", "depth", "table"]].to_numpy(), dtype=torch.float64)
    y = torch.tensor(df["price"].to_numpy(), dtype=torch.float64)
    print(f"diamonds[:{args.rows}], price ~ carat + depth + table, 3 experts; load {os.getloadavg()[0]:.1f}")
    _fit(x, y, CASES[2][1], args.seed)  # warm-up (compiles)
    times = {name: [] for name, _ in CASES}
    cpus = {}
    info = {}
    for _ in range(args.repeats):
        for name, kw in CASES:
            s, res, iters, cpu = _fit(x, y, kw, args.seed)
            times[name].append(s)
            cpus.setdefault(name, []).append(cpu)
            info[name] = (float(res.loglik), res.settings["starts_stopped_early"], iters, res.settings["compiled"])
    print("| case | median wall s | median CPU s | log-likelihood | starts stopped early | start-iterations | fused |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in CASES:
        ll, stopped, iters, fused = info[name]
        print(f"| {name} | {statistics.median(times[name]):.2f} | {statistics.median(cpus[name]):.2f} | {ll:.4f} | "
              f"{stopped} | {iters} | {fused} |")
    if args.per_iteration:
        ns = per_iteration(x, y)
        print(f"per sample·expert·iteration at 160 starts: eager {ns['eager']:.1f} ns, fused {ns['fused']:.1f} ns")
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
