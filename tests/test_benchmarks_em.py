"""Smoke test for benchmarks/em_throughput.py: the NumPy baseline and moelab's EM agree (issue #5).

Tiny problem (n = 200, 2 replicates, 20 iterations) so it runs in well under a
second; the full comparison is the benchmark itself.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load("em_throughput")
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problem(bench):
    x, y = bench.simulate(200, 2, seed=5)
    starts = bench.make_starts(2, seed=2023)
    return x, y, starts, bench.start_model(starts)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_baseline_matches_moelab(bench, problem, compile):
    x, y, starts, model0 = problem
    xt, yt = torch.as_tensor(x).unsqueeze(-1), torch.as_tensor(y)
    ll_m, steps = bench.moelab_fit(xt, yt, model0, 20, compile)
    ll_b, _ = bench.run_baseline(x, y, starts, 20)
    assert steps.tolist() == [20, 20]  # tol=0: exactly the asked iterations
    np.testing.assert_allclose(ll_m, ll_b, rtol=1e-9)
    # and EM moved: the fit is better than the start
    ll0, _ = bench.run_baseline(x, y, starts, 0)
    assert (ll_b > ll0).all()


def test_roofline_byte_count(bench):
    # x (1 value), y (1 value), responsibilities written and read (2K values), float64
    assert bench.min_bytes_per_iteration(1, 1, 3) == 8 * (1 + 1 + 6)
    assert bench.min_bytes_per_iteration(40, 1000, 3, d=2) == 8 * 40 * 1000 * (2 + 1 + 6)


def test_cli_json_smoke(bench, capsys):
    import json

    bench.main(["--sizes", "200", "--replicates", "2", "--iters", "5", "--repeats", "1", "--eager", "--json"])
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["n"] == 200 and row["mstep_min"] == 5 and row["compiled"]
    assert row["loglik_max_rel_diff"] <= 1e-6 and row["eager_loglik_max_rel_diff"] <= 1e-9
    assert row["eager_s"] > 0 and row["compile_s"] >= 0
    assert out["speedup_n1e4"] is None and out["bandwidth_GBps"] > 0


def test_em_batched_worker_times_single_and_batched(capsys):
    """benchmarks/em_batched.py's worker (issue 11): every configuration timed, same fit single and batched."""
    import json

    mod = _load("em_batched")
    mod.worker([300], [2], 3, 1, 0)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"300/1", "300/2"} and out["300/2"]["single"] > 0
    assert all(v["seconds"] > 0 and v["iters"] == 3 for v in out.values())
    assert out["300/1"]["loglik0"] == pytest.approx(out["300/2"]["loglik0"], rel=1e-12)  # problem 0 alone or in a batch
