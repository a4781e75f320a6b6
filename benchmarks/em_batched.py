"""Eager EM: per-problem time of a batch of B problems against one problem at a time, code before vs after.

Issue 11 item 2: the eager loop materialised (B, K, n) temporaries, which leave
the CPU cache at large B·n, so a batch of problems could cost more per problem
than fitting them one at a time. The one-pass iteration (``moelab/_fused``)
runs eagerly on blocks of samples instead (each temporary ~256 KiB).

Problem: the ``softmax-2023`` truth (as ``benchmarks/em_throughput.py``), 3
fitted experts, d = 1, one truth-perturbed start per problem, exactly
``iters`` EM iterations (``tol=0``), ``compile=False`` (the eager loop),
float64. Per configuration (n, B): the CPU seconds of one ``fit_em`` call on B
problems divided by B, and the mean CPU seconds of B calls fitting the same
problems one at a time ("single").

Code versions are compared side by side in one run: each round runs one
worker process per version (``PYTHONPATH`` = that tree), versions taking
turns, all configurations in each worker; medians over ``--repeats`` rounds.
Per-process CPU time (``time.process_time``) with ``--threads`` torch threads,
so other load on the machine inflates the numbers less than wall time.

Run::

    python benchmarks/em_batched.py --before /work/main --after .         # the README table
    python benchmarks/em_batched.py --after . --sizes 1000 10000 --batches 8 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _iters_for(n: int, base: int) -> int:
    """Fewer iterations at large n keep a round short (the per-iteration cost is what is compared)."""
    return max(3, base * 1000 // max(n, 1000)) if n > 10_000 else base


def worker(sizes, batches, iters, threads, seed):
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import em_throughput as et  # simulate / make_starts / start_model (the softmax-2023 truth)

    from moelab import fit_em

    torch.set_num_threads(threads)
    out = {}
    for n in sizes:
        it = _iters_for(n, iters)
        B = max(batches)
        x, y = et.simulate(n, B, seed + n)
        starts = et.make_starts(B, seed)
        xt, yt = torch.as_tensor(x).unsqueeze(-1), torch.as_tensor(y)
        model = et.start_model(starts)

        def fit(i, b):
            """Problems i .. i+b−1 in one call: CPU seconds per problem, log-likelihood of problem i."""
            sel = lambda t: t[i : i + b]  # noqa: E731
            sub = model.__class__(model.gate.map_tensors(sel), model.experts.map_tensors(sel))
            t0 = time.process_time()
            res = fit_em(sel(xt), sel(yt), 3, init_model=sub, max_iter=it, tol=0, warn=False, compile=False,
                         accelerate=None)
            dt = time.process_time() - t0
            assert not res.settings.get("compiled", False)
            return dt / b, float(res.loglik[0])

        fit(0, 1)  # warm-up (imports, allocator)
        singles = [fit(i, 1) for i in range(B)]  # every problem on its own
        out[f"{n}/1"] = dict(seconds=singles[0][0], iters=it, loglik0=singles[0][1])
        for b in batches:
            t, llb = fit(0, b)
            # one at a time: the same b problems, each fitted alone (mean per problem)
            out[f"{n}/{b}"] = dict(seconds=t, single=sum(s for s, _ in singles[:b]) / b, iters=it, loglik0=llb)
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="tree of the code before (e.g. /work/main); omitted: only --after")
    p.add_argument("--after", type=Path, default=HERE.parent, help="tree of the code after (default: this one)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 40])
    p.add_argument("--iters", type=int, default=20, help="EM iterations up to n = 1e4 (fewer above, n·iters const)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.sizes, a.batches, a.iters, a.threads, a.seed)
    versions = ([("before", a.before)] if a.before else []) + [("after", a.after)]
    runs = {v: [] for v, _ in versions}
    for r in range(a.repeats):
        for v, tree in versions:
            env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
            cmd = [sys.executable, __file__, "--worker", "--sizes", *map(str, a.sizes), "--batches", *map(str, a.batches),
                   "--iters", str(a.iters), "--threads", str(a.threads), "--seed", str(a.seed)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{a.repeats} {v} done", file=sys.stderr)
    load = os.getloadavg()
    print(f"command: python {shlex.join(sys.argv)}")
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {a.threads} torch thread(s); "
          f"median of {a.repeats} interleaved rounds; CPU ms per problem per EM iteration\n")
    head = "| n | B | iters |" + "".join(f" {v} single | {v} batched | {v} batched/single |" for v, _ in versions)
    print(head)
    print("|" + "---|" * (3 + 3 * len(versions)))
    for n in a.sizes:
        for b in a.batches:
            row = None
            cells = []
            for v, _ in versions:
                s = statistics.median(run[f"{n}/{b}"]["single"] for run in runs[v])
                t = statistics.median(run[f"{n}/{b}"]["seconds"] for run in runs[v])
                it = runs[v][0][f"{n}/1"]["iters"]
                row = it
                cells.append(f" {1e3 * s / it:.3f} | {1e3 * t / it:.3f} | {t / s:.2f} |")
            print(f"| {n:g} | {b} | {row} |" + "".join(cells))
    if a.before:  # same algorithm: the log-likelihoods after the same iterations agree
        worst = max(abs(runs["before"][0][k]["loglik0"] - runs["after"][0][k]["loglik0"]) / abs(runs["before"][0][k]["loglik0"])
                    for k in runs["after"][0])
        print(f"\nlargest relative difference of the first problem's log-likelihood, before vs after: {worst:.1e}")


if __name__ == "__main__":
    main()
