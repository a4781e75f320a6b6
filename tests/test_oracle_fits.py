"""Done-when of the core issue: the default `moelab fit` (softmax gate) reaches the
best known non-degenerate optimum of every reference row, for 5 seeds.

Reference: tests/data/softmax_gaussian_moe_loglik.csv (copied from ../shared/oracle):
the best of five R/Python tools and a long batched search. Tolerance 0.05 in
total log-likelihood; the reported fit must not be collapsed (every expert's
effective size >= 10 and sigma >= 1% of sd(y)).
"""

import json

import pytest

from moelab import load_dataset
from moelab.cli import main

ROWS = [
    ("faithful", "waiting", "eruptions", 2), ("faithful", "waiting", "eruptions", 3),
    ("faithful", "waiting", "eruptions", 4), ("faithful", "eruptions", "waiting", 2),
    ("faithful", "eruptions", "waiting", 3), ("faithful", "eruptions", "waiting", 4),
    ("mcycle", "times", "accel", 2), ("mcycle", "times", "accel", 3), ("mcycle", "times", "accel", 4),
]


@pytest.mark.parametrize("dataset,x,y,k", ROWS, ids=[f"{d}-{y}~{x}-K{k}" for d, x, y, k in ROWS])
def test_default_fit_reaches_best_known_optimum(dataset, x, y, k, oracle_loglik, capsys):
    row = oracle_loglik[(oracle_loglik.dataset == dataset) & (oracle_loglik.x == x) & (oracle_loglik.y == y)
                        & (oracle_loglik.n_experts == k)].iloc[0]
    target = float(row.best_known_loglik_all_experts_10plus)
    sd_y = float(load_dataset(dataset)[y].std())
    for seed in range(5):
        code = main(["fit", dataset, "--x", x, "--y", y, "--experts", str(k), "--seed", str(seed), "--format", "json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0
        assert out["loglik"] >= target - 0.05, f"seed {seed}: {out['loglik']:.4f} < {target} - 0.05"
        assert min(out["params"]["experts"]["sd"]) >= 0.01 * sd_y, f"seed {seed}: collapsed expert (sigma)"
        assert min(out["params"]["expert_size"]) >= 10, f"seed {seed}: collapsed expert (size)"
