"""Forward+backward time of moelab's MoE layer vs Hugging Face Mixtral (eager) and a naive loop.

Same configuration for every contender: hidden 512, SwiGLU ffn 1024, 8
experts, top-2 softmax with renormalised weights (Mixtral's router), 4096
tokens, float32, identical weights and routing. moelab runs with
``--fused-elementwise`` (default ``auto``: its element-wise work compiled by
torch.compile, :mod:`moelab.nn.elementwise`; compiled before the timings,
the first-call cost is reported); unless that is ``off`` the eager layer
(``fused_elementwise=False``) is timed alongside as ``moelab_eager``. Also times the *compute
floor*: only the per-expert matmuls of forward and backward (6 per expert),
on pre-sorted token blocks of the sizes the router produced, with
preallocated outputs. Each timing is the median of ``--repeats`` rounds (the
contenders take turns within a round) after ``--warmup`` runs each, at 1 and
2 threads (``torch.set_num_threads``).

Run::

    python benchmarks/nn_layer.py            # table
    python benchmarks/nn_layer.py --json     # JSON with ratio_vs_hf_eager_1thread
    python benchmarks/nn_layer.py --profile  # where moelab's time goes (torch.profiler), per category
    python benchmarks/nn_layer.py --fused-elementwise off   # the eager element-wise path only

``ratio_vs_hf_eager_Nthread`` = HF time / moelab time (> 1: moelab faster);
``ratio_vs_floor_Nthread`` = moelab time / floor time (1.0 is the floor).
Without ``transformers`` installed the HF column is skipped with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moelab.nn import MoEConfig, MoELayer
from moelab.nn.elementwise import kernels

D_MODEL, D_FF, N_EXPERTS, TOP_K, N_TOKENS = 512, 1024, 8, 2, 4096


def median_times(contenders: dict, warmup: int, repeats: int) -> dict:
    """Median seconds per contender; the contenders take turns in each round, so background load hits all alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_hf_block(layer: MoELayer):
    """Mixtral sparse MoE block (eager experts) with ``layer``'s weights, or (None, reason)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as exc:  # benchmark-only dependency
        return None, f"transformers not installed ({exc}); pip install 'moelab[bench]' to include the HF column"
    cfg = MixtralConfig(
        hidden_size=D_MODEL,
        intermediate_size=D_FF,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        router_jitter_noise=0.0,
        experts_implementation="eager",
    )
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked [gate; up] like moelab
            experts.gate_up_proj.copy_(layer.experts.w_in)
            experts.down_proj.copy_(layer.experts.w_out)
        else:  # transformers 4.x: a ModuleList of w1 (gate), w3 (up), w2 (down)
            for e, mod in enumerate(experts):
                mod.w1.weight.copy_(layer.experts.w_in[e, :D_FF])
                mod.w3.weight.copy_(layer.experts.w_in[e, D_FF:])
                mod.w2.weight.copy_(layer.experts.w_out[e])
    impl = getattr(cfg, "_experts_implementation", None)
    if impl not in (None, "eager"):
        return None, f"could not select the eager experts implementation (got {impl!r})"
    return block, None


def hf_forward(block, x: torch.Tensor) -> torch.Tensor:
    """HF block on tokens of shape (T, d): it takes (batch, seq, d); 4.x returns (hidden, router_logits)."""
    out = block(x[None])
    if isinstance(out, tuple):
        out = out[0]
    return out[0]


def naive_loop(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Textbook loop over experts: boolean mask per expert, gather, expert, weighted scatter-add."""
    probs = torch.softmax(F.linear(x, layer.router.weight), dim=-1)
    top_w, top_i = probs.topk(TOP_K, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(N_EXPERTS):
        tok, slot = torch.where(top_i == e)
        h = F.linear(x[tok], layer.experts.w_in[e])
        a = F.silu(h[:, :D_FF]) * h[:, D_FF:]
        y = F.linear(a, layer.experts.w_out[e]) * top_w[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out


def make_floor(counts: list[int]):
    """Only the per-expert matmuls of forward+backward, preallocated, on blocks of the given sizes."""
    g = torch.Generator().manual_seed(1)
    blocks = []
    for n in counts:
        blocks.append(
            dict(
                x=torch.randn(n, D_MODEL, generator=g),
                w_in=torch.randn(2 * D_FF, D_MODEL, generator=g),
                w_out=torch.randn(D_MODEL, D_FF, generator=g),
                a=torch.randn(n, D_FF, generator=g),
                dy=torch.randn(n, D_MODEL, generator=g),
                dh=torch.randn(n, 2 * D_FF, generator=g),
                h=torch.empty(n, 2 * D_FF),
                y=torch.empty(n, D_MODEL),
                da=torch.empty(n, D_FF),
                dx=torch.empty(n, D_MODEL),
                dw_in=torch.empty(2 * D_FF, D_MODEL),
                dw_out=torch.empty(D_MODEL, D_FF),
            )
        )

    def run():
        for b in blocks:
            torch.mm(b["x"], b["w_in"].t(), out=b["h"])  # forward: x W_inᵀ
            torch.mm(b["a"], b["w_out"].t(), out=b["y"])  # forward: a W_outᵀ
            torch.mm(b["dy"], b["w_out"], out=b["da"])  # backward: dL/da
            torch.mm(b["dy"].t(), b["a"], out=b["dw_out"])  # backward: dL/dW_out
            torch.mm(b["dh"], b["w_in"], out=b["dx"])  # backward: dL/dx
            torch.mm(b["dh"].t(), b["x"], out=b["dw_in"])  # backward: dL/dW_in

    return run


def fwd_bwd(module_fn, params, x, dy):
    def run():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        out = module_fn(xi)
        out.backward(dy)

    return run


EXPERT_NODES = ("_FusedMoEFFN", "_GroupedFFN")  # the autograd Functions of moelab/nn/grouped.py
COMPILED = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode",
            "AOTDispatcher")  # torch.compile'd kernels (moelab/nn/elementwise.py) and dynamo's per-call work
GATHER_SCATTER = ("aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::index_add")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
ROUTER = ("aten::linear", "aten::softmax", "aten::_softmax", "aten::topk", "aten::gather", "aten::sigmoid",
          "aten::exponential_", "aten::uniform_", "aten::div", "aten::index_add")
DISPATCH = ("aten::argsort", "aten::sort", "aten::bincount", "aten::repeat", "aten::repeat_interleave",
            "aten::arange", "aten::cumsum", "aten::index_select", "aten::index", "aten::clamp")
LOSSES = ("aten::logsumexp", "aten::mean", "aten::dot", "aten::square", "aten::pow")
CHECKS = ("aten::isfinite", "aten::sum")


def categorise(top: str, name: str) -> str:
    """Category of an op with self time, from the top-level event it runs under and its own name."""
    if any(node in top for node in EXPERT_NODES):
        if name in MATMUL:
            return "experts: matmuls"
        if name in GATHER_SCATTER:
            return "experts: gather / weighted scatter-add"
        if any(node in name for node in EXPERT_NODES):
            return "experts: Python of the autograd Function"
        if name.startswith(COMPILED[0]):
            return "experts: compiled element-wise kernels"
        if name.startswith(COMPILED[1:]):
            return "experts: torch.compile call overhead (guards, wrappers)"
        return "experts: SwiGLU, weights, zeros (element-wise)"
    if top.startswith("autograd::engine::evaluate_function"):
        return "router & combine-weight backward" if "AccumulateGrad" not in top else "gradient accumulation"
    if name in ROUTER or top in ROUTER:
        return "router forward"
    if name in DISPATCH or top in DISPATCH:
        return "dispatch (sort, counts)"
    if name in LOSSES or top in LOSSES:
        return "auxiliary losses"
    if name in CHECKS or top in CHECKS:
        return "input check, other reductions"
    return "other"


def profile_breakdown(fn, iterations: int = 3) -> dict:
    """Self CPU time per category (ms per call) of ``fn`` under torch.profiler, and the total."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    totals = defaultdict(float)
    for event in prof.events():
        root = event
        while root.cpu_parent is not None:
            root = root.cpu_parent
        totals[categorise(root.name, event.name)] += event.self_cpu_time_total / 1e3 / iterations
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fused-elementwise", choices=("auto", "on", "off"), default="auto",
                        help="moelab's MoEConfig(fused_elementwise=...): auto (default), on (True), off (False)")
    parser.add_argument("--profile", action="store_true",
                        help="profile moelab and the floor (torch.profiler) instead of timing; per category")
    args = parser.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:])

    fused = {"auto": "auto", "on": True, "off": False}[args.fused_elementwise]
    torch.manual_seed(0)
    config = MoEConfig(d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, top_k=TOP_K, normalize_weights=True,
                       fused_elementwise=fused)
    layer = MoELayer(config)
    eager = None
    if fused is not False:
        eager = MoELayer(dataclasses.replace(config, fused_elementwise=False))
        eager.load_state_dict(layer.state_dict())
    x = torch.randn(N_TOKENS, D_MODEL)
    dy = torch.randn(N_TOKENS, D_MODEL)
    hf, hf_reason = make_hf_block(layer)

    torch.set_num_threads(args.threads[0])
    t0 = time.perf_counter()
    fwd_bwd(lambda t: layer(t).output, list(layer.parameters()), x, dy)()  # compiles the fused kernels, if used
    first_call = time.perf_counter() - t0
    with torch.no_grad():
        ours = layer(x)
        counts = ours.tokens_per_expert.tolist()
        err_naive = (naive_loop(layer, x) - ours.output).abs().max().item()
        err_eager = None if eager is None else (eager(x).output - ours.output).abs().max().item()
        err_hf = None if hf is None else (hf_forward(hf, x) - ours.output).abs().max().item()
    compiled = kernels.status(torch.float32, x.device) is True and fused is not False

    contenders = {
        "moelab": fwd_bwd(lambda t: layer(t).output, list(layer.parameters()), x, dy),
        "naive_loop": fwd_bwd(lambda t: naive_loop(layer, t), list(layer.parameters()), x, dy),
        "compute_floor": make_floor(counts),
    }
    if eager is not None:
        contenders["moelab_eager"] = fwd_bwd(lambda t: eager(t).output, list(eager.parameters()), x, dy)
    if hf is not None:
        contenders["hf_mixtral_eager"] = fwd_bwd(lambda t: hf_forward(hf, t), list(hf.parameters()), x, dy)

    if args.profile:
        report = {"command": command, "load_average_1min_at_start": os.getloadavg()[0], "profile_ms": {}}
        for n in args.threads:
            torch.set_num_threads(n)
            ours = profile_breakdown(contenders["moelab"])
            floor = profile_breakdown(contenders["compute_floor"])
            report["profile_ms"][f"{n}thread"] = {"moelab": ours, "compute_floor_total": sum(floor.values())}
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"command: {command}   (1-min load average at start: {report['load_average_1min_at_start']:.2f})")
        for n in args.threads:
            r = report["profile_ms"][f"{n}thread"]
            total = sum(r["moelab"].values())
            print(f"\n{n} thread(s): moelab {total:.1f} ms per forward+backward under the profiler, "
                  f"floor {r['compute_floor_total']:.1f} ms")
            for cat, ms in r["moelab"].items():
                print(f"  {cat:<48} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
        return 0

    result = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "config": dict(d_model=D_MODEL, d_ff=D_FF, n_experts=N_EXPERTS, top_k=TOP_K, n_tokens=N_TOKENS, dtype="float32"),
        "fused_elementwise": args.fused_elementwise,
        "compiled_kernels_used": compiled,
        "first_call_seconds": first_call,
        "tokens_per_expert": counts,
        "max_abs_diff_vs_naive": err_naive,
        "max_abs_diff_vs_eager": err_eager,
        "max_abs_diff_vs_hf": err_hf,
        "hf_skipped": hf_reason,
        "load_average_1min_at_start": os.getloadavg()[0],
        "seconds": {},
    }
    if hf is not None:
        import transformers

        result["transformers"] = transformers.__version__
    for n in args.threads:
        torch.set_num_threads(n)
        times = median_times(contenders, args.warmup, args.repeats)
        result["seconds"][f"{n}thread"] = times
        if hf is not None:
            result[f"ratio_vs_hf_eager_{n}thread"] = times["hf_mixtral_eager"] / times["moelab"]
        result[f"ratio_vs_naive_{n}thread"] = times["naive_loop"] / times["moelab"]
        result[f"ratio_vs_floor_{n}thread"] = times["moelab"] / times["compute_floor"]
        if eager is not None:
            result[f"ratio_eager_vs_floor_{n}thread"] = times["moelab_eager"] / times["compute_floor"]

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"command: {command}")
    print(f"machine: {result['machine']}")
    if hf_reason:
        print(f"note: HF column skipped: {hf_reason}")
    print(f"moelab: fused_elementwise={args.fused_elementwise} (compiled kernels {'used' if compiled else 'not used'}); "
          f"first forward+backward {first_call:.2f} s")
    print(f"max |moelab - naive| = {err_naive:.2e}" + ("" if err_eager is None else f", max |moelab - eager| = {err_eager:.2e}")
          + ("" if err_hf is None else f", max |moelab - HF| = {err_hf:.2e}"))
    print(f"{'threads':>7} " + " ".join(f"{name:>17}" for name in contenders) + "   (median s, fwd+bwd)")
    for n in args.threads:
        t = result["seconds"][f"{n}thread"]
        print(f"{n:>7} " + " ".join(f"{t[name]:>17.4f}" for name in contenders))
    for n in args.threads:
        hf_part = f"HF eager / moelab = {result[f'ratio_vs_hf_eager_{n}thread']:.3f}, " if hf is not None else ""
        eager_part = "" if eager is None else f", moelab_eager / floor = {result[f'ratio_eager_vs_floor_{n}thread']:.3f}"
        print(f"{n} thread(s): {hf_part}naive / moelab = {result[f'ratio_vs_naive_{n}thread']:.3f}, "
              f"moelab / floor = {result[f'ratio_vs_floor_{n}thread']:.3f}{eager_part}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
