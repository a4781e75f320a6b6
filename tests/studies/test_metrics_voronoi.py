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
    # (β_1, τ) is not identified here: D1/D2 use the identified β_1/τ, so the same model has loss 0
    assert float(d1_loss(fit, truth)) == pytest.approx(0.0, abs=1e-12)
    assert float(d2_loss(fit, truth)) == pytest.approx(0.0, abs=1e-12)
    # with τ fixed (identified), a different τ is a different model and shows in the loss
    fixed = GaussianMoE(TemperatureGate(t([[25.0 * c], [0.0]]), t([-8.0, 0.0]), temperature=c), e)
    assert float(d1_loss(fixed, GaussianMoE(TemperatureGate(t([[25.0], [0.0]]), t([-8.0, 0.0]), temperature=1.0), e))) > 0


def test_activation_gate_zero_loss_and_gate_mismatch():
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    e = GaussianExperts(t([[-20.0], [20.0]]), t([15.0, -5.0]), t([0.09, 0.16]))
    truth = GaussianMoE(ActivationGate(t([[3.0], [0.0]]), t([-2.5, 0.0]), temperature=0.2, activation="tanh"), e)
    assert float(d1_loss(truth, truth)) == 0.0
    with pytest.raises(ValueError, match="differs from the true gate"):
        d1_loss(truth, softmax_truth())


# ---------------------------------------------------------------- translation invariance (issue 9, part 1)
def _truth_k(K):
    """The softmax-2023 truth (K = 2) or a 3-expert truth with distinct experts (K = 3)."""
    if K == 2:
        return softmax_truth()
    g = SoftmaxGate(torch.tensor([[25.0], [-10.0], [0.0]], dtype=D), torch.tensor([-8.0, 3.0, 0.0], dtype=D))
    e = GaussianExperts(torch.tensor([[-20.0], [5.0], [20.0]], dtype=D), torch.tensor([15.0, 2.0, -5.0], dtype=D),
                        torch.tensor([0.09, 0.25, 0.16], dtype=D))
    return GaussianMoE(g, e)


def _split(truth, j, shares, offsets, order=None):
    """Truth with expert j replaced by copies of masses shares·m_j and slopes s_j + offsets, re-referenced to the last expert."""
    Kt = truth.n_experts
    idx = [k for k in range(Kt) if k != j] + [j] * len(shares)
    gs, gi = truth.gate.slope[idx].clone(), truth.gate.intercept[idx].clone()
    for c, (p, u) in enumerate(zip(shares, offsets)):
        gs[Kt - 1 + c] += u
        gi[Kt - 1 + c] += math.log(p)
    ex = truth.experts
    es, ei, ev = ex.slope[idx], ex.intercept[idx], ex.variance[idx]
    if order is not None:
        gs, gi, es, ei, ev = gs[order], gi[order], es[order], ei[order], ev[order]
    gs, gi = gs - gs[-1], gi - gi[-1]
    return GaussianMoE(SoftmaxGate(gs, gi), GaussianExperts(es, ei, ev))


SHARES = ([0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1])


@pytest.mark.parametrize("K_true", [2, 3])
@pytest.mark.parametrize("shares", SHARES)
def test_exact_split_of_any_expert_has_zero_loss(K_true, shares):
    truth = _truth_k(K_true)
    for j in range(K_true):
        fit = _split(truth, j, shares, [0.0] * len(shares))
        assert fit.n_experts == K_true + len(shares) - 1
        for f in (d1_loss, d2_loss):
            assert float(f(fit, truth)) == pytest.approx(0.0, abs=1e-12), (j, f.__name__)
        assert voronoi_cells(fit, truth).tolist() == [k for k in range(K_true) if k != j] + [j] * len(shares)


@pytest.mark.parametrize("K_true", [2, 3])
@pytest.mark.parametrize("shares", SHARES)
def test_near_split_gives_d2_rbar_with_the_same_constant_for_every_expert(K_true, shares):
    """Copies s*_j + δ u_i with Σ p_i u_i = 0: D2 = m*_j Σ p_i |u_i|^r̄ δ^r̄ whichever j is split
    (before the fix, splitting the reference gave D2 ∝ δ: the other experts' slopes moved by δ)."""
    truth = _truth_k(K_true)
    m = torch.softmax(truth.gate.intercept, -1)
    p = torch.tensor(shares, dtype=D)
    u = torch.linspace(-1.0, 1.0, len(shares), dtype=D)
    u = u - (p * u).sum()  # mass-weighted centre at the true slope
    r = r_bar(len(shares))
    const = float((p * u.abs() ** r).sum())
    for j in range(K_true):
        for delta in (0.3, 0.03):
            fit = _split(truth, j, shares, (delta * u).tolist())
            # abs: float64 rounding of slopes ≈ 25 (≈ 4e-15) enters the size-1 cells with exponent 1
            assert float(d2_loss(fit, truth)) == pytest.approx(float(m[j]) * const * delta**r, rel=1e-6, abs=2e-14), (j, delta)


def test_issue9_reference_split_numbers():
    """The issue's smallest input: softmax-2023 truth, one expert split with logits (slope ± δ)x + b + log ½."""
    truth = softmax_truth()
    m = torch.softmax(truth.gate.intercept, -1)
    xpts = ((torch.arange(64, dtype=D) + 0.5) / 64).unsqueeze(-1)
    for delta in (1e-2, 1e-3):
        ref = float(d2_loss(_split(truth, 1, [0.5, 0.5], [delta, -delta]), truth, xpts))
        non = float(d2_loss(_split(truth, 0, [0.5, 0.5], [delta, -delta]), truth, xpts))
        assert ref == pytest.approx(float(m[1]) * delta**4, rel=1e-3)  # was 3.4e-4 · δ (∝ δ)
        assert non == pytest.approx(float(m[0]) * delta**4, rel=1e-3)


@pytest.mark.parametrize("K_true", [2, 3])
def test_permuting_fitted_experts_and_translating_slopes_change_nothing(K_true):
    truth = _truth_k(K_true)
    gen = torch.Generator().manual_seed(0)
    shares, offs = [0.3, 0.7], [0.4, -0.4 * 0.3 / 0.7]
    for j in range(K_true):
        base = _split(truth, j, shares, offs)
        K = base.n_experts
        noisy = GaussianMoE(SoftmaxGate(base.gate.slope + 0.05 * torch.randn(K, 1, generator=gen, dtype=D),
                                        base.gate.intercept + 0.05 * torch.randn(K, generator=gen, dtype=D)),
                            GaussianExperts(base.experts.slope + 0.05 * torch.randn(K, 1, generator=gen, dtype=D),
                                            base.experts.intercept + 0.05 * torch.randn(K, generator=gen, dtype=D),
                                            base.experts.variance))
        ref = {f.__name__: float(f(noisy, truth)) for f in (d1_loss, d2_loss)}
        errs = parameter_errors(noisy, truth)
        for perm in ([2, 0, 1] if K == 3 else [3, 1, 0, 2], list(reversed(range(K)))):
            g, e = noisy.gate, noisy.experts
            gs, gi = g.slope[perm], g.intercept[perm]
            shift = torch.tensor([[1.7]], dtype=D)  # any common translation of the logits
            moved = GaussianMoE(SoftmaxGate(gs - gs[-1] + shift - shift, gi - gi[-1]),
                                GaussianExperts(e.slope[perm], e.intercept[perm], e.variance[perm]))
            raw = GaussianMoE(SoftmaxGate(gs + shift, gi + 3.0), GaussianExperts(e.slope[perm], e.intercept[perm], e.variance[perm]))
            for mdl in (moved, raw):
                for f in (d1_loss, d2_loss):
                    assert float(f(mdl, truth)) == pytest.approx(ref[f.__name__], rel=1e-10)
                e2 = parameter_errors(mdl, truth)
                for k in errs:
                    assert float(e2[k]) == pytest.approx(float(errs[k]), rel=1e-10, abs=1e-14)


def test_k2_exact_fits_keep_their_d1():
    """K = 2 fits from EM (stored, with D1 under the previous re-referencing): same D1 to 1e-12."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parents[1] / "data" / "voronoi_k2_fits.json").read_text())
    truth = softmax_truth()
    for f in data["fits"]:
        t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
        fit = GaussianMoE(SoftmaxGate(t(f["gate_slope"]), t(f["gate_intercept"])),
                          GaussianExperts(t(f["expert_slope"]), t(f["expert_intercept"]), t(f["variance"])))
        assert float(d1_loss(fit, truth)) == pytest.approx(f["d1_before"], rel=1e-12)


def test_activation_gate_centring_decided_from_sigma():
    """σ = identity (affine) gets the softmax's centring; tanh does not (its slopes are identified)."""
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    e = GaussianExperts(t([[-20.0], [20.0]]), t([15.0, -5.0]), t([0.09, 0.16]))
    ident = lambda z: 1.0 * z  # noqa: E731 - a user callable, not the name "identity"
    for act, zero in ((ident, True), ("tanh", False)):
        truth = GaussianMoE(ActivationGate(t([[3.0], [0.0]]), t([-2.5, 0.0]), temperature=0.2, activation=act), e)
        # the true reference split in two (slopes ±0.1 around 0), the whole gate translated by +0.1
        # so that the last copy has slope 0, as the estimators store it
        es = GaussianExperts(t([[-20.0], [20.0], [20.0]]), t([15.0, -5.0, -5.0]), t([0.09, 0.16, 0.16]))
        fit = GaussianMoE(ActivationGate(t([[3.1], [0.2], [0.0]]), t([-2.5, math.log(0.5), math.log(0.5)]),
                                         temperature=0.2, activation=act), es)
        d2 = float(d2_loss(fit, truth, torch.rand(64, 1, dtype=D, generator=torch.Generator().manual_seed(0))))
        m1 = float(torch.softmax(t([-2.5, 0.0]), -1)[0])
        if zero:  # centred: expert 1 exact, the copies ±0.1 about the true slope, r̄(2) = 4
            assert d2 == pytest.approx((1 - m1) * 0.1**4, rel=1e-6)
        else:  # not centred: expert 1's slope is off by 0.1 with exponent 1
            assert d2 > m1 * 0.1 * 0.99
