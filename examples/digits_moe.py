"""Train a small MoE classifier on scikit-learn's bundled digits data with several gates.

Data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, 10 classes; ships
with scikit-learn, no download). Each image is split into its 8 rows, giving
a sequence of 8 tokens of 8 pixels; the network is

    embed(8 → 64) + position → [LayerNorm → MoELayer (8 SwiGLU experts)] + residual
    → mean over the 8 tokens → Linear(64 → 10)

trained with Adam on cross-entropy + 0.01 × load-balancing loss + 0.001 ×
z-loss (fixed seed, 75/25 stratified split). For each gate it reports test
accuracy, test cross-entropy, and expert utilisation on the test set (share
of the routed assignments per expert, and its normalised entropy: 1 =
perfectly balanced).

Run::

    python examples/digits_moe.py            # all gates, about a minute on one CPU core
    python examples/digits_moe.py --json     # machine-readable results
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from moelab.nn import MoEConfig, MoELayer

D_MODEL, D_FF, N_EXPERTS = 64, 64, 8

GATES = {
    "topk_softmax": dict(router="topk_softmax", top_k=2, normalize_weights=True),
    "dense_to_sparse": dict(
        router="dense_to_sparse", top_k=N_EXPERTS, tau_max=4.0, tau_min=0.25, schedule="cosine", prune_threshold=0.1
    ),
    "activation_dense_to_sparse(tanh)": dict(
        router="activation_dense_to_sparse", gate_activation="tanh", top_k=N_EXPERTS, tau_max=4.0, tau_min=0.25,
        schedule="cosine", prune_threshold=0.1,
    ),
    "sigmoid": dict(router="sigmoid", top_k=2, normalize_weights=True),
    "expert_choice": dict(router="expert_choice", top_k=2),
    "topk_softmax+shared+gumbel": dict(router="topk_softmax", top_k=1, n_shared_experts=1, noise="gumbel"),
}


class DigitsMoE(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(8, D_MODEL)
        self.position = nn.Parameter(torch.zeros(8, D_MODEL))
        self.norm = nn.LayerNorm(D_MODEL)
        self.moe = MoELayer(config)
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, images: torch.Tensor):
        h = self.embed(images.view(-1, 8, 8)) + self.position  # [B, 8 tokens, d]
        moe = self.moe(self.norm(h))
        h = h + moe.output
        return self.head(h.mean(dim=1)), moe


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def run_gate(name: str, overrides: dict, data, epochs: int, seed: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    batch = 64
    steps = epochs * math.ceil(len(y_tr) / batch)
    overrides = dict(overrides)
    if "tau_max" in overrides:
        overrides["schedule_steps"] = steps
    torch.manual_seed(seed)
    model = DigitsMoE(MoEConfig(d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, **overrides))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=g).split(batch):
            logits, moe = model(x_tr[idx])
            loss = F.cross_entropy(logits, y_tr[idx]) + 1e-2 * moe.load_balancing_loss + 1e-3 * moe.z_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.moe.advance_schedule()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits, moe = model(x_te)
    counts = moe.tokens_per_expert.double()
    share = counts / counts.sum()
    entropy = float(-(share[share > 0] * share[share > 0].log()).sum() / math.log(N_EXPERTS))
    return {
        "gate": name,
        "test_accuracy": float((logits.argmax(-1) == y_te).float().mean()),
        "test_cross_entropy": float(F.cross_entropy(logits, y_te)),
        "experts_per_token": float(counts.sum() / (len(y_te) * 8)),
        "expert_share": [round(float(s), 3) for s in share],
        "utilisation_entropy": entropy,
        "load_balancing_loss": float(moe.load_balancing_loss),
        "final_temperature": model.moe.temperature,
        "train_seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="MoE gates on the digits data set")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.seed)
    results = [run_gate(name, GATES[name], data, args.epochs, args.seed) for name in args.gates]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"digits (train {len(data[1])}, test {len(data[3])}), {args.epochs} epochs, seed {args.seed}")
    print(f"{'gate':<34}{'test acc':>9}{'test CE':>9}{'exp/tok':>8}{'util H':>8}  expert share (test)")
    for r in results:
        print(f"{r['gate']:<34}{r['test_accuracy']:>9.3f}{r['test_cross_entropy']:>9.3f}"
              f"{r['experts_per_token']:>8.2f}{r['utilisation_entropy']:>8.3f}  {r['expert_share']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
