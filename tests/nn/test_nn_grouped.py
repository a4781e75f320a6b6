"""The hand-written backward of the grouped expert FFN against autograd (gradcheck) and a plain loop."""

import pytest
import torch
import torch.nn.functional as F

from moelab.nn import reference_forward
from moelab.nn.grouped import fused_moe_ffn, grouped_ffn


@pytest.mark.parametrize("kind, act", [("swiglu", F.silu), ("mlp", torch.tanh), ("mlp", F.gelu)])
def test_gradcheck_with_an_empty_expert(kind, act):
    g = torch.Generator().manual_seed(0)
    d, f, counts = 3, 4, [2, 0, 3]
    h_in = 2 * f if kind == "swiglu" else f
    x = torch.randn(5, d, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(3, h_in, d, generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(3, d, f, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: grouped_ffn(*t, counts, kind, act), (x, w_in, w_out))
    grouped_ffn(x, w_in, w_out, counts, kind, act).sum().backward()
    assert torch.all(w_in.grad[1] == 0) and torch.all(w_out.grad[1] == 0)


def test_matches_loop_over_blocks():
    g = torch.Generator().manual_seed(1)
    counts = [4, 1, 0, 3]
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    w_in = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    w_out = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    out = grouped_ffn(x, w_in, w_out, counts, "swiglu", None)
    rows, start = [], 0
    for e, c in enumerate(counts):
        h = x[start : start + c] @ w_in[e].t()
        rows.append((F.silu(h[:, :6]) * h[:, 6:]) @ w_out[e].t())
        start += c
    torch.testing.assert_close(out, torch.cat(rows))


def test_counts_must_match():
    x, w_in, w_out = torch.randn(5, 3), torch.randn(2, 8, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"sum to the number of rows of x \(5\)"):
        grouped_ffn(x, w_in, w_out, [2, 2], "swiglu", None)
    with pytest.raises(ValueError, match=r"one entry per expert \(2\)"):
        grouped_ffn(x, w_in, w_out, [5], "swiglu", None)


@pytest.mark.parametrize("kind, act", [("swiglu", F.silu), ("mlp", torch.tanh)])
def test_fused_gradcheck_and_equals_gather_grouped_combine(kind, act):
    g = torch.Generator().manual_seed(2)
    d, f, counts = 3, 4, [3, 0, 2, 1]
    h_in = 2 * f if kind == "swiglu" else f
    x = torch.randn(4, d, generator=g, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 3, 1, 2, 0])  # token 0 and 2 twice, sorted by expert
    weight = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(4, h_in, d, generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(4, d, f, generator=g, dtype=torch.float64, requires_grad=True)
    fused = lambda x, weight, w_in, w_out: fused_moe_ffn(x, token, weight, w_in, w_out, counts, kind, act)
    assert torch.autograd.gradcheck(fused, (x, weight, w_in, w_out))
    y = grouped_ffn(x[token], w_in, w_out, counts, kind, act)
    unfused = torch.zeros(4, d, dtype=torch.float64).index_add(0, token, y * weight[:, None])
    torch.testing.assert_close(fused(x, weight, w_in, w_out), unfused)


def test_fused_weight_gradient_keeps_router_dtype():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    weight = torch.rand(3, generator=g, dtype=torch.float32, requires_grad=True)
    w_in = torch.randn(1, 8, 2, generator=g, dtype=torch.float64)
    w_out = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    fused_moe_ffn(x, torch.arange(3), weight, w_in, w_out, [3], "swiglu", None).sum().backward()
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, use_mask",
    [
        (dict(top_k=2), False),  # every token has k assignments: combined by gather + sum
        (dict(top_k=1), False),  # k = 1: a gather alone
        (dict(top_k=3), False),
        (dict(top_k=2), True),  # padding tokens have none: scatter-add
        (dict(top_k=2, capacity_factor=0.5), False),  # capacity drops: scatter-add
    ],
)
def test_multi_thread_combine_paths_give_the_same_values(make_layer, grads, overrides, use_mask):
    """With > 1 intra-op thread the combine is a gather + sum (every token with k assignments) or
    index_put_(accumulate=True): same outputs and grads as one thread (to rounding: a multi-threaded
    BLAS may sum in another order), and as the naive reference."""
    results = []
    mask = torch.arange(40) % 7 != 3 if use_mask else None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        layer = make_layer(n_experts=4, **overrides)
        x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
        y = layer(x, mask).output
        torch.testing.assert_close(y, reference_forward(layer, x, mask).output)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)).sum().backward()
        results.append((y.detach(), grads(layer, x)))
    torch.set_num_threads(1)
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-14)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-12, atol=1e-14, msg=name)
