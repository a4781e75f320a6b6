"""Auxiliary losses: Switch load balancing (eqs. 4–6) and ST-MoE z-loss."""

import math

import pytest
import torch

from moelab.nn import load_balancing_loss, router_z_loss


def test_load_balancing_is_one_for_uniform_routing():
    n_tokens, n_experts = 32, 8
    probs = torch.full((n_tokens, n_experts), 1.0 / n_experts)
    experts = torch.arange(n_tokens * 2) % n_experts  # every expert equally often
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0)


def test_load_balancing_collapsed_routing_is_n_experts():
    probs = torch.zeros(10, 4)
    probs[:, 2] = 1.0
    assert load_balancing_loss(probs, torch.full((10,), 2)).item() == pytest.approx(4.0)


def test_load_balancing_matches_switch_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, 3, generator=g), -1)
    experts = probs.argmax(-1)
    f = torch.tensor([(experts == i).float().mean().item() for i in range(3)])
    p = probs.mean(0)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(3 * float((f * p).sum()))


def test_load_balancing_ignores_padding():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(10, 4, generator=g), -1)
    mask = torch.tensor([True] * 6 + [False] * 4)
    experts = probs[:6].topk(2, -1).indices.t().reshape(-1)
    junk = probs.clone()
    junk[6:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # padding rows may hold anything
    a = load_balancing_loss(junk, experts, mask)
    b = load_balancing_loss(probs[:6], experts)
    assert a.item() == pytest.approx(b.item())


def test_layer_losses_ignore_padding(make_layer):
    layer = make_layer(router_bias=True).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    full = layer(x, mask)
    x_junk = x.clone()
    x_junk[1, 2:] = 1e3  # padding content must not matter
    junk = layer(x_junk, mask)
    real = layer(x[mask])
    for a in (full, junk):
        torch.testing.assert_close(a.load_balancing_loss, real.load_balancing_loss)
        torch.testing.assert_close(a.z_loss, real.z_loss)
        assert a.tokens_per_expert.tolist() == real.tokens_per_expert.tolist()
        torch.testing.assert_close(a.output[mask], real.output)


def test_load_balancing_gradient_reaches_router(make_layer):
    layer = make_layer()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layer(x).load_balancing_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_in.grad is None


def test_z_loss_value_and_padding():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [50.0, 50.0]])
    mask = torch.tensor([True, True, False])
    expected = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="router_probs must have shape"):
        load_balancing_loss(torch.ones(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must have shape"):
        router_z_loss(torch.ones(4, 2), torch.ones(3, dtype=torch.bool))


def test_all_padding_gives_zero_losses(make_layer):
    layer = make_layer()
    x = torch.randn(5, 6, dtype=torch.float64)
    out = layer(x, torch.zeros(5, dtype=torch.bool))
    assert out.load_balancing_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert torch.all(out.output == 0)
