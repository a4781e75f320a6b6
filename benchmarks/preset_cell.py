"""Time one cell of a study preset: one setting at one n, all replicates in one fit_em call, as the runner does.

The cell's data, truth-perturbed starts and fit settings are the runner's own
(``moelab.studies``: same seeds), so the fit is the one ``moelab reproduce``
runs. ``--iters N`` runs exactly N EM iterations (``tol=0``) to measure the
per-iteration cost of code that would take too long for the full cell;
without it the preset's ``max_iter`` and ``tol`` apply. Prints wall and CPU
seconds, the iterations done, and the compile mode that ``fit_em`` chose.

Run (the numbers in the README's performance section)::

    PYTHONPATH=. python benchmarks/preset_cell.py temperature-2024 tanh-over-K3 10000 --iters 10
    PYTHONPATH=. python benchmarks/preset_cell.py temperature-2024 tanh-over-K3 10000           # the whole cell
    PYTHONPATH=/work/main python benchmarks/preset_cell.py temperature-2024 tanh-over-K3 10000 --iters 10 --compile off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("setting", help="the [[fit]] name, e.g. tanh-over-K3")
    p.add_argument("n", type=int)
    p.add_argument("--iters", type=int, help="exactly this many EM iterations (tol=0)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--accelerate", choices=("squarem", "off"), help="EM acceleration (default: the preset's setting)")
    a = p.parse_args(argv)

    import torch

    from moelab import fit_em
    from moelab.studies import runner
    from moelab.studies.presets import load_preset
    from moelab.studies.simulate import cell_seed, simulate_cells, true_model

    for study in load_preset(a.preset):
        names = [f.name for f in study.fits]
        if a.setting in names:
            break
    else:
        raise SystemExit(f"no setting {a.setting!r} in preset {a.preset!r}")
    fi = names.index(a.setting)
    fit = study.fits[fi]
    truth = true_model(study.truth)
    reps = list(range(study.replicates))
    x, y = simulate_cells(study, truth, a.n, reps)
    kw = dict(gate=fit.gate, gate_options=fit.gate_options or None, warn=False,
              random_state=cell_seed(study.seed, a.n, reps[0], fi, 1),
              max_iter=a.iters if a.iters else fit.max_iter, tol=0 if a.iters else fit.tol,
              compile={"auto": "auto", "on": True, "off": False}[a.compile])
    acc = a.accelerate or fit.accelerate
    kw["accelerate"] = None if acc == "off" else acc
    if fit.init == "truth-perturbed":
        kw["init_model"] = runner._starts(study, fi, fit, truth, a.n, reps)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_em(x, y, fit.n_experts, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = dict(preset=a.preset, setting=a.setting, n=a.n, replicates=len(reps), wall_s=round(wall, 2), cpu_s=round(cpu, 2),
               iterations_max=int(res.n_iter.max()), iterations_mean=float(res.n_iter.float().mean()),
               converged=int(res.converged.sum()), compiled=bool(res.settings["compiled"]), accelerate=acc,
               extrapolations_accepted_tried=list(res.settings["extrapolations"]),
               ms_per_iteration=round(1e3 * wall / max(int(res.n_iter.max()), 1), 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), threads=torch.get_num_threads(),
               load=round(os.getloadavg()[0], 2), loglik_sum=float(res.loglik.sum()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
