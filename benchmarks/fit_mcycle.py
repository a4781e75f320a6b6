"""Wall time of fitting the motorcycle data (mcycle) with 3 experts: 10 starts and fit_em's default.

Fits ``accel ~ times`` (133 rows, bundled) with a 3-expert softmax-gated
Gaussian MoE by ``moelab.fit_em``:

* ``fit_em(times, accel, 3, n_init=10, random_state=SEED)`` — what
  ``moelab fit mcycle --x times --y accel --experts 3 --n-init 10 --seed SEED``
  runs (the CLI's default is 10 starts; the CLI also validates, summarises
  and, with ``--out``, plots);
* ``fit_em(times, accel, 3, random_state=SEED)`` — fit_em's default number
  of starts (read from its signature; the CLI equivalent passes no ``--n-init``).

Each is run ``--repeats`` times after one warm-up (median seconds reported,
with the 1-minute load average), and the log-likelihood of the selected fit
is printed; the warm-up's log-likelihood must equal every timed run's (same
seed, deterministic).

Run::

    python benchmarks/fit_mcycle.py
    python benchmarks/fit_mcycle.py --json --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import warnings

import torch

from moelab import fit_em, load_dataset

_DEFAULT_N_INIT = inspect.signature(fit_em).parameters["n_init"].default
CASES = (("n_init=10", dict(n_init=10)), (f"default (n_init={_DEFAULT_N_INIT})", dict()))


def cli_command(n_init: int, seed: int) -> str:
    return f"moelab fit mcycle --x times --y accel --experts 3 --n-init {n_init} --seed {seed}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    df = load_dataset("mcycle")
    times = torch.tensor(df["times"].to_numpy(), dtype=torch.float64)
    accel = torch.tensor(df["accel"].to_numpy(), dtype=torch.float64)
    rows = []
    for label, kw in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = fit_em(times, accel, 3, random_state=args.seed, **kw)
            secs, loads = [], []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                res = fit_em(times, accel, 3, random_state=args.seed, **kw)
                secs.append(time.perf_counter() - t0)
                if float(res.loglik) != float(ref.loglik):
                    raise SystemExit(f"{label}: log-likelihood changed between runs with the same seed")
        n_init = kw.get("n_init", _DEFAULT_N_INIT)
        rows.append(dict(case=label, n_init=n_init, seconds=statistics.median(secs), all_seconds=secs,
                         loglik=float(ref.loglik), n_iter=int(ref.n_iter), converged=bool(ref.converged),
                         load1=statistics.median(loads), cli=cli_command(n_init, args.seed),
                         warnings=sorted({str(w.message) for w in caught})))
    result = dict(threads=torch.get_num_threads(), seed=args.seed, rows=rows, uptime=os.getloadavg())
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"mcycle, 3 experts, softmax gate, seed {args.seed}, torch threads {result['threads']}, "
          f"median of {args.repeats} runs")
    print(f"{'case':<22} {'seconds':>8} {'loglik':>10} {'iters':>6} {'load1':>6}  equivalent CLI")
    for r in rows:
        print(f"{r['case']:<22} {r['seconds']:>8.3f} {r['loglik']:>10.3f} {r['n_iter']:>6} {r['load1']:>6.2f}  {r['cli']}")
        for w in r["warnings"]:
            print(f"    warning: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
