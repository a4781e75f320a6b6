"""EM throughput: moelab's batched EM vs a plain NumPy/SciPy EM, and vs a memory roofline.

Problem (the ``softmax-2023`` truth, ``src/moelab/presets/softmax-2023.toml``):
x ~ Uniform(0, 1); gate logits −8 + 25x (expert 1) and 0 (expert 2, reference);
expert means 15 − 20x and −5 + 20x, standard deviations 0.3 and 0.4. Each
replicate is fitted with 3 experts (over-specified) from one truth-perturbed
start (fixed seed, the same start for both contenders), for exactly
``--iters`` EM iterations (M-steps) with no early stopping, so the work is
equal.

Contenders, timed in the same run, taking turns in each round (median of
``--repeats`` rounds after one warm-up call of each moelab contender):

* **moelab** — ``moelab.fit_em(x, y, 3, init_model=GaussianMoE(...), max_iter=iters,
  tol=0, compile=True)``: all replicates in one batch of shape (R,), each EM
  iteration one fused pass over the data compiled by ``torch.compile``
  (``src/moelab/_fused.py``). ``tol=0`` runs exactly ``iters`` iterations. The
  warm-up call compiles (or loads Inductor's on-disk cache); its extra time is
  reported as ``compile s`` and is not in ``moelab s``. ``--compile off``
  times the eager loop instead.
* **moelab eager** (``--eager``) — the same call with ``compile=False``: the
  eager PyTorch loop, shown side by side.
* **baseline** — ``benchmarks/baseline_numpy_em.py``: the same algorithm,
  one replicate at a time, NumPy/SciPy float64. Its final log-likelihoods
  must match moelab's to ``--rtol`` (default 1e-6, relative) or the run fails.

Roofline. Each EM iteration must at least read x and y once and write then
read back the (n, K) responsibilities, in float64::

    bytes/iteration ≥ 8 · R · n · (d + 1 + 2K)      (d = 1, K = 3: 64 bytes per sample)

(x: d values, y: 1 value, responsibilities written by the E-step and read by
the M-step: 2K values per sample. This ignores the gate line search's extra
pass and every intermediate, so it is a lower bound on traffic; a fused
kernel that accumulates the M-step statistics inside the E-step could go
below it.) The machine's bandwidth B is measured in the same run as the best
of several copies of a 512 MB NumPy array (bytes read + bytes written). The
roofline time is bytes/B per iteration; ``roofline`` = roofline time /
measured time (1.0 would be bandwidth-bound with no wasted traffic).

Throughput = R · n · K · iterations / seconds (sample·expert·iterations per
second, summed over replicates).

Run::

    python benchmarks/em_throughput.py                    # table, n = 1e3, 1e4, 1e5
    python benchmarks/em_throughput.py --json             # one JSON object (speedup_n1e4)
    python benchmarks/em_throughput.py --sizes 1000 10000 --replicates 40 --iters 200 --threads 1
    # the README's table (eager loop side by side up to n = 1e4, baseline extrapolated at 1e5)
    python benchmarks/em_throughput.py --sizes 1000 10000 100000 --baseline-max-n 10000 --eager --eager-max-n 10000

``--baseline-max-n N`` skips the baseline above N and extrapolates it
linearly in n from the largest size run; such cells are marked
"(extrapolated)" and the log-likelihood check is not done for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline_numpy_em as baseline  # noqa: E402

import moelab  # noqa: E402
from moelab import GaussianExperts, GaussianMoE, SoftmaxGate, fit_em  # noqa: E402

K_FIT = 3
REG_VARIANCE = 1e-6  # fit_em's default; the baseline uses the same floor
TRUTH = dict(gate_slope=25.0, gate_intercept=-8.0, slope=(-20.0, 20.0), intercept=(15.0, -5.0), sd=(0.3, 0.4))


# ------------------------------------------------------------------ problem
def simulate(n: int, replicates: int, seed: int):
    """x (R, n), y (R, n) from the softmax-2023 truth (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (replicates, n))
    p1 = 1.0 / (1.0 + np.exp(-(TRUTH["gate_intercept"] + TRUTH["gate_slope"] * x)))
    first = rng.uniform(size=(replicates, n)) < p1
    noise = rng.standard_normal((replicates, n))
    m1 = TRUTH["intercept"][0] + TRUTH["slope"][0] * x
    m2 = TRUTH["intercept"][1] + TRUTH["slope"][1] * x
    y = np.where(first, m1 + TRUTH["sd"][0] * noise, m2 + TRUTH["sd"][1] * noise)
    return x, y


def make_starts(replicates: int, seed: int) -> dict:
    """One truth-perturbed 3-expert start per replicate (original units, reference row zero).

    Expert 1 of the truth is split in two (gate intercepts −8 − log 2 each),
    expert 2 becomes expert 3 (the reference); then every parameter is
    perturbed by Gaussian noise (about 10% of its scale).
    """
    rng = np.random.default_rng(seed)
    R, K = replicates, K_FIT
    zero_row = lambda a: np.concatenate([a, np.zeros_like(a[:, :1])], 1)  # noqa: E731
    b1, b0 = TRUTH["gate_slope"], TRUTH["gate_intercept"] - math.log(2.0)
    return dict(
        gate_slope=zero_row(np.array([[b1], [b1]]) + rng.normal(0, 2.5, (R, 2, 1))),
        gate_intercept=zero_row(np.array([b0, b0]) + rng.normal(0, 0.8, (R, 2))),
        slope=np.array([[-20.0], [-20.0], [20.0]]) + rng.normal(0, 2.0, (R, K, 1)),
        intercept=np.array([15.0, 15.0, -5.0]) + rng.normal(0, 1.5, (R, K)),
        variance=np.array([0.09, 0.09, 0.16]) * np.exp(rng.normal(0, 0.1, (R, K))),
    )


def start_model(starts: dict) -> GaussianMoE:
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    return GaussianMoE(SoftmaxGate(t(starts["gate_slope"]), t(starts["gate_intercept"])),
                       GaussianExperts(t(starts["slope"]), t(starts["intercept"]), t(starts["variance"])))


# ------------------------------------------------------------------ contenders
def moelab_fit(x, y, model0, iters, compile=True):
    """fit_em with early stopping off (tol=0) → (loglik (R,), M-steps (R,))."""
    res = fit_em(x, y, K_FIT, init_model=model0, max_iter=iters, tol=0, warn=False, compile=compile,
                 accelerate=None)
    return res.loglik.numpy(), res.n_iter.numpy()


def run_baseline(x, y, starts, iters):
    return baseline.fit_replicates(x, y, starts, iters, REG_VARIANCE), None


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------ roofline
def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Best copy bandwidth in bytes/s (bytes read + bytes written) of a ``megabytes`` float64 array."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def min_bytes_per_iteration(replicates: int, n: int, K: int, d: int = 1) -> int:
    """Lower bound on memory traffic of one EM iteration (see the module docstring)."""
    return 8 * replicates * n * (d + 1 + 2 * K)


# ------------------------------------------------------------------ main
def bench_size(n, args, bandwidth):
    x, y = simulate(n, args.replicates, args.seed + n)
    starts = make_starts(args.replicates, args.seed)
    model0 = start_model(starts)
    xt = torch.as_tensor(x).unsqueeze(-1)
    yt = torch.as_tensor(y)
    iters = args.iters
    compiled = args.compile == "on"
    # warm-up: compiles the fused kernels (or loads them from Inductor's cache)
    t_first, _ = timed(moelab_fit, xt, yt, model0, iters, compiled)
    eager = args.eager and (args.eager_max_n is None or n <= args.eager_max_n)
    if eager:
        timed(moelab_fit, xt, yt, model0, iters, False)
    run_base = args.baseline_max_n is None or n <= args.baseline_max_n
    t_m, t_e, t_b, loads = [], [], [], []
    ll_b = ll_e = None
    for _ in range(args.repeats):
        loads.append(os.getloadavg()[0])
        s, (ll_m, steps) = timed(moelab_fit, xt, yt, model0, iters, compiled)
        t_m.append(s)
        if eager:
            s, (ll_e, _) = timed(moelab_fit, xt, yt, model0, iters, False)
            t_e.append(s)
        if run_base:
            s, (ll_b, _) = timed(run_baseline, x, y, starts, iters)
            t_b.append(s)
    if not (steps == iters).all():
        raise SystemExit(f"n={n}: moelab ran {steps.min()}..{steps.max()} iterations, not {iters}")
    row = dict(n=n, replicates=args.replicates, iters=iters, compiled=compiled,
               mstep_min=int(steps.min()), mstep_total=int(steps.sum()),
               moelab_s=statistics.median(t_m), moelab_all_s=t_m,
               compile_s=max(t_first - statistics.median(t_m), 0.0),
               eager_s=statistics.median(t_e) if t_e else None,
               load1=statistics.median(loads), loads=loads)
    if ll_e is not None:
        row["eager_loglik_max_rel_diff"] = float((np.abs(ll_m - ll_e) / np.abs(ll_e)).max())
    if run_base:
        rel = np.abs(ll_m - ll_b) / np.abs(ll_b)
        row.update(baseline_s=statistics.median(t_b), baseline_all_s=t_b, baseline_extrapolated=False,
                   loglik_max_rel_diff=float(rel.max()), loglik_mean_moelab=float(ll_m.mean()),
                   loglik_mean_baseline=float(ll_b.mean()))
        if not rel.max() <= args.rtol:
            raise SystemExit(f"n={n}: log-likelihoods differ by {rel.max():.3g} (relative) > {args.rtol:g}; "
                             f"replicates {np.nonzero(rel > args.rtol)[0].tolist()}")
    else:
        row.update(baseline_s=None, baseline_extrapolated=True, loglik_max_rel_diff=None,
                   loglik_mean_moelab=float(ll_m.mean()))
    work = args.replicates * n * K_FIT * iters
    row["throughput"] = work / row["moelab_s"]
    row["min_bytes_per_iter"] = min_bytes_per_iteration(args.replicates, n, K_FIT)
    row["roofline_s"] = row["min_bytes_per_iter"] * iters / bandwidth
    row["roofline_fraction"] = row["roofline_s"] / row["moelab_s"]
    return row


def fill_extrapolated(rows):
    measured = [r for r in rows if not r["baseline_extrapolated"]]
    for r in rows:
        if r["baseline_extrapolated"]:
            if not measured:
                continue
            ref = max(measured, key=lambda m: m["n"])
            r["baseline_s"] = ref["baseline_s"] * r["n"] / ref["n"]
    for r in rows:
        r["speedup"] = r["baseline_s"] / r["moelab_s"] if r["baseline_s"] else None
        r["baseline_throughput"] = (r["replicates"] * r["n"] * K_FIT * r["iters"] / r["baseline_s"]) if r["baseline_s"] else None


def format_table(result) -> str:
    lines = [
        f"EM throughput: softmax-2023 truth, {K_FIT} experts, {result['replicates']} replicates, "
        f"{result['iters']} EM iterations, float64, torch threads {result['threads']}, "
        f"moelab {'compiled (fused)' if result['compile'] == 'on' else 'eager'}",
        f"copy bandwidth {result['bandwidth_GBps']:.2f} GB/s; roofline bytes/iteration = 8·R·n·(d+1+2K)",
        "",
        f"{'n':>8} {'moelab s':>9} {'compile s':>9} {'eager s':>8} {'baseline s':>14} {'speed-up':>9} "
        f"{'vs eager':>8} {'Mse·it/s':>9} {'base Mse·it/s':>13} {'roofline':>8} {'ll rel diff':>11} {'load1':>6}",
    ]
    for r in result["rows"]:
        b = "-" if r["baseline_s"] is None else f"{r['baseline_s']:.2f}" + ("(extrap.)" if r["baseline_extrapolated"] else "")
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        bt = "-" if r["baseline_throughput"] is None else f"{r['baseline_throughput'] / 1e6:.2f}"
        dl = "-" if r["loglik_max_rel_diff"] is None else f"{r['loglik_max_rel_diff']:.1e}"
        es = "-" if r["eager_s"] is None else f"{r['eager_s']:.2f}"
        ev = "-" if r["eager_s"] is None else f"{r['eager_s'] / r['moelab_s']:.1f}x"
        lines.append(f"{r['n']:>8} {r['moelab_s']:>9.3f} {r['compile_s']:>9.1f} {es:>8} {b:>14} {sp:>9} {ev:>8} "
                     f"{r['throughput'] / 1e6:>9.2f} {bt:>13} {r['roofline_fraction']:>8.3f} {dl:>11} {r['load1']:>6.2f}")
    lines.append("")
    lines.append("Mse·it/s = 10^6 sample·expert·iterations per second (all replicates); roofline = "
                 "(minimum bytes / bandwidth) / moelab time; compile s = first call − median call (one-off per "
                 "process, Inductor caches it on disk); vs eager = moelab eager s / moelab s; load1 = 1-minute "
                 "load average during the timings.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], metavar="N")
    ap.add_argument("--replicates", type=int, default=40)
    ap.add_argument("--iters", type=int, default=200, help="EM iterations (M-steps), no early stopping")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds per size (median reported)")
    ap.add_argument("--baseline-max-n", type=int, default=None,
                    help="run the baseline only up to this n; larger sizes are extrapolated linearly (labelled)")
    ap.add_argument("--compile", choices=("on", "off"), default="on",
                    help="moelab contender: fused compiled EM (fit_em compile=True, default) or the eager loop")
    ap.add_argument("--eager", action="store_true", help="also time moelab's eager loop (compile=False) side by side")
    ap.add_argument("--eager-max-n", type=int, default=None, metavar="N",
                    help="with --eager, time the eager loop only for sizes up to N (it is slow at large n)")
    ap.add_argument("--rtol", type=float, default=1e-6, help="required agreement of the log-likelihoods")
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:  # keep NumPy's BLAS on the same number of threads
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:  # pragma: no cover
            pass
    warnings.simplefilter("ignore", moelab.ConvergenceWarning)
    bandwidth = measure_bandwidth()
    rows = [bench_size(n, args, bandwidth) for n in args.sizes]
    fill_extrapolated(rows)
    result = dict(
        command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
        replicates=args.replicates, iters=args.iters, experts=K_FIT, threads=torch.get_num_threads(), compile=args.compile,
        bandwidth_GBps=bandwidth / 1e9, uptime=os.getloadavg(), torch=torch.__version__, numpy=np.__version__,
        machine=platform.processor() or platform.machine(), rows=rows,
    )
    by_n = {r["n"]: r for r in rows}
    result["speedup_n1e4"] = by_n[10000]["speedup"] if 10000 in by_n else None
    result["roofline_fraction_n1e5"] = by_n[100000]["roofline_fraction"] if 100000 in by_n else None
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
