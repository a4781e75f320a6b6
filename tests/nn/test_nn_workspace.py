"""The reused workspace of the routed experts' saved intermediates: same numbers, never stale data."""

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F

from moelab.nn import MoEConfig, MoELayer, reference_forward
from moelab.nn.grouped import Workspace, fused_moe_ffn


def pair(**kw):
    """Two layers with the same weights: workspace on, workspace off."""
    layers = []
    for reuse in (True, False):
        torch.manual_seed(0)
        layers.append(MoELayer(MoEConfig(d_model=6, d_ff=10, n_experts=4, top_k=2, reuse_buffers=reuse, **kw),
                               dtype=torch.float64))
    return layers


def xs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 6, generator=g, dtype=torch.float64) for _ in range(n)]


def step_grads(layer, x):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = layer(xi).output
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
def test_repeated_steps_match_fresh_buffers_and_reference(expert):
    reuse, fresh = pair(expert=expert)
    assert reuse.experts.workspace is not None and fresh.experts.workspace is None
    for x in xs():
        a, b = step_grads(reuse, x), step_grads(fresh, x)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        for name in a[2]:
            torch.testing.assert_close(a[2][name], b[2][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(a[0], reference_forward(reuse.eval(), x).output.detach())
        reuse.train()
    assert reuse.experts.workspace.nbytes > 0 and reuse.experts.workspace._owner is None


def test_two_forwards_before_one_backward():
    """The second forward finds the workspace lent and allocates afresh: both graphs keep their data."""
    reuse, fresh = pair()
    x1, x2 = xs(2)
    grads = []
    for layer in (reuse, fresh):
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        (layer(a).output.square().sum() + 3 * layer(b).output.sum()).backward()
        grads.append((a.grad, b.grad, layer.experts.w_in.grad))
    for g_reuse, g_fresh in zip(*grads):
        torch.testing.assert_close(g_reuse, g_fresh, rtol=0, atol=0)


def test_retained_graph_after_reuse_raises_instead_of_using_stale_data():
    reuse, _ = pair()
    x1, x2 = xs(2)
    out = reuse(x1.clone().requires_grad_(True)).output.sum()
    out.backward(retain_graph=True)
    first = reuse.experts.w_in.grad.clone()
    out.backward(retain_graph=True)  # no forward in between: the saved data are intact
    torch.testing.assert_close(reuse.experts.w_in.grad, 2 * first)
    reuse(x2.clone().requires_grad_(True))  # reuses (overwrites) the workspace
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_workspace_returned_when_a_graph_is_dropped_or_not_built():
    reuse, _ = pair()
    ws = reuse.experts.workspace
    out = reuse(xs(1)[0].clone().requires_grad_(True)).output  # graph, but no backward
    assert ws._owner is not None
    del out
    gc.collect()
    assert ws._owner is None
    with torch.no_grad():
        reuse(xs(1)[0])
    assert ws._owner is None


def test_workspace_grows_and_follows_dtype():
    ws = Workspace()
    g = torch.Generator().manual_seed(0)
    w_in = torch.randn(2, 8, 3, generator=g)
    w_out = torch.randn(2, 3, 4, generator=g)
    for n, dtype in [(4, torch.float32), (9, torch.float32), (5, torch.float64)]:
        x = torch.randn(n, 3, generator=g, dtype=dtype).requires_grad_(True)  # a graph: intermediates saved
        idx = torch.arange(n)
        weight = torch.rand(n, generator=g)
        counts = [n // 2, n - n // 2]
        got = fused_moe_ffn(x, idx, weight, w_in.to(dtype), w_out.to(dtype), counts, "swiglu", F.silu, ws)
        want = fused_moe_ffn(x, idx, weight, w_in.to(dtype), w_out.to(dtype), counts, "swiglu", F.silu)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # per row: x_e, y_e (d_model = d_out = 3), silu(g), u silu'(g), act_h (d_ff = 4)
        assert ws._buffer.dtype == dtype and ws._buffer.numel() >= n * (3 + 3 + 3 * 4)
        del got  # frees the graph: the workspace is returned for the next round
    ws.clear()
    assert ws.nbytes == 0


def test_copies_and_pickles_start_with_an_empty_workspace():
    reuse, _ = pair()
    reuse(xs(1)[0]).output.sum().backward()
    assert reuse.experts.workspace.nbytes > 0
    for clone in (copy.deepcopy(reuse), pickle.loads(pickle.dumps(reuse))):
        assert clone.experts.workspace.nbytes == 0
        torch.testing.assert_close(clone(xs(1)[0]).output, reuse(xs(1)[0]).output)


def test_reuse_buffers_must_be_a_bool():
    with pytest.raises(TypeError, match="reuse_buffers must be True or False, got 1"):
        MoEConfig(d_model=6, d_ff=10, n_experts=4, reuse_buffers=1)
