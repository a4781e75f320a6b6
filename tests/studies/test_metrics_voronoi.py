import math

import pytest
import torch

from moelab import ActivationGate, GaussianExperts, GaussianMoE, SoftmaxGate, TemperatureGate
from moelab.metrics import d1_loss, d2_exponents, d2_loss, parameter_errors, r_bar, voronoi_cells, voronoi_loss

D = torch.float64


def softmax_truth():
    g = SoftmaxGate(torch.tensor([[25.0], [0.0]], dtype=D), torch.tensor([-8.0, 0.0], dtype=D))
    e = GaussianExperts(torch.tensor([[-20.0], [20.0]], dtype=D), torch.tensor([15.0, -5.0], dtype=D), torch.tensor([0.09, 0.16], dtype=D))
    return GaussianMoE(g, e)


def model(gs, gi, es, ei, ev, gate=SoftmaxGate, **kw):
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    return GaussianMoE(gate(t(gs), t(gi), **kw), GaussianExperts(t(es), t(ei), t(ev)))


def test_truth_has_zero_loss_and_errors():
    m = softmax_truth()
    assert float(d1_loss(m, m)) == 0.0
    assert float(d2_loss(m, m)) == 0.0
    assert all(float(v) == 0.0 for v in parameter_errors(m, m).values())


def test_permuting_experts_changes_nothing():
    truth = softmax_truth()
    fit = model([[25.3], [0.0]], [-7.9, 0.0], [[-19.5], [20.2]], [15.1, -5.05], [0.1, 0.15])
    # same model with the experts swapped; the gate re-expressed with expert 1 as reference
    perm = model([[-25.3], [0.0]], [7.9, 0.0], [[20.2], [-19.5]], [-5.05, 15.1], [0.15, 0.1])
    for f in (d1_loss, d2_loss):
        assert float(f(perm, truth)) == pytest.approx(float(f(fit, truth)), rel=1e-12)
    e1, e2 = parameter_errors(fit, truth), parameter_errors(perm, truth)
    for k in e1:
        assert float(e2[k]) == pytest.approx(float(e1[k]), rel=1e-12, abs=1e-15)
    assert voronoi_cells(perm, truth).tolist() == [1, 0]
    assert voronoi_cells(fit, truth).tolist() == [0, 1]


def test_known_perturbation_exact():
    truth = softmax_truth()
    m1 = math.exp(-8) / (math.exp(-8) + 1)
    # expert-1 intercept off by 0.1: D1 = m1 * 0.1
    fit = model([[25.0], [0.0]], [-8.0, 0.0], [[-20.0], [20.0]], [15.1, -5.0], [0.09, 0.16])
    assert float(d1_loss(fit, truth)) == pytest.approx(m1 * 0.1, rel=1e-9)
    # gate intercept -7 instead of -8: mass error 2|m1' - m1|, plus m1' * 0 elsewhere
    fit = model([[25.0], [0.0]], [-7.0, 0.0], [[-20.0], [20.0]], [15.0, -5.0], [0.09, 0.16])
    m1p = math.exp(-7) / (math.exp(-7) + 1)
    assert float(d1_loss(fit, truth)) == pytest.approx(2 * abs(m1p - m1), rel=1e-9)
    assert float(parameter_errors(fit, truth)["gate_mass"]) == pytest.approx(2 * abs(m1p - m1), rel=1e-9)


def test_known_perturbation_over_specified_d2():
    truth = softmax_truth()
    delta = 0.2
    # reference expert split in two copies with half the mass each and intercepts -5 ± δ
    fit = model([[25.0], [0.0], [0.0]], [-8.0, math.log(0.5), math.log(0.5)],
                [[-20.0], [20.0], [20.0]], [15.0, -5.0 + delta, -5.0 - delta], [0.09, 0.16, 0.16])
    assert voronoi_cells(fit, truth).tolist() == [0, 1, 1]
    z = 1 + math.exp(-8)
    assert float(d1_loss(fit, truth)) == pytest.approx(delta / z, rel=1e-9)
    assert float(d2_loss(fit, truth)) == pytest.approx(delta**4 / z, rel=1e-9)  # r̄(2) = 4 on b
    # variance exponent r̄(2)/2 = 2
    fit = model([[25.0], [0.0], [0.0]], [-8.0, math.log(0.5), math.log(0.5)],
                [[-20.0], [20.0], [20.0]], [15.0, -5.0, -5.0], [0.09, 0.16 + 0.1, 0.16 - 0.1])
    assert float(d2_loss(fit, truth)) == pytest.approx(0.1**2 / z, rel=1e-9)


def test_rbar_and_general_exponents():
    assert r_bar(2) == 4 and r_bar(3) == 6 and r_bar(1) == 1
    assert d2_exponents(2) == {"gate_slope": 4, "temperature": 4, "expert_intercept": 4, "expert_slope": 2, "variance": 2}
    assert d2_exponents(3)["expert_slope"] == 3
    truth = softmax_truth()
    fit = model([[25.0], [0.0]], [-8.0, 0.0], [[-20.0], [20.0]], [15.0, -5.0 + 0.5], [0.09, 0.16])
    m2 = 1 / (1 + math.exp(-8))
    assert float(voronoi_loss(fit, truth, {"expert_intercept": 3})) == pytest.approx(m2 * 0.5**3, rel=1e-9)
    with pytest.raises(ValueError, match="unknown parameter group"):
        voronoi_loss(fit, truth, {"beta": 2})


def test_batched_matches_single():
    truth = softmax_truth()
    a = model([[25.3], [0.0]], [-7.9, 0.0], [[-19.5], [20.2]], [15.1, -5.05], [0.1, 0.15])
    b = model([[24.0], [0.0]], [-8.2, 0.0], [[-20.5], [19.2]], [14.1, -5.15], [0.08, 0.17])
    batched = GaussianMoE(SoftmaxGate(torch.stack([a.gate.slope, b.gate.slope]), torch.stack([a.gate.intercept, b.gate.intercept])),
                          GaussianExperts(torch.stack([a.experts.slope, b.experts.slope]), torch.stack([a.experts.intercept, b.experts.intercept]),
                                          torch.stack([a.experts.variance, b.experts.variance])))
    out = d2_loss(batched, truth)
    assert out.shape == (2,)
    assert float(out[1]) == pytest.approx(float(d2_loss(b, truth)), rel=1e-12)


def test_temperature_rescaling_shows_in_beta_and_tau_not_ratio():
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    e = GaussianExperts(t([[-20.0], [20.0]]), t([15.0, -5.0]), t([0.09, 0.16]))
    truth = GaussianMoE(TemperatureGate(t([[25.0], [0.0]]), t([-8.0, 0.0]), temperature=1.0, learn_temperature=True), e)
    c = 2.0  # (c β_1, c τ) is the same model
    fit = GaussianMoE(TemperatureGate(t([[25.0 * c], [0.0]]), t([-8.0, 0.0]), temperature=c, learn_temperature=True), e)
    err = parameter_errors(fit, truth)
    assert float(err["gate_slope_over_tau"]) == pytest.approx(0.0, abs=1e-12)
    assert float(err["temperature"]) == pytest.approx(c - 1.0)
    m1 = math.exp(-8) / (1 + math.exp(-8))
    assert float(err["gate_slope"]) == pytest.approx(m1 * 25.0 * (c - 1), rel=1e-9)
    assert float(d1_loss(fit, truth)) > 0


def test_activation_gate_zero_loss_and_gate_mismatch():
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    e = GaussianExperts(t([[-20.0], [20.0]]), t([15.0, -5.0]), t([0.09, 0.16]))
    truth = GaussianMoE(ActivationGate(t([[3.0], [0.0]]), t([-2.5, 0.0]), temperature=0.2, activation="tanh"), e)
    assert float(d1_loss(truth, truth)) == 0.0
    with pytest.raises(ValueError, match="differs from the true gate"):
        d1_loss(truth, softmax_truth())
