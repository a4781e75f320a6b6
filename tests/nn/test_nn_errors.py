"""Bad input gives a clear error (never a silent clamp, never an in-place change)."""

import math

import pytest
import torch

from moelab.nn import ExpertParallelMoE, MoEConfig, MoELayer, TemperatureSchedule, token_capacity

BASE = dict(d_model=6, d_ff=10, n_experts=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(top_k=5), r"top_k=5 is larger than n_experts=4; choose top_k <= n_experts"),
        (dict(top_k=0), r"top_k must be a positive int"),
        (dict(router="dense_to_sparse", tau_min=0.0), r"tau_min=0.0 must be > 0.*small positive floor"),
        (dict(router="dense_to_sparse", tau_min=-1.0, tau_max=1.0), r"tau_min=-1.0 must be > 0"),
        (dict(router="dense_to_sparse", tau_max=0.5, tau_min=1.0), r"tau_max=0.5 must be >= tau_min=1.0"),
        (dict(tau_max=2.0), r"tau_max/tau_min/schedule apply to the dense-to-sparse routers only"),
        (dict(schedule="linear"), r"apply to the dense-to-sparse routers only, not 'topk_softmax'"),
        (dict(router="softmax"), r"router 'softmax' \(the dense statistical gate\).*router='topk_softmax' with top_k=n_experts"),
        (dict(router="laplace"), r"unknown router 'laplace'; choose one of topk_softmax.*statistical gate name: topk"),
        (dict(router="gaussian"), r"router 'gaussian' .*has no layer router"),
        (dict(router="dense_to_sparse", schedule="step"), r"unknown schedule 'step'"),
        (dict(noise="gaussian"), r"unknown noise 'gaussian'"),
        (dict(top_k=1, normalize_weights=True), r"top_k=1 makes every routing weight exactly 1.*normalize_weights=False"),
        (dict(prune_threshold=0.1), r"prune_threshold applies to the dense-to-sparse routers only"),
        (dict(router="dense_to_sparse", prune_threshold=1.5), r"prune_threshold must be in \(0, 1\)"),
        (dict(capacity_factor=0.0), r"capacity_factor must be > 0 or None \(dropless\), got 0.0"),
        (dict(capacity_factor=-1.5), r"capacity_factor must be > 0 or None \(dropless\), got -1.5"),
        (dict(capacity_factor=math.nan), r"capacity_factor must be > 0 or None \(dropless\), got nan"),
        (dict(capacity_factor=-math.inf), r"capacity_factor must be > 0 or None \(dropless\), got -inf"),
        (dict(router="expert_choice", capacity_factor=math.inf), r"capacity_factor=inf is not defined for expert_choice"),
        (dict(expert_bias_update_rate=0.0), r"expert_bias_update_rate must be a finite number > 0 or None"),
        (dict(expert_bias_update_rate=math.inf), r"expert_bias_update_rate must be a finite number > 0"),
        (dict(expert_bias_update_rate=math.nan), r"expert_bias_update_rate must be a finite number > 0"),
        (dict(router="expert_choice", expert_bias_update_rate=1e-3), r"expert_choice routing is balanced by construction"),
        (dict(gate_activation="swish", router="activation_dense_to_sparse"), r"unknown activation 'swish'"),
        (dict(expert="moe"), r"unknown expert 'moe'"),
        (dict(noise_eps=1.0), r"noise_eps must be in \(0, 1\)"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(capacity_factor=True), r"capacity_factor must be a real number > 0 or None \(dropless\), got True of type bool"),
        (dict(capacity_factor=False), r"got False of type bool; pass a float such as capacity_factor=1.25"),
        (dict(capacity_factor="1"), r"got '1' of type str; pass a float such as capacity_factor=1.25"),
        (dict(capacity_factor=torch.tensor(1.0)), r"of type Tensor; pass a float"),
        (dict(expert_bias_update_rate=True), r"expert_bias_update_rate must be a real number > 0 or None \(off\), got True"),
        (dict(expert_bias_update_rate="1e-3"), r"got '1e-3' of type str"),
    ],
)
def test_config_type_errors(overrides, message):
    with pytest.raises(TypeError, match=message):
        MoEConfig(**{**BASE, **overrides})


def test_capacity_factor_inf_is_dropless_and_runs(make_layer):
    """inf = no capacity limit: the same routing, outputs and counts as capacity_factor=None (issue 14)."""
    x = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inf_layer, none_layer = make_layer(capacity_factor=math.inf), make_layer()
    assert inf_layer.config.dropless and none_layer.config.dropless
    assert not make_layer(capacity_factor=1.0).config.dropless
    a, b = inf_layer(x), none_layer(x)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    assert a.tokens_per_expert.tolist() == b.tokens_per_expert.tolist() and a.n_dropped == 0


def test_huge_finite_capacity_factor_does_not_overflow(make_layer):
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = make_layer(capacity_factor=1e308)(x)
    assert out.n_dropped == 0 and int(out.tokens_per_expert.sum()) == 48
    ec = make_layer(router="expert_choice", capacity_factor=1e308)(x)
    assert ec.tokens_per_expert.tolist() == [24] * 4  # C = n_real: every expert takes every token


@pytest.mark.parametrize("factor", [math.nan, 0.0, -1.0])
def test_token_capacity_rejects_bad_factor(factor):
    with pytest.raises(ValueError, match="capacity_factor must be > 0, inf or None"):
        token_capacity(factor, 10, 2, 4)


def test_token_capacity_values():
    assert token_capacity(None, 10, 2, 4) is None and token_capacity(math.inf, 10, 2, 4) is None
    assert token_capacity(1.0, 10, 2, 4) == 5  # ceil(1.0 * 10 * 2 / 4)
    assert token_capacity(1.1, 10, 2, 4) == 6
    assert token_capacity(1e308, 10, 2, 4) == 10  # no expert can receive more than the 10 tokens


@pytest.mark.parametrize(
    "alias, router", [("topk", "topk_softmax"), ("temperature", "dense_to_sparse"),
                      ("activation", "activation_dense_to_sparse"), ("sigmoid", "sigmoid")]
)
def test_statistical_gate_names_are_accepted(alias, router):
    """moelab.gates names select the same layer router, and config.router holds the layer's name (issue 14)."""
    from moelab.gates import GATES

    assert alias in GATES or alias == "sigmoid"
    cfg = MoEConfig(**BASE, router=alias)
    assert cfg.router == router
    assert cfg == MoEConfig(**BASE, router=router)
    torch.manual_seed(0)
    a = MoELayer(cfg)
    torch.manual_seed(0)
    b = MoELayer(MoEConfig(**BASE, router=router))
    assert type(a.router) is type(b.router)
    x = torch.randn(5, 6)
    torch.testing.assert_close(a(x).output, b(x).output, rtol=0, atol=0)


def test_every_statistical_gate_name_is_mapped_or_explained():
    from moelab.gates import GATES

    for name in GATES:
        try:
            MoEConfig(**BASE, router=name)
        except ValueError as exc:  # the dense softmax gate and the Gaussian gate (a model of x) have no layer router
            assert (name == "softmax" and "top_k=n_experts" in str(exc)) or (name == "gaussian" and "has no layer router" in str(exc))


@pytest.mark.parametrize(
    "args, message",
    [
        ((1.0, 0.0, "linear"), r"schedule reaching 0 divides the logits by 0"),
        ((1.0, math.inf, "linear"), r"tau_min=inf must be a finite number > 0"),
        ((1.0, 0.5, "linear", 0), r"steps must be a positive int"),
        ((1.0, 0.5, "step"), r"unknown schedule kind 'step'"),
    ],
)
def test_schedule_errors(args, message):
    with pytest.raises(ValueError, match=message):
        TemperatureSchedule(*args)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        TemperatureSchedule(1.0, 0.5, "linear", 3)(-1)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**BASE))


def test_wrong_width(layer):
    with pytest.raises(ValueError, match=r"shape \(\.\.\., d_model=6\).*got \(3, 5\)"):
        layer(torch.randn(3, 5))


def test_one_dimensional_input(layer):
    with pytest.raises(ValueError, match=r"at least one leading dim, got \(6,\)"):
        layer(torch.randn(6))


def test_integer_input(layer):
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.int64; convert it with x.float\(\)"):
        layer(torch.ones(2, 6, dtype=torch.long))


def test_dtype_mismatch(layer):
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the expert weights are torch.float32"):
        layer(torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("router", ["topk_softmax", "dense_to_sparse", "sigmoid", "expert_choice"])
@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)])
def test_empty_input_gives_empty_output_and_zero_losses(router, shape):
    """Zero tokens: an empty output of the input's shape, losses exactly 0 (no NaN) and differentiable (issue 14)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, router=router, n_shared_experts=1, expert_bias_update_rate=None
                               if router == "expert_choice" else 1e-2))
    x = torch.zeros(shape, requires_grad=True)
    out = layer(x, torch.ones(shape[:-1], dtype=torch.bool))
    assert out.output.shape == shape and out.output.dtype == x.dtype
    assert out.load_balancing_loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert out.n_dropped == 0 and out.fraction_dropped == 0.0
    (out.output.sum() + out.load_balancing_loss + out.z_loss).backward()
    assert x.grad.shape == shape
    assert layer.router.weight.grad is not None and torch.all(layer.router.weight.grad == 0)
    assert torch.all(layer.experts.w_in.grad == 0) and torch.all(layer.shared_experts.w_in.grad == 0)


def test_all_padding_input_gives_zero_output_and_losses(layer):
    out = layer(torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(out.output == 0) and out.load_balancing_loss.item() == 0.0 and out.z_loss.item() == 0.0


def test_nan_input_is_reported_and_not_changed(layer):
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    before = x.clone()
    with pytest.raises(ValueError, match=r"x contains 2 NaN/inf values.*validate_inputs=False"):
        layer(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x[~x.isnan()], before[~before.isnan()])


def test_finite_input_whose_sum_overflows_is_accepted(layer):
    """The NaN/inf check sums x first; an overflowing sum of finite values falls back to the exact check."""
    x = torch.full((4, 6), 3e38)
    assert not torch.isfinite(x.sum())
    layer(x)  # no error: every value is finite
    x[2, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"x contains 1 NaN/inf values"):
        layer(x)


def test_nan_check_can_be_switched_off():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**BASE, validate_inputs=False))
    x = torch.randn(4, 6)
    x[0, 0] = float("nan")
    out = layer(x).output  # no error; NaN propagates to the rows that saw it
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1:]).all()


def test_bad_mask(layer):
    x = torch.randn(2, 3, 6)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        layer(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape x.shape\[:-1\] = \(2, 3\), got \(6,\)"):
        layer(x, torch.ones(6, dtype=torch.bool))


def test_expert_parallel_needs_distributed():
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group first"):
        ExpertParallelMoE(MoEConfig(**BASE))


def test_forward_never_modifies_input(layer):
    layer.train()
    x = torch.randn(3, 4, 6)
    before = x.clone()
    out = layer(x).output
    out.sum().backward()
    assert torch.equal(x, before)
