"""Reduction identities: one expert = dense FFN; all experts = dense mixture; expert permutation."""

import pytest
import torch
import torch.nn.functional as F


def dense_ffn(w_in, w_out, kind, x):
    h = F.linear(x, w_in)
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.gelu(h)
    return F.linear(a, w_out)


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
def test_one_expert_equals_dense_ffn(make_layer, expert):
    layer = make_layer(n_experts=1, top_k=1, expert=expert).eval()
    x = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    out = layer(x).output
    x2 = x.detach().clone().requires_grad_(True)
    ref = dense_ffn(layer.experts.w_in[0], layer.experts.w_out[0], expert, x2)
    torch.testing.assert_close(out, ref)  # softmax over one expert is exactly 1
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("router", ["topk_softmax", "dense_to_sparse", "activation_dense_to_sparse"])
def test_routing_to_all_experts_equals_dense_mixture(make_layer, router):
    tau = {} if router == "topk_softmax" else dict(tau_max=0.8, tau_min=0.8)
    layer = make_layer(router=router, top_k=4, router_bias=True, **tau).eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = layer(x)
    r = layer.router
    pre = x.float() @ r.weight.t()
    if router == "activation_dense_to_sparse":
        pre = torch.tanh(pre)
    logits = pre / (0.8 if router != "topk_softmax" else 1.0) + r.bias
    gates = torch.softmax(logits, dim=-1).double()  # [T, E]
    experts = torch.stack(
        [dense_ffn(layer.experts.w_in[e], layer.experts.w_out[e], "swiglu", x) for e in range(4)], dim=1
    )  # [T, E, d]
    mixture = (gates.unsqueeze(-1) * experts).sum(1)
    torch.testing.assert_close(out.output, mixture, rtol=1e-5, atol=1e-6)
    assert out.tokens_per_expert.tolist() == [20] * 4


def test_permuting_experts_changes_nothing_observable(make_layer):
    layer = make_layer(router_bias=True).eval()
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = layer(x)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight[perm])
        layer.router.bias.copy_(layer.router.bias[perm])
        layer.experts.w_in.copy_(layer.experts.w_in[perm])
        layer.experts.w_out.copy_(layer.experts.w_out[perm])
    out_p = layer(x)
    torch.testing.assert_close(out_p.output, out.output)
    torch.testing.assert_close(out_p.load_balancing_loss, out.load_balancing_loss)
    assert out_p.tokens_per_expert.tolist() == out.tokens_per_expert[perm].tolist()


def test_shared_experts_are_added_to_every_token(make_layer):
    layer = make_layer(n_shared_experts=2, d_ff_shared=3).eval()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    routed_only = make_layer().eval()
    routed_only.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    sh = layer.shared_experts
    shared = sum(dense_ffn(sh.w_in[s], sh.w_out[s], "swiglu", x) for s in range(2))
    torch.testing.assert_close(layer(x).output, routed_only(x).output + shared)
