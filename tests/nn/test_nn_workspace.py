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


# --- memory handed to the caller (weight gradients, the layer output): reused only when unreferenced


def grads_of(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_two_backwards_accumulate_like_fresh_buffers():
    """No zero_grad between two steps: .grad is the sum, as with fresh buffers (issue 14)."""
    reuse, fresh = pair()
    x1, x2 = xs(2)
    for layer in (reuse, fresh):
        for x in (x1, x2):
            layer(x).output.square().sum().backward()
    for name, g in grads_of(reuse).items():
        torch.testing.assert_close(g, dict(fresh.named_parameters())[name].grad, rtol=0, atol=0, msg=name)
    single = []
    for x in (x1, x2):
        fresh.zero_grad(set_to_none=True)
        fresh(x).output.square().sum().backward()
        single.append(fresh.experts.w_in.grad.clone())
    torch.testing.assert_close(reuse.experts.w_in.grad, single[0] + single[1])


def test_zero_grad_keep_and_set_to_none_give_the_same_gradients():
    reuse, fresh = pair()
    for set_to_none in (False, True, False):
        for x in xs(2, seed=int(set_to_none)):
            reuse.zero_grad(set_to_none=set_to_none)
            fresh.zero_grad(set_to_none=True)
            reuse(x).output.sum().backward()
            fresh(x).output.sum().backward()
            torch.testing.assert_close(reuse.experts.w_out.grad, fresh.experts.w_out.grad, rtol=0, atol=0)


def test_gradient_memory_is_reused_once_dropped_and_never_while_held():
    reuse, _ = pair()
    w_in = reuse.experts.w_in
    x1, x2, x3 = xs(3)
    reuse(x1).output.sum().backward()
    held = w_in.grad  # kept by the caller past set_to_none
    held_copy = held.clone()
    reuse.zero_grad(set_to_none=True)
    reuse(x2).output.sum().backward()
    assert w_in.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, held_copy, rtol=0, atol=0)  # not overwritten
    ptr = w_in.grad.data_ptr()
    reuse.zero_grad(set_to_none=True)  # nobody holds the second gradient any more
    reuse(x3).output.sum().backward()
    assert w_in.grad.data_ptr() == ptr  # its memory is handed out again: no fresh allocation


def test_results_of_autograd_grad_and_held_storages_are_not_overwritten():
    reuse, _ = pair()
    w_in = reuse.experts.w_in
    x1, x2, x3 = xs(3)
    (g1,) = torch.autograd.grad(reuse(x1).output.sum(), [w_in])
    want = g1.clone()
    (g2,) = torch.autograd.grad(reuse(x2).output.sum(), [w_in])
    torch.testing.assert_close(g1, want, rtol=0, atol=0)
    storage = g2.untyped_storage()  # only the storage object is kept
    want2, ptr2 = g2.clone(), g2.data_ptr()
    del g2
    (g3,) = torch.autograd.grad(reuse(x3).output.sum(), [w_in])
    assert g3.data_ptr() != ptr2
    torch.testing.assert_close(torch.tensor([], dtype=want2.dtype).set_(storage, 0, want2.shape), want2, rtol=0, atol=0)


def test_a_held_output_is_not_overwritten_by_the_next_forward():
    reuse, fresh = pair()
    x1, x2, x3 = xs(3)
    with torch.no_grad():
        out1 = reuse(x1).output
        kept = out1.clone()
        out2 = reuse(x2).output
        torch.testing.assert_close(out1, kept, rtol=0, atol=0)
        torch.testing.assert_close(out2, fresh(x2).output, rtol=0, atol=0)
        ptr = out2.data_ptr()
        del out2
        out3 = reuse(x3).output
        assert out3.data_ptr() == ptr
        torch.testing.assert_close(out3, fresh(x3).output, rtol=0, atol=0)


def test_clear_drops_every_buffer():
    reuse, _ = pair()
    reuse(xs(1)[0]).output.sum().backward()
    ws = reuse.experts.workspace
    assert ws.nbytes > reuse.experts.w_in.numel() * 8
    reuse.zero_grad(set_to_none=True)
    ws.clear()
    assert ws.nbytes == 0
    reuse(xs(1)[0]).output.sum().backward()  # works again afterwards
    assert ws.nbytes > 0
