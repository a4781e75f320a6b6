"""Gate family: shapes, batching, definitions, validation."""

import pytest
import torch

from moelab.gates import ActivationGate, SoftmaxGate, TemperatureGate, TopKGate, make_gate

D = torch.float64


def _params(K=3, d=2, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, K, d, generator=g, dtype=D), torch.randn(*batch, K, generator=g, dtype=D)


@pytest.mark.parametrize("gate_cls,kw", [
    (SoftmaxGate, {}), (TemperatureGate, {"temperature": 0.5}),
    (ActivationGate, {"activation": "tanh"}), (TopKGate, {"top_k": 2}),
])
def test_log_weights_shapes_and_normalisation(gate_cls, kw):
    slope, intercept = _params(batch=(2, 3))
    gate = gate_cls(slope, intercept, **kw)
    x = torch.randn(2, 3, 7, 2, dtype=D)
    lw = gate.log_weights(x)
    assert lw.shape == (2, 3, 7, 3)
    assert torch.allclose(torch.logsumexp(lw, -1), torch.zeros(2, 3, 7, dtype=D), atol=1e-12)


def test_definitions():
    slope, intercept = _params()
    x = torch.randn(5, 2, dtype=D)
    lin = x @ slope.T
    assert torch.allclose(SoftmaxGate(slope, intercept).logits(x), lin + intercept)
    assert torch.allclose(TemperatureGate(slope, intercept, temperature=0.25).logits(x), lin / 0.25 + intercept)
    assert torch.allclose(ActivationGate(slope, intercept, temperature=2.0, activation="sigmoid").logits(x),
                          torch.sigmoid(lin) / 2.0 + intercept)
    custom = ActivationGate(slope, intercept, activation=lambda t: t ** 3)
    assert torch.allclose(custom.logits(x), lin ** 3 + intercept)
    # identity activation is the temperature gate
    assert torch.allclose(ActivationGate(slope, intercept, temperature=0.5, activation="identity").log_weights(x),
                          TemperatureGate(slope, intercept, temperature=0.5).log_weights(x))


def test_temperature_scale_invariance_is_visible():
    """(β_1, τ) and (cβ_1, cτ) give the same gate: the non-identifiability of the paper."""
    slope, intercept = _params()
    x = torch.randn(9, 2, dtype=D)
    a = TemperatureGate(slope, intercept, temperature=0.7, learn_temperature=True).log_weights(x)
    b = TemperatureGate(3 * slope, intercept, temperature=2.1, learn_temperature=True).log_weights(x)
    assert torch.allclose(a, b)


def test_topk_zeroes_all_but_k():
    slope, intercept = _params(K=5)
    gate = TopKGate(slope, intercept, top_k=2)
    x = torch.randn(40, 2, dtype=D)
    w = gate.weights(x)
    assert ((w > 0).sum(-1) == 2).all()
    top2 = gate.logits(x).topk(2, -1).indices
    assert torch.allclose(w.gather(-1, top2).sum(-1), torch.ones(40, dtype=D))
    dense = torch.softmax(gate.logits(x).gather(-1, top2), -1)
    assert torch.allclose(w.gather(-1, top2), dense)


def test_gradients_flow():
    slope, intercept = _params()
    slope.requires_grad_(True)
    gate = ActivationGate(slope, intercept, activation="gelu")
    gate.log_weights(torch.randn(6, 2, dtype=D))[:, 0].sum().backward()
    assert slope.grad is not None and torch.isfinite(slope.grad).all()


@pytest.mark.parametrize("call,msg", [
    (lambda: TemperatureGate(*_params(), temperature=0.0), "temperature must be > 0"),
    (lambda: TemperatureGate(*_params(), temperature=-1.0), "temperature must be > 0"),
    (lambda: ActivationGate(*_params(), activation="swish"), "unknown activation 'swish'"),
    (lambda: TopKGate(*_params(K=3), top_k=4), r"top_k=4 is outside \[1, n_experts=3\]"),
    (lambda: make_gate("noisy", 3, 1), "unknown gate 'noisy'"),
    (lambda: make_gate("softmax", 3, 1, top_k=2), "does not take option"),
    (lambda: make_gate("topk", 3, 1), "needs top_k"),
    (lambda: SoftmaxGate(torch.zeros(3, 2), torch.zeros(4)), "gate intercept must have shape"),
])
def test_bad_gate_arguments(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_estimated_temperature_adds_no_identifiable_parameter():
    """BIC/AIC: the model depends on (β_1, τ) only through β_1/τ."""
    slope, intercept = _params()
    assert TemperatureGate(slope, intercept, learn_temperature=True).n_free_parameters() == \
        SoftmaxGate(slope, intercept).n_free_parameters()
    assert ActivationGate(slope, intercept, learn_temperature=True).n_free_parameters() == \
        SoftmaxGate(slope, intercept).n_free_parameters() + 1
