"""Bad input gives a clear error (never a silent clamp, never an in-place change)."""

import math

import pytest
import torch

from moelab.nn import ExpertParallelMoE, MoEConfig, MoELayer, TemperatureSchedule

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
        (dict(router="softmax"), r"unknown router 'softmax'; choose one of topk_softmax"),
        (dict(router="dense_to_sparse", schedule="step"), r"unknown schedule 'step'"),
        (dict(noise="gaussian"), r"unknown noise 'gaussian'"),
        (dict(top_k=1, normalize_weights=True), r"top_k=1 makes every routing weight exactly 1.*normalize_weights=False"),
        (dict(prune_threshold=0.1), r"prune_threshold applies to the dense-to-sparse routers only"),
        (dict(router="dense_to_sparse", prune_threshold=1.5), r"prune_threshold must be in \(0, 1\)"),
        (dict(capacity_factor=0.0), r"capacity_factor must be > 0 or None"),
        (dict(gate_activation="swish", router="activation_dense_to_sparse"), r"unknown activation 'swish'"),
        (dict(expert="moe"), r"unknown expert 'moe'"),
        (dict(noise_eps=1.0), r"noise_eps must be in \(0, 1\)"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**BASE, **overrides})


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


def test_empty_input(layer):
    with pytest.raises(ValueError, match="x has no tokens"):
        layer(torch.randn(0, 6))


def test_nan_input_is_reported_and_not_changed(layer):
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    before = x.clone()
    with pytest.raises(ValueError, match=r"x contains 2 NaN/inf values.*validate_inputs=False"):
        layer(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x[~x.isnan()], before[~before.isnan()])


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
