"""moelab's EM against the authors' EM (R meteoritsSim::emNMoE) on identical data and starts.

The anchor of the softmax-2023 design (Nguyen, Nguyen & Ho, NeurIPS 2023; their
experiments, github.com/Trung-TinNGUYEN/CRPE-SGaME, fit with meteoritsSim's
``emNMoE``): both codes fit the same samples from the same starts under the
same stopping rule, one thread each, and the script prints per-fit CPU
seconds (process CPU time, not wall), iterations, log-likelihoods and the
ratio. Not a test and never run in CI: it needs R and meteoritsSim.

* **Data**: drawn once by moelab (``moelab.studies.simulate``) from the
  softmax-2023 truth (gate logits −8 + 25x vs 0, experts 15 − 20x sd 0.3 and
  −5 + 20x sd 0.4), x ~ U(0, 1) (``--design uniform``, preset softmax-2023)
  or the authors' x = linspace(0, 1, n) (``--design linspace``, preset
  softmax-2023-paper); handed to R as raw float64.
* **Starts**: the authors' near-truth start (``emNMoE(nearTrue = TRUE)``,
  which perturbs the true values it is given with its own RNG), drawn in R
  with ``set.seed`` by the same method emNMoE calls, recorded, and given to
  moelab as ``init_model``; R's first log-likelihood (at its start) is
  checked against moelab's at the recorded start. The true variances
  (0.09, 0.16) are passed as ``sigmak_0``.
* **Stopping**: |Δℓ/ℓ| ≤ 1e-6 (emNMoE's ``threshold``;
  ``fit_em(convergence="relative", tol=1e-6)``), at most ``--max-iter``
  M-steps on both sides (emNMoE runs up to ``max_iter + 1``, so it gets
  ``max_iter − 1``).
* **Timing**: R's CPU time is measured inside R with ``proc.time()`` around
  each ``emNMoE`` call (Rscript start-up, loading and data reading are not
  counted); its per-call floor is measured separately (one EM iteration at
  n = 100). moelab's is ``time.process_time()`` around each ``fit_em`` call,
  one fit at a time and batched over the replicates of a cell (one call with
  x of shape (R, n, 1)); median of ``--repeats`` rounds. Both sides get a
  warm-up call first. One thread: ``torch.set_num_threads(1)``;
  OMP/MKL/OPENBLAS_NUM_THREADS=1 for R and for this process.
* **Log-likelihoods**: the same quantity on both sides is checked:
  ``model.log_prob(x, y).sum()`` at R's returned parameters equals R's own
  log-likelihood at those parameters (an extra E-step after the timed call;
  emNMoE's reported ``loglik`` is the one of its last E-step, one M-step
  behind the returned parameters).

Install (Debian; as root)::

    apt-get install r-base-core r-base-dev r-cran-rcpparmadillo r-cran-rcpp \\
        r-cran-pracma r-cran-matrixstats r-cran-mass
    git clone https://github.com/Trung-TinNGUYEN/meteoritsSim /tmp/meteoritsSim
    rm -f /tmp/meteoritsSim/src/*.o /tmp/meteoritsSim/src/*.so   # shipped macOS builds
    mkdir -p /opt/rlib && R CMD INSTALL -l /opt/rlib /tmp/meteoritsSim

Run (about 30 s on 2 cores; 2.5 min with ``--replicates 40``)::

    python benchmarks/anchors/crpe_sgame.py --r-lib /opt/rlib
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moelab  # noqa: E402

from moelab import GaussianMoE, fit_em  # noqa: E402
from moelab.experts import GaussianExperts  # noqa: E402
from moelab.gates import SoftmaxGate  # noqa: E402
from moelab.studies import load_preset  # noqa: E402
from moelab.studies.simulate import simulate_cells, true_model  # noqa: E402

HERE = Path(__file__).resolve().parent
R_SCRIPT = HERE / "emnmoe_fits.R"
PRESET = {"uniform": "softmax-2023", "linspace": "softmax-2023-paper"}
DTYPE = torch.float64

INSTALL = """\
crpe_sgame.py needs R and the R package meteoritsSim ({why}).
Install them (Debian, as root):
    apt-get install r-base-core r-base-dev r-cran-rcpparmadillo r-cran-rcpp \\
        r-cran-pracma r-cran-matrixstats r-cran-mass
    git clone https://github.com/Trung-TinNGUYEN/meteoritsSim /tmp/meteoritsSim
    rm -f /tmp/meteoritsSim/src/*.o /tmp/meteoritsSim/src/*.so   # its shipped .o/.so are macOS builds
    mkdir -p /opt/rlib && R CMD INSTALL -l /opt/rlib /tmp/meteoritsSim
then run: python benchmarks/anchors/crpe_sgame.py --r-lib /opt/rlib"""


def r_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def check_r(lib: str) -> str:
    """Rscript's version line, or exit with the install instructions."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        sys.exit(INSTALL.format(why="Rscript is not on PATH"))
    code = f'suppressPackageStartupMessages(library(meteoritsSim, lib.loc = "{lib}")); cat(R.version.string, "; meteoritsSim", format(packageVersion("meteoritsSim")))'
    p = subprocess.run([rscript, "-e", code], capture_output=True, text=True, env=r_env())
    if p.returncode != 0:
        err = [ln.strip() for ln in p.stderr.splitlines() if ln.strip() and ln.strip() != "Execution halted"]
        sys.exit(INSTALL.format(why=f"meteoritsSim did not load from --r-lib {lib}: {' '.join(err) or 'error'}"))
    return p.stdout.strip()


def parse_grid(spec: str):
    """'2:1000,3:10000' -> [(2, 1000), (3, 10000)]."""
    out = []
    for item in spec.split(","):
        k, n = item.split(":")
        out.append((int(k), int(float(n))))
    return out


def vec(s: str) -> np.ndarray:
    return np.array([float(v) for v in s.split(";")])


def model_from_r(alpha: np.ndarray, beta: np.ndarray, sigma2: np.ndarray, K: int) -> GaussianMoE:
    """A moelab GaussianMoE (batch ()) from meteoritsSim's parameters.

    alpha: (2, K−1) column-major, rows (intercept, slope), reference last and zero;
    beta: (2, K) column-major, rows (intercept, slope); sigma2: (K,) variances.
    """
    a = alpha.reshape(K - 1, 2)
    b = beta.reshape(K, 2)
    gs = torch.zeros(K, 1, dtype=DTYPE)
    gi = torch.zeros(K, dtype=DTYPE)
    gs[:-1, 0] = torch.from_numpy(a[:, 1])
    gi[:-1] = torch.from_numpy(a[:, 0])
    ex = GaussianExperts(torch.from_numpy(b[:, 1:2].copy()), torch.from_numpy(b[:, 0].copy()), torch.from_numpy(sigma2.copy()))
    return GaussianMoE(SoftmaxGate(gs, gi), ex)


def stack_models(models):
    g = SoftmaxGate(torch.stack([m.gate.slope for m in models]), torch.stack([m.gate.intercept for m in models]))
    e = GaussianExperts(torch.stack([m.experts.slope for m in models]), torch.stack([m.experts.intercept for m in models]),
                        torch.stack([m.experts.variance for m in models]))
    return GaussianMoE(g, e)


def loglik(model: GaussianMoE, x, y) -> float:
    with torch.no_grad():
        return float(model.log_prob(x, y).sum())


def moelab_fit(x, y, K, start, args):
    """(CPU s, result) of one fit_em call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.process_time()
        res = fit_em(x, y, K, init_model=start, max_iter=args.max_iter, tol=args.tol, convergence="relative", accelerate=None,
                     compile=args.compile, warn=False)
        return time.process_time() - t, res


def run_r(jobs, workdir: Path, args):
    jobs_csv, out_csv = workdir / "jobs.csv", workdir / "r_fits.csv"
    with open(jobs_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "K", "n", "seed", "file"])
        for j in jobs:
            w.writerow([j["id"], j["K"], j["n"], j["seed"], j["file"]])
    cmd = ["Rscript", str(R_SCRIPT), str(jobs_csv), str(out_csv), args.r_lib, str(args.max_iter - 1), repr(args.tol),
           str(args.overhead_repeats)]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=r_env(), stderr=sys.stderr)
    if p.returncode != 0:
        sys.exit(f"Rscript failed ({p.returncode}): {' '.join(cmd)}")
    print(f"[R: {time.perf_counter() - t:.1f} s wall for the Rscript process]", file=sys.stderr)
    with open(out_csv) as f:
        rows = {int(r["id"]): r for r in csv.DictReader(f)}
    with open(str(out_csv) + ".overhead.csv") as f:
        overhead = [float(r["overhead_cpu"]) for r in csv.DictReader(f)]
    return rows, overhead


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--r-lib", default=os.environ.get("MOELAB_R_LIB", "/opt/rlib"),
                    help="R library directory holding meteoritsSim ($MOELAB_R_LIB if set)")
    ap.add_argument("--design", choices=sorted(PRESET), default="uniform",
                    help="linspace: the authors' x = linspace(0,1,n) (preset softmax-2023-paper); uniform: x ~ U(0,1) (softmax-2023)")
    ap.add_argument("--grid", default="2:1000,2:10000,2:100000,3:10000,3:100000", help="K:n cells, comma-separated")
    ap.add_argument("--replicates", type=int, default=5, help="fits (samples, each with its own start) per cell")
    ap.add_argument("--max-iter", type=int, default=2000, help="M-steps at most, both codes")
    ap.add_argument("--tol", type=float, default=1e-6, help="relative log-likelihood change to stop at")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="fit_em's compile (on = True)")
    ap.add_argument("--prepare", action="store_true",
                    help="compile the fused kernels for each K up front (moelab.autocompile.prepare_compiled), as the study runner "
                         "does for a study whose total EM work pays for it; their CPU seconds are reported, not timed")
    ap.add_argument("--repeats", type=int, default=3, help="moelab timing rounds (median); R runs each fit once")
    ap.add_argument("--overhead-repeats", type=int, default=20, help="calls timed for each code's per-call floor (median)")
    ap.add_argument("--csv", type=Path, help="write the per-fit rows here")
    args = ap.parse_args(argv)
    args.compile = {"auto": "auto", "on": True, "off": False}[args.compile]

    version = check_r(args.r_lib)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    load0 = os.getloadavg()
    print(f"{version}; moelab from {Path(moelab.__file__).parent}; torch {torch.__version__}, 1 thread; design {args.design} ({PRESET[args.design]}); "
          f"stop |Δℓ/ℓ| ≤ {args.tol:g}, max_iter {args.max_iter}; compile={args.compile!r}; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    (study,) = load_preset(PRESET[args.design])
    truth = true_model(study.truth)
    grid = parse_grid(args.grid)
    reps = list(range(args.replicates))
    workdir = Path(tempfile.mkdtemp(prefix="crpe_sgame_"))
    data, jobs = {}, []
    for K, n in grid:
        if n not in data:
            data[n] = simulate_cells(study, truth, n, reps)  # x (R, n, 1), y (R, n)
            for r in reps:
                fn = workdir / f"n{n}_r{r}.bin"
                np.concatenate([data[n][0][r, :, 0].numpy(), data[n][1][r].numpy()]).astype("<f8").tofile(fn)
        for r in reps:
            jobs.append(dict(id=len(jobs), K=K, n=n, r=r, seed=1000 * K + 100 * r + 7 + (n % 9973), file=str(workdir / f"n{n}_r{r}.bin")))

    rrows, overhead = run_r(jobs, workdir, args)

    prepare_cpu = 0.0
    if args.prepare:
        from moelab.autocompile import prepare_compiled

        c0 = time.process_time()
        for K in sorted({K for K, _ in grid}):
            prepare_compiled(K, 1)
        prepare_cpu = time.process_time() - c0
        print(f"prepare_compiled for K in {sorted({K for K, _ in grid})}: {prepare_cpu:.1f} CPU-s (not in the fits' times)")
    # moelab: warm-up, then per-call floor (one iteration at n = 100)
    x100 = torch.linspace(0, 1, 100, dtype=DTYPE).unsqueeze(-1)
    y100 = truth.sample(x100, torch.Generator().manual_seed(0))
    for K in sorted({K for K, _ in grid}):
        for j in jobs:
            if j["K"] == K:
                s = model_from_r(vec(rrows[j["id"]]["start_alpha"]), vec(rrows[j["id"]]["start_beta"]),
                                 vec(rrows[j["id"]]["start_sigma2"]), K)
                xw, yw = data[j["n"]][0][0, :1000], data[j["n"]][1][0, :1000]
                moelab_fit(xw, yw, K, s, args)
                moelab_fit(xw.expand(2, -1, -1), yw.expand(2, -1), K, stack_models([s, s]), args)
                break
    one = argparse.Namespace(**{**vars(args), "max_iter": 1})
    m_overhead = [moelab_fit(x100, y100, 2, truth, one)[0] for _ in range(args.overhead_repeats)]  # K = 2, as R's

    # moelab fits, single and batched
    for j in jobs:
        rr = rrows[j["id"]]
        j["start"] = model_from_r(vec(rr["start_alpha"]), vec(rr["start_beta"]), vec(rr["start_sigma2"]), j["K"])
        j["r_model"] = model_from_r(vec(rr["alpha"]), vec(rr["beta"]), vec(rr["sigma2"]), j["K"])
        j["r_cpu"], j["r_iters"] = float(rr["cpu"]), int(rr["iters"])
        j["r_ll"], j["r_ll_reported"], j["r_ll_start"] = float(rr["loglik_returned"]), float(rr["loglik_reported"]), float(rr["loglik_start"])
        x, y = data[j["n"]][0][j["r"]], data[j["n"]][1][j["r"]]
        j["check_ll"] = abs(loglik(j["r_model"], x, y) - j["r_ll"]) / abs(j["r_ll"])
        j["check_start"] = abs(loglik(j["start"], x, y) - j["r_ll_start"]) / abs(j["r_ll_start"])
        times = []
        for _ in range(args.repeats):
            c, res = moelab_fit(x, y, j["K"], j["start"], args)
            times.append(c)
        j["m_first"] = times[0]
        j["m_cpu"], j["m_iters"], j["m_ll"] = statistics.median(times), int(res.n_iter), float(res.loglik)
        j["m_compiled"] = bool(res.settings.get("compiled"))
    cells = []
    for K, n in grid:
        js = [j for j in jobs if j["K"] == K and j["n"] == n]
        x, y = data[n]
        start = stack_models([j["start"] for j in js])
        times = []
        w = time.perf_counter()
        for _ in range(args.repeats):
            c, res = moelab_fit(x, y, K, start, args)
            times.append(c)
            if len(times) == 1:
                first_wall = time.perf_counter() - w
        for j, it, ll in zip(js, res.n_iter.tolist(), res.loglik.tolist()):
            j["b_iters"], j["b_ll"] = it, ll
            j["b_cpu"] = statistics.median(times) / len(js)
        cells.append(dict(K=K, n=n, js=js, b_compiled=bool(res.settings.get("compiled")), b_first=times[0], b_first_wall=first_wall))

    load1 = os.getloadavg()
    report(cells, jobs, overhead, m_overhead, args, load0, load1)
    if args.csv:
        keys = ["K", "n", "r", "seed", "r_cpu", "r_iters", "r_ll", "r_ll_reported", "r_ll_start", "m_cpu", "m_iters", "m_ll",
                "m_compiled", "m_first", "b_cpu", "b_iters", "b_ll", "check_ll", "check_start"]
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for j in jobs:
                w.writerow([j[k] for k in keys])
    shutil.rmtree(workdir, ignore_errors=True)


def report(cells, jobs, overhead, m_overhead, args, load0, load1):
    fmt = lambda v: f"{v:.3g}" if v >= 0.01 else f"{v:.2g}"  # noqa: E731
    print()
    print("| K | n | fits | R CPU-s/fit | R iters | moelab single CPU-s/fit | iters | R / single | "
          "moelab batched CPU-s/fit | R / batched | ℓ_moelab − ℓ_R (mean; max abs) | compiled single/batched | "
          "first call CPU-s single/batched (wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        js = c["js"]
        rc = statistics.mean(j["r_cpu"] for j in js)
        mc = statistics.mean(j["m_cpu"] for j in js)
        bc = statistics.mean(j["b_cpu"] for j in js)
        d = [j["m_ll"] - j["r_ll"] for j in js]
        print(f"| {c['K']} | {c['n']:,} | {len(js)} | {fmt(rc)} | {statistics.mean(j['r_iters'] for j in js):.1f} | "
              f"{fmt(mc)} | {statistics.mean(j['m_iters'] for j in js):.1f} | {rc / mc:.1f}× | {fmt(bc)} | {rc / bc:.1f}× | "
              f"{statistics.mean(d):+.2g}; {max(abs(v) for v in d):.2g} | "
              f"{'yes' if all(j['m_compiled'] for j in js) else 'no'}/{'yes' if c['b_compiled'] else 'no'} | "
              f"{fmt(js[0]['m_first'])}/{fmt(c['b_first'])} ({fmt(c['b_first_wall'])} s) |")
    R = sum(j["r_cpu"] for j in jobs)
    M = sum(j["m_cpu"] for j in jobs)
    B = sum(j["b_cpu"] for j in jobs)
    print(f"\nAll {len(jobs)} fits: R {R:.2f} CPU-s, moelab single {M:.2f} CPU-s (**{R / M:.1f}×**), "
          f"moelab batched {B:.2f} CPU-s (**{R / B:.1f}×**)")
    print(f"Per-call floor (one EM iteration, K=2, n=100, median of {len(overhead)}): R emNMoE "
          f"{statistics.median(overhead) * 1e3:.1f} ms, moelab fit_em {statistics.median(m_overhead) * 1e3:.1f} ms")
    worst = max(j["check_ll"] for j in jobs)
    worst_s = max(j["check_start"] for j in jobs)
    lag = max(abs(j["r_ll_reported"] - j["r_ll"]) / abs(j["r_ll"]) for j in jobs)
    print(f"Same quantity: moelab log_prob(x, y).sum() at R's returned parameters vs R's log-likelihood there: "
          f"max rel. diff {worst:.1e}; at the recorded start vs R's first log-likelihood: {worst_s:.1e}; "
          f"R's reported loglik (one M-step behind) vs at its returned parameters: max rel. diff {lag:.1e}")
    print(f"Load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
