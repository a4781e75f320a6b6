"""One rank of the 2-process expert-parallel tests (run by test_nn_parallel.py, not collected by pytest).

Usage: python ep_worker.py RANK WORLD PORT OUT_DIR

Runs every scenario below in one process group and writes ``OUT_DIR/<scenario>.rank<RANK>.pt``.
The single-process counterparts are built by the same functions (``problem``, ``uneven_problem``,
``bias_problem``), so the test compares like with like.
"""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moelab.nn import ExpertParallelMoE, MoEConfig, MoELayer

CONFIG = dict(d_model=6, d_ff=10, n_experts=4, top_k=2, n_shared_experts=1, router_bias=True)
N_TOKENS = 20
# local batch sizes (rank 0, rank 1) of the uneven scenarios, empty ranks included (issue 14)
UNEVEN = {"uneven_10_0": (10, 0), "uneven_0_0": (0, 0), "uneven_1_12": (1, 12)}
# aux-loss-free balancing: local batch sizes of each training step; γ large enough to change routing
BIAS_STEPS = ((10, 0), (3, 9), (0, 7), (8, 8))
BIAS_RATE = 0.05


def make_layer(**overrides):
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**{**CONFIG, **overrides}), dtype=torch.float64)
    with torch.no_grad():
        layer.router.bias.normal_(std=0.3)
    return layer


def problem():
    """The single-process layer, inputs, padding mask and output gradient (same on every rank)."""
    layer = make_layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TOKENS, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    mask[[3, 4, 15]] = False
    dy = torch.randn(N_TOKENS, 6, generator=g, dtype=torch.float64)
    return layer, x, mask, dy


def uneven_problem(sizes, seed=2):
    """Layer, the concatenated batch (sum(sizes) tokens), its output gradient and each rank's rows."""
    layer = make_layer()
    n = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    dy = torch.randn(n, 6, generator=g, dtype=torch.float64)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    rows = [slice(bounds[r], bounds[r + 1]) for r in range(len(sizes))]
    return layer, x, dy, rows


def bias_problem():
    """Layer with the expert bias, and per step: (batch, output gradient, each rank's rows)."""
    layer = make_layer(expert_bias_update_rate=BIAS_RATE)
    steps = []
    for i, sizes in enumerate(BIAS_STEPS):
        _, x, dy, rows = uneven_problem(sizes, seed=10 + i)
        x = x + 0.8  # a shifted input skews the initial routing, so the bias has work to do
        steps.append((x, dy, rows))
    return layer, steps


def run(ep, x, dy, input_grad=True):
    """Forward + backward of one rank's batch; what the test compares."""
    xl = x.clone().requires_grad_(input_grad)
    ep.zero_grad(set_to_none=True)
    out = ep(xl)
    (out.output * dy).sum().backward()
    return {
        "output": out.output.detach(),
        "x_grad": xl.grad,
        "grads": {n: p.grad for n, p in ep.named_parameters()},
        "tokens_per_expert": out.tokens_per_expert,
        "load_balancing_loss": out.load_balancing_loss.detach(),
        "z_loss": out.z_loss.detach(),
    }


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    out_dir = Path(out_dir)
    try:
        torch.set_num_threads(1)
        # 1. even split with padding
        layer, x, mask, dy = problem()
        ep = ExpertParallelMoE.from_layer(layer)
        rows = slice(rank * N_TOKENS // world, (rank + 1) * N_TOKENS // world)
        xl = x[rows].clone().requires_grad_(True)
        out = ep(xl, mask[rows])
        (out.output * dy[rows]).sum().backward()
        torch.save(
            {
                "output": out.output.detach(),
                "x_grad": xl.grad,
                "grads": {n: p.grad for n, p in ep.named_parameters()},
                "tokens_per_expert": out.tokens_per_expert,
            },
            out_dir / f"padded.rank{rank}.pt",
        )
        # 2. uneven local batches, empty ranks included
        for name, sizes in UNEVEN.items():
            layer, x, dy, rows = uneven_problem(sizes)
            ep = ExpertParallelMoE.from_layer(layer)
            torch.save(run(ep, x[rows[rank]], dy[rows[rank]]), out_dir / f"{name}.rank{rank}.pt")
        # 2b. the empty rank's input needs no gradient (a plain tensor), the other's does
        layer, x, dy, rows = uneven_problem((10, 0))
        ep = ExpertParallelMoE.from_layer(layer)
        torch.save(run(ep, x[rows[rank]], dy[rows[rank]], input_grad=rank == 0), out_dir / f"mixed_grad.rank{rank}.pt")
        # 3. aux-loss-free balancing: loads all-reduced, the same bias on every rank
        layer, steps = bias_problem()
        ep = ExpertParallelMoE.from_layer(layer).train()
        record = []
        for x, dy, rows in steps:
            result = run(ep, x[rows[rank]], dy[rows[rank]])
            result["load"] = ep.update_expert_bias()
            result["bias"] = ep.expert_bias.clone()
            record.append(result)
        torch.save(record, out_dir / f"bias.rank{rank}.pt")
        # 4. data parallelism: replicated layers, loads summed over the group -> one bias for all replicas
        layer, steps = bias_problem()
        layer.train()
        record = []
        for x, dy, rows in steps:
            result = run(layer, x[rows[rank]], dy[rows[rank]])
            result["load"] = layer.update_expert_bias(group=dist.group.WORLD)
            result["bias"] = layer.expert_bias.clone()
            record.append(result)
        torch.save(record, out_dir / f"dp_bias.rank{rank}.pt")
        # 5. a bad input on rank 1 (wrong d_model): rank 1 raises its ValueError, rank 0 a RuntimeError
        #    naming rank 1 (no hang in the all-to-all), and the group works for the next batch
        layer, x, dy, rows = uneven_problem((10, 12))
        ep = ExpertParallelMoE.from_layer(layer)
        bad = x[rows[rank]] if rank == 0 else x[rows[rank], :5]
        try:
            ep(bad)
            error = None
        except (RuntimeError, ValueError) as err:
            error = (type(err).__name__, str(err))
        after = run(ep, x[rows[rank]], dy[rows[rank]])
        torch.save({"error": error, "after": after}, out_dir / f"bad_input.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
