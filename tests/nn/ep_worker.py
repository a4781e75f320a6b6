"""One rank of the 2-process expert-parallel test (run by test_nn_parallel.py, not collected by pytest).

Usage: python ep_worker.py RANK WORLD PORT OUT_FILE
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from moelab.nn import ExpertParallelMoE, MoEConfig, MoELayer

CONFIG = dict(d_model=6, d_ff=10, n_experts=4, top_k=2, n_shared_experts=1, router_bias=True)
N_TOKENS = 20


def problem():
    """The single-process layer, inputs, padding mask and output gradient (same on every rank)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**CONFIG), dtype=torch.float64)
    with torch.no_grad():
        layer.router.bias.normal_(std=0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TOKENS, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    mask[[3, 4, 15]] = False
    dy = torch.randn(N_TOKENS, 6, generator=g, dtype=torch.float64)
    return layer, x, mask, dy


def main(rank: int, world: int, port: int, out_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
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
            out_file,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
