"""Bootstrap refits: one batched fit_em call (moelab.bootstrap_fit) vs the same B refits one call at a time.

    python benchmarks/bootstrap_batched.py [--data mcycle] [--experts 2] [--n-boot 200] [--repeats 3] [--threads 1]

Same resamples (same seed) and the same start (the fit) in both; contenders take turns, medians printed.
"""

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import moelab
from moelab.bootstrap import bootstrap_fit


def loop(model, x, y, B, seed):
    idx = np.random.default_rng(seed).integers(0, len(y), size=(B, len(y)))
    out = []
    for b in range(B):
        out.append(moelab.fit_em(x[idx[b]], y[idx[b]], model.n_experts, init_model=model, warn=False).loglik)
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mcycle")
    ap.add_argument("--x", default="times")
    ap.add_argument("--y", default="accel")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    df = moelab.load_dataset(a.data)
    x, y = df[[a.x]].to_numpy(), df[a.y].to_numpy()
    model = moelab.fit_em(x, y, a.experts, random_state=0).model
    t_batch, t_loop = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        b = bootstrap_fit(model, x, y, a.n_boot, random_state=0)
        t_batch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ll = loop(model, x, y, a.n_boot, 0)
        t_loop.append(time.perf_counter() - t0)
    mb, ml = statistics.median(t_batch), statistics.median(t_loop)
    print(f"{a.data} {a.experts} experts, B = {a.n_boot}: batched {mb:.2f} s, loop {ml:.2f} s, "
          f"speed-up {ml / mb:.1f}x (median of {a.repeats}, {a.threads} thread(s); valid refits {b.n_valid}/{a.n_boot}; "
          f"loop mean loglik {float(ll.mean()):.3f})")


if __name__ == "__main__":
    main()
