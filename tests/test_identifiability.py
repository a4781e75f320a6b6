"""Identifiability decided from the gate itself (issue 9, part 2): named activations and callables alike."""

import warnings

import numpy as np
import pytest
import torch

import moelab
from moelab import ActivationGate, SoftmaxGate, TemperatureGate, TopKGate
from moelab.gates import IdentifiabilityWarning, gate_invariances, temperature_identified

D = torch.float64
SLOPE = torch.tensor([[3.0], [0.0]], dtype=D)
ICPT = torch.tensor([[-2.5, 0.0]], dtype=D)[0]
X01 = torch.linspace(0.0, 1.0, 101, dtype=D).unsqueeze(-1)
XPM = torch.linspace(-1.0, 1.0, 101, dtype=D).unsqueeze(-1)


def homogeneous(z):
    """A user σ with σ(cz) = cσ(z) for c > 0 (leaky, asymmetric): not in any list of names."""
    return torch.where(z > 0, 2.0 * z, 0.3 * z)


def not_homogeneous(z):
    """A user σ that is not: z + z³/10."""
    return z + z**3 / 10


@pytest.mark.parametrize("act, x, scaling, translation", [
    ("tanh", X01, False, False),
    ("sigmoid", X01, False, False),
    ("gelu", X01, False, False),
    ("softplus", X01, False, False),
    ("relu", X01, True, False),
    ("identity", X01, True, True),
    (homogeneous, XPM, True, False),
    (not_homogeneous, XPM, False, False),
    (lambda z: 0.5 * z, XPM, True, True),
])
def test_activation_gate_invariances(act, x, scaling, translation):
    g = ActivationGate(SLOPE, ICPT, temperature=0.2, activation=act, learn_temperature=True)
    inv = gate_invariances(g, x)
    assert bool(inv.scaling) is scaling
    assert bool(inv.translation) is translation
    assert bool(temperature_identified(g, x)) is (not scaling)
    # with τ fixed the slope is identified whatever σ is
    fixed = ActivationGate(SLOPE, ICPT, temperature=0.2, activation=act)
    assert bool(temperature_identified(fixed, x))


def test_the_range_decides():
    """σ homogeneous only for z > 0: invariant on data where the logits stay positive, not elsewhere."""
    def half(z):
        return torch.where(z > 0, z, torch.tanh(z))

    g = ActivationGate(SLOPE, ICPT, temperature=0.5, activation=half, learn_temperature=True)
    assert bool(gate_invariances(g, X01).scaling)
    assert not bool(gate_invariances(g, XPM).scaling)


def test_linear_gates():
    tg = TemperatureGate(SLOPE, ICPT, temperature=0.7, learn_temperature=True)
    inv = gate_invariances(tg, XPM)
    assert bool(inv.scaling) and bool(inv.translation)
    assert not bool(temperature_identified(tg, XPM))
    sm = gate_invariances(SoftmaxGate(SLOPE, ICPT), XPM)
    assert bool(sm.translation) and not bool(sm.scaling) and torch.isnan(sm.scaling_derivative)
    topk = TopKGate(torch.tensor([[3.0], [1.0], [0.0]], dtype=D), torch.tensor([-2.5, 0.3, 0.0], dtype=D), top_k=2)
    assert bool(gate_invariances(topk, XPM).translation)


def test_batched_gate_and_batched_x():
    g = ActivationGate(torch.stack([SLOPE, SLOPE]), torch.stack([ICPT, ICPT]), temperature=torch.tensor([0.2, 0.5], dtype=D),
                       activation="relu", learn_temperature=True)
    inv = gate_invariances(g, torch.stack([X01, XPM]))
    assert inv.scaling.shape == (2,) and bool(inv.scaling.all())
    single = ActivationGate(SLOPE, ICPT, activation="tanh", learn_temperature=True)
    assert gate_invariances(single, torch.stack([X01, XPM])).scaling.shape == ()


def test_bad_input():
    g = ActivationGate(SLOPE, ICPT, activation="tanh")
    with pytest.raises(ValueError, match="x must have shape"):
        gate_invariances(g, torch.zeros(5, 2, dtype=D))
    with pytest.raises(ValueError, match="atol"):
        gate_invariances(g, X01, atol=0)


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    y = np.where(x > 0.5, 20 * x - 5, 15 - 20 * x) + 0.3 * rng.standard_normal(n)
    return x, y


@pytest.mark.parametrize("act, warns", [("tanh", False), ("relu", True), (homogeneous, True), (not_homogeneous, False)])
def test_fit_em_warns_once_when_tau_is_not_identified(act, warns):
    x, y = _data()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        moelab.fit_em(x, y, 2, gate="activation", gate_options={"activation": act, "learn_temperature": True},
                      init="kmeans", n_init=1, max_iter=3, random_state=0)
    ident = [w for w in rec if issubclass(w.category, IdentifiabilityWarning)]
    assert len(ident) == (1 if warns else 0)
    if warns:
        assert "only β_1/τ is estimated" in str(ident[0].message) and "learn_temperature=False" in str(ident[0].message)
    # a fixed τ never warns
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        moelab.fit_em(x, y, 2, gate="activation", gate_options={"activation": act}, init="kmeans", n_init=1,
                      max_iter=3, random_state=0)
    assert not [w for w in rec if issubclass(w.category, IdentifiabilityWarning)]


def test_fit_mle_and_estimator_warn_for_the_temperature_gate():
    x, y = _data()
    with pytest.warns(IdentifiabilityWarning, match="not identified in 1 of 1"):
        moelab.fit_mle(x, y, 2, gate="temperature", gate_options={"learn_temperature": True}, n_init=2, max_iter=10,
                       random_state=0)
    with pytest.warns(IdentifiabilityWarning):
        moelab.MixtureOfExpertsRegressor(2, gate="temperature", learn_temperature=True, n_init=2, max_iter=10,
                                         random_state=0).fit(x.reshape(-1, 1), y)
