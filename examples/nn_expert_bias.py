"""Auxiliary-loss-free load balancing (DeepSeek-V3) from a collapsed router, against an auxiliary loss.

A student MoE layer (8 SwiGLU experts, top-2 softmax, renormalised weights)
learns a teacher MoE layer of the same shape (different seed, balanced
routing) by mean squared error. The student's router starts **collapsed**:
its intercept is β₀ = (3, 3, 0, …, 0), so experts 0 and 1 take almost every
assignment. Four variants, same seed and data:

- ``none``: MSE only;
- ``aux_loss``: MSE + 0.01 × Switch load-balancing loss;
- ``bias γ=1e-3`` and ``bias γ=1e-2``: MSE only, with
  ``MoEConfig(expert_bias_update_rate=γ)`` and ``moe.update_expert_bias()``
  after every optimiser step (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2).

Printed per variant, on the held-out tokens: the utilisation entropy H of the
expert shares (normalised by log 8: 1 = perfectly balanced, 1/3 = two
experts), the largest expert share, and the test MSE, at a few steps.

Run::

    python examples/nn_expert_bias.py            # table, about 10 s on one core
    python examples/nn_expert_bias.py --json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from moelab.nn import MoEConfig, MoELayer

D_MODEL, D_FF, N_EXPERTS, TOP_K = 16, 32, 8, 2
N_TRAIN, N_TEST, BATCH = 4096, 1024, 256
CHECKPOINTS = (0, 25, 50, 100, 200, 400)
VARIANTS = {
    "none": dict(rate=None, aux=0.0),
    "aux_loss": dict(rate=None, aux=1e-2),
    "bias γ=1e-3": dict(rate=1e-3, aux=0.0),
    "bias γ=1e-2": dict(rate=1e-2, aux=0.0),
}


def config(rate=None) -> MoEConfig:
    return MoEConfig(d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, top_k=TOP_K, normalize_weights=True,
                     router_bias=True, expert_bias_update_rate=rate)


def make_data(seed: int = 0):
    """Inputs x ~ N(0, I) and the teacher's outputs; (x_train, y_train, x_test, y_test)."""
    torch.manual_seed(seed + 1)
    teacher = MoELayer(config()).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, D_MODEL, generator=g)
    with torch.no_grad():
        y = teacher(x).output
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def collapsed_student(rate, seed: int = 0) -> MoELayer:
    """The student layer with its router intercept set to (3, 3, 0, ..., 0)."""
    torch.manual_seed(seed)
    moe = MoELayer(config(rate))
    with torch.no_grad():
        moe.router.bias.zero_()
        moe.router.bias[:2] = 3.0
    return moe


def utilisation(moe: MoELayer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Expert shares on ``x`` (eval mode, nothing counted), their normalised entropy, and the MSE."""
    moe.eval()
    with torch.no_grad():
        out = moe(x)
    moe.train()
    share = out.tokens_per_expert.double() / out.tokens_per_expert.sum()
    nz = share[share > 0]
    return {
        "entropy": float(-(nz * nz.log()).sum() / math.log(N_EXPERTS)),
        "max_share": float(share.max()),
        "mse": float(F.mse_loss(out.output, y)),
        "share": [round(float(s), 3) for s in share],
    }


def train(rate, aux: float, data, steps: int = max(CHECKPOINTS), seed: int = 0, checkpoints=CHECKPOINTS) -> dict:
    """Train a collapsed student for ``steps`` Adam steps; utilisation at each checkpoint step."""
    x_tr, y_tr, x_te, y_te = data
    moe = collapsed_student(rate, seed)
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    history = {}
    step = 0
    while True:
        if step in checkpoints:
            history[step] = utilisation(moe, x_te, y_te)
        if step == steps:
            break
        idx = torch.randint(0, len(x_tr), (BATCH,), generator=g)
        out = moe(x_tr[idx])
        loss = F.mse_loss(out.output, y_tr[idx]) + aux * out.load_balancing_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rate is not None:
            moe.update_expert_bias()
        step += 1
    return {"history": history, "final_bias": [round(float(b), 4) for b in moe.expert_bias]
            if moe.expert_bias is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_data()
    results = {name: train(v["rate"], v["aux"], data) for name, v in VARIANTS.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'variant':<13} " + " ".join(f"{'step ' + str(s):>19}" for s in CHECKPOINTS))
    print(f"{'':<13} " + " ".join(f"{'H / max / MSE':>19}" for _ in CHECKPOINTS))
    for name, r in results.items():
        cells = [f"{h['entropy']:.2f} / {h['max_share']:.2f} / {h['mse']:.4f}" for h in r["history"].values()]
        print(f"{name:<13} " + " ".join(f"{c:>19}" for c in cells))
    for name, r in results.items():
        print(f"{name:<13} final test shares {r['history'][max(CHECKPOINTS)]['share']}")


if __name__ == "__main__":
    main()
