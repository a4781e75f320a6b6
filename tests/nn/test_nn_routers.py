"""Router behaviour: gradients at k = 1, noise in training only, float32, schedules, causality."""

import math

import pytest
import torch

from moelab.nn import MoEConfig, MoELayer, TemperatureSchedule

TOKEN_CHOICE = ["topk_softmax", "dense_to_sparse", "activation_dense_to_sparse", "sigmoid"]


@pytest.mark.parametrize("router", TOKEN_CHOICE + ["expert_choice"])
def test_top1_still_gives_the_router_a_gradient(make_layer, router):
    layer = make_layer(router=router, top_k=1)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer(x).output.square().sum().backward()  # task loss only, no auxiliary loss
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("noise", ["gumbel", "jitter"])
def test_noise_only_in_training_and_input_untouched(make_layer, noise):
    layer = make_layer(noise=noise, noise_eps=0.5, n_experts=8, top_k=1)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_before = x.clone()
    layer.eval()
    a, b = layer(x).output, layer(x).output
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(5)
    c = layer(x).output
    assert not torch.allclose(a, c)  # the routing changed for at least one token
    assert torch.equal(x, x_before)


def test_router_computes_in_float32(make_layer):
    layer = make_layer(dtype=torch.bfloat16)
    x = torch.randn(8, 6, dtype=torch.bfloat16)
    routing = layer.router(x.reshape(-1, 6))
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32
    assert layer.router.weight.dtype == torch.float32
    out = layer(x)
    assert out.output.dtype == torch.bfloat16 and out.load_balancing_loss.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_schedule_endpoints_monotone_and_floor(kind):
    s = TemperatureSchedule(5.0, 0.1, kind, steps=10)
    taus = [s(t) for t in range(15)]
    assert taus[0] == pytest.approx(5.0) and taus[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert all(t == pytest.approx(0.1) for t in taus[10:])
    mid = {"linear": 2.55, "exponential": 5.0 * (0.1 / 5.0) ** 0.5, "cosine": 2.55}[kind]
    assert s(5) == pytest.approx(mid)


@pytest.mark.parametrize("router", ["dense_to_sparse", "activation_dense_to_sparse"])
@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_schedule_down_to_floor_never_produces_nan(make_layer, router, kind):
    layer = make_layer(router=router, tau_max=10.0, tau_min=1e-4, schedule=kind, schedule_steps=5,
                       top_k=4, prune_threshold=0.05, dtype=torch.float32)
    x = 30 * torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    taus = []
    for _ in range(8):
        layer.zero_grad()
        out = layer(x)
        loss = out.output.square().mean() + out.load_balancing_loss + 1e-3 * out.z_loss
        loss.backward()
        assert torch.isfinite(out.output).all() and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        taus.append(layer.temperature)
        layer.advance_schedule()
    assert taus[0] == pytest.approx(10.0) and taus[-1] == pytest.approx(1e-4)
    if router == "dense_to_sparse":  # at the floor the gate is hard: pruning leaves one expert per token
        assert int(out.tokens_per_expert.sum()) == 32


def test_dense_to_sparse_becomes_sparse_as_tau_falls(make_layer):
    layer = make_layer(router="dense_to_sparse", top_k=4, prune_threshold=0.1, tau_max=20.0, tau_min=0.01,
                       schedule="exponential", schedule_steps=10).eval()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dense = int(layer(x).tokens_per_expert.sum())
    layer.advance_schedule(10)
    sparse = int(layer(x).tokens_per_expert.sum())
    assert dense == 200  # all 4 experts kept at high temperature
    assert sparse < 80


def test_state_dict_keeps_schedule_step(make_layer):
    layer = make_layer(router="dense_to_sparse", tau_max=2.0, tau_min=0.5, schedule="linear", schedule_steps=4)
    layer.advance_schedule(3)
    clone = make_layer(router="dense_to_sparse", tau_max=2.0, tau_min=0.5, schedule="linear", schedule_steps=4)
    clone.load_state_dict(layer.state_dict())
    assert clone.temperature == pytest.approx(0.875)


def test_expert_choice_is_marked_non_causal_and_balanced(make_layer):
    layer = make_layer(router="expert_choice", top_k=2)
    assert layer.is_causal is False
    assert make_layer().is_causal is True
    out = layer(torch.randn(16, 6, dtype=torch.float64))
    assert out.tokens_per_expert.tolist() == [8, 8, 8, 8]


def test_expert_choice_depends_on_later_tokens(make_layer):
    layer = make_layer(router="expert_choice", top_k=1).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = x.clone()
    y[6:] = 5 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert not torch.allclose(layer(x).output[:6], layer(y).output[:6])


def test_sigmoid_weights_unnormalised_by_default(make_layer):
    layer = make_layer(router="sigmoid", top_k=2).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    r = layer.router(x)
    s = torch.sigmoid(x.float() @ layer.router.weight.t())
    torch.testing.assert_close(r.weight, s.topk(2, -1).values.t().reshape(-1))
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(5))
