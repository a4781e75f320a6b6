"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2): selection bias, update, state."""

import importlib.util
from pathlib import Path

import pytest
import torch

from moelab.nn import MoEConfig, MoELayer, expert_bias_update, reference_forward

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nn_expert_bias.py"
TOKEN_CHOICE = ["topk_softmax", "dense_to_sparse", "activation_dense_to_sparse", "sigmoid"]


def x_of(n=20, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_update_rule_is_sign_of_mean_minus_load_recentred():
    load = torch.tensor([5, 1, 2, 0])  # mean 2: expert 0 overloaded, 1 and 3 underloaded, 2 exactly at the mean
    delta = expert_bias_update(load, 0.1)
    raw = 0.1 * torch.tensor([-1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(delta, raw - raw.mean())
    assert abs(float(delta.sum())) < 1e-7 and delta.dtype == torch.float32
    assert torch.all(expert_bias_update(torch.tensor([3, 3, 3]), 0.1) == 0)  # balanced: no change
    assert torch.all(expert_bias_update(torch.zeros(4, dtype=torch.long), 0.1) == 0)  # nothing counted


def test_update_rule_is_exact_for_large_counts():
    # 2**25 + 1 is not a float32 (it rounds to 2**25, so float loads would look balanced);
    # the integer form sees experts 0, 1 below the mean 2**25 + 1/3 and expert 2 above it
    load = torch.tensor([2**25, 2**25, 2**25 + 1])
    torch.testing.assert_close(expert_bias_update(load, 1.0), torch.tensor([2 / 3, 2 / 3, -4 / 3]))


@pytest.mark.parametrize("load, rate, message", [
    (torch.tensor([1.0, 2.0]), 0.1, "load must be a 1-D integer tensor"),
    (torch.tensor([[1, 2]]), 0.1, "load must be a 1-D integer tensor"),
    (torch.tensor([1, 2]), 0.0, "rate must be > 0"),
])
def test_update_rule_errors(load, rate, message):
    with pytest.raises(ValueError, match=message):
        expert_bias_update(load, rate)


def test_update_without_the_option_is_an_error(make_layer):
    layer = make_layer()
    assert layer.expert_bias is None
    with pytest.raises(RuntimeError, match=r"MoEConfig\(expert_bias_update_rate=1e-3\)"):
        layer.update_expert_bias()


def test_bias_lives_in_the_state_dict(make_layer):
    layer = make_layer(expert_bias_update_rate=0.1)
    assert "router.expert_bias" not in make_layer().state_dict()
    layer.train()
    layer(x_of())
    layer.update_expert_bias()
    assert layer.expert_bias.abs().sum() > 0 and not layer.expert_bias.requires_grad
    assert "router.expert_bias" in dict(layer.named_buffers()) and "router.expert_bias" not in dict(
        layer.named_parameters())
    clone = make_layer(seed=5, expert_bias_update_rate=0.1)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.expert_bias, layer.expert_bias)
    x = x_of(seed=2)
    torch.testing.assert_close(clone.eval()(x).output, layer.eval()(x).output, rtol=0, atol=0)


def test_load_counted_in_training_mode_only_accumulates_and_resets(make_layer):
    layer = make_layer(expert_bias_update_rate=0.1, capacity_factor=0.5)
    mask = torch.ones(20, dtype=torch.bool)
    mask[:5] = False
    layer.train()
    a = layer(x_of(seed=0), mask)
    b = layer(x_of(seed=1))
    layer.eval()
    layer(x_of(seed=2))  # evaluation does not count
    load = layer.router.expert_load.clone()
    assert int(load.sum()) == (15 + 20) * 2  # real tokens × top_k, before capacity drops
    assert a.n_dropped + b.n_dropped > 0 and torch.all(load >= a.tokens_per_expert + b.tokens_per_expert)
    assert torch.equal(layer.update_expert_bias(), load)
    assert torch.all(layer.router.expert_load == 0)


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@pytest.mark.parametrize("normalize", [False, True])
def test_bias_changes_selection_not_combine_weights(make_layer, router, normalize):
    """With a bias forcing expert 3 into every top-2, weights are the unbiased scores at the chosen experts."""
    kwargs = dict(router=router, normalize_weights=normalize, expert_bias_update_rate=0.1)
    if router.endswith("dense_to_sparse"):
        kwargs.update(tau_max=0.5, tau_min=0.5)
    layer = make_layer(**kwargs).eval()
    x = x_of()
    plain = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # scores are in [0, 1]
    biased = layer.router(x)
    torch.testing.assert_close(biased.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(biased.probs, plain.probs, rtol=0, atol=0)
    first = biased.expert_idx[:20]
    assert torch.all(first == 3)  # the bias decided the selection ...
    assert not torch.equal(plain.expert_idx, biased.expert_idx)
    # ... but each weight is the unbiased score of the chosen expert (renormalised over the chosen ones)
    scores = torch.sigmoid(biased.logits) if router == "sigmoid" else biased.probs
    w = scores[biased.token_idx, biased.expert_idx]
    if normalize:
        w = w / torch.zeros(20, dtype=w.dtype).index_add(0, biased.token_idx, w)[biased.token_idx]
    torch.testing.assert_close(biased.weight, w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_biased_layer_matches_reference(make_layer, router, grads):
    """Outputs and gradients with a non-zero bias equal the naive loop (selection by score + bias)."""
    layer = make_layer(router=router, expert_bias_update_rate=0.1, router_bias=True, capacity_factor=0.8).eval()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.05, -0.25]))
    x = x_of(seed=3)
    results = []
    for fn in (lambda t: layer(t).output, lambda t: reference_forward(layer, t).output):
        xs = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = fn(xs)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)).sum().backward()
        results.append((y.detach(), grads(layer, xs)))
    (y_fast, g_fast), (y_ref, g_ref) = results
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert layer(x).tokens_per_expert.tolist() == reference_forward(layer, x).tokens_per_expert


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("moelab_expert_bias_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bias_spreads_utilisation_from_collapsed_start(example):
    """Fixed seed 0, the example's set-up (8 experts, top-2, router intercept (3, 3, 0, ..., 0), MSE only,
    no load-balancing loss), 50 Adam steps. Criterion: with γ = 1e-2 the held-out utilisation entropy
    is >= 0.9 and no expert has more than 25 % of the assignments; without the bias the router stays
    collapsed (entropy <= 0.6, an expert above 40 %). Measured: 1.00 / 0.15 and 0.49 / 0.47."""
    data = example.make_data(seed=0)
    start = example.train(None, 0.0, data, steps=0, checkpoints=(0,))["history"][0]
    assert start["max_share"] > 0.4 and start["entropy"] < 0.6  # the start is collapsed
    off = example.train(None, 0.0, data, steps=50, checkpoints=(50,))["history"][50]
    on = example.train(1e-2, 0.0, data, steps=50, checkpoints=(50,))
    assert on["history"][50]["entropy"] >= 0.9 and on["history"][50]["max_share"] <= 0.25, on
    assert off["entropy"] <= 0.6 and off["max_share"] >= 0.4, off
    assert abs(sum(on["final_bias"])) < 1e-3  # recentred to zero mean
