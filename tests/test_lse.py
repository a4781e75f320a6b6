"""fit_lse: regression mixtures of experts by least squares, sigmoid or softmax gates (issue 12)."""

import math

import pytest
import torch

import moelab
from moelab import RegressionExperts, RegressionMoE, fit_lse
from moelab.gates import SigmoidGate, SoftmaxGate
from moelab.lse import _Setup, _forward
from moelab.metrics import d1_loss, lse_loss, parameter_errors, regression_distance
from moelab.regression import EXPERT_KINDS, polynomial_features

DT = torch.float64


def truth_of(gate: str, kind: str, degree=None):
    """K* = 2, d = 1: complementary gates (the same function under both gate families)."""
    if gate == "sigmoid":
        g = SigmoidGate(torch.tensor([[4.0], [-4.0]], dtype=DT), torch.tensor([0.5, -0.5], dtype=DT))
    else:
        g = SoftmaxGate(torch.tensor([[4.0], [0.0]], dtype=DT), torch.tensor([0.5, 0.0], dtype=DT))
    if kind == "polynomial":
        e = RegressionExperts(torch.tensor([[2.0, 1.0], [-3.0, 0.5]], dtype=DT), torch.tensor([-0.5, 1.0], dtype=DT),
                              "polynomial", degree)
    else:
        e = RegressionExperts(torch.tensor([[3.0], [-2.0]], dtype=DT), torch.tensor([1.0, 1.0], dtype=DT), kind)
    return RegressionMoE(g, e)


def data(truth, n, seed=0, batch=()):
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(*batch, n, 1, generator=gen, dtype=DT) - 1
    return x, truth.sample(x, 0.1, gen)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_closed_form_jacobian_equals_autograd(gate, kind):
    p = 2 if kind == "polynomial" else 1
    st = _Setup(gate == "sigmoid", 3, 2, 2 * p, kind, p)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 2, generator=gen, dtype=DT)
    x1 = torch.cat([x, torch.ones(2, 40, 1, dtype=DT)], -1)
    phi1 = torch.cat([polynomial_features(x, p), torch.ones(2, 40, 1, dtype=DT)], -1)
    theta = torch.randn(2, st.n_params, generator=gen, dtype=DT)
    f, J = _forward(st, theta, x1, phi1, True)
    for r in range(2):
        ref = torch.autograd.functional.jacobian(lambda t: _forward(st, t.unsqueeze(0), x1[r:r + 1], phi1[r:r + 1], False)[0][0],
                                                 theta[r])
        torch.testing.assert_close(J[r], ref, rtol=1e-10, atol=1e-12)
    # the model class computes the same f
    g_rows, e_rows = st.split(theta)
    G = (SigmoidGate if gate == "sigmoid" else SoftmaxGate)(g_rows[..., :-1], g_rows[..., -1])
    m = RegressionMoE(G, RegressionExperts(e_rows[..., :-1], e_rows[..., -1], kind, p if kind == "polynomial" else None))
    torch.testing.assert_close(m.predict(x), f)


@pytest.mark.parametrize("gate,kind", [("sigmoid", "gelu"), ("softmax", "relu"), ("sigmoid", "linear"), ("softmax", "tanh")])
def test_objective_never_increases(gate, kind):
    truth = truth_of(gate, kind)
    x, y = data(truth, 400, seed=2, batch=(2,))
    with pytest.warns(moelab.ConvergenceWarning):
        res = fit_lse(x, y, 3, gate=gate, expert=kind, n_init=6, max_iter=60, tol=0, random_state=0)
    h = res.history
    assert h.shape[:-1] == (2,) and torch.isfinite(h).all()
    assert bool((h[..., 1:] <= h[..., :-1]).all()), "the RSS increased in some iteration"
    # reported objective = MSE of the returned model, and the best of the starts
    mse = (res.model.predict(x) - y).square().mean(-1)
    torch.testing.assert_close(res.objective, mse, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.objective, res.start_objective.min(-1).values)


def _flat(st, model):
    """θ of a RegressionMoE (batch ()) in original units, flat as fit_lse orders it."""
    g = torch.cat([model.gate.slope, model.gate.intercept.unsqueeze(-1)], -1)
    g = g - g[-1:] if not st.sigmoid else g
    e = torch.cat([model.experts.slope, model.experts.intercept.unsqueeze(-1)], -1)
    return st.flat(g.unsqueeze(0), e.unsqueeze(0))[0]


# Recovery at n = 20,000 from fit_lse's own starts, up to permutation (Voronoi cells). Stated tolerance:
# every parameter within 5 asymptotic standard errors, SE from σ²(JᵀJ)⁻¹ at the truth (the least-squares
# sandwich with homoscedastic noise), and the L2(mu) distance of the regression functions below 0.01.
# ReLU experts get 10 SE: relu(-2x + 1) is 0 on x > 0.5, so its gate is seen only on x < 0.5, where gate and
# the (linear) active piece nearly trade off; at n = 20,000 the LSE is still far from its normal limit there
# (a second local minimum 1.5e-6 higher in MSE sits at 1.2 SE, the global one at 7 SE in the intercept).
@pytest.mark.parametrize("gate,kind", [("sigmoid", "relu"), ("sigmoid", "gelu"), ("softmax", "gelu"), ("softmax", "linear")])
def test_recovers_truth_at_n_20000(gate, kind):
    from moelab.metrics import voronoi_cells

    truth = truth_of(gate, kind)
    x, y = data(truth, 20_000, seed=3)
    res = fit_lse(x, y, 2, gate=gate, expert=kind, n_init=4, max_iter=200, random_state=0, warn=False)
    model = res.model.map_tensors(lambda t: t.unsqueeze(0))
    cells = voronoi_cells(model, truth)[0]
    assert sorted(cells.tolist()) == [0, 1]
    order = torch.argsort(cells)
    fitted = res.model.map_tensors(lambda t: t[order])
    st = _Setup(gate == "sigmoid", 2, 1, 1, kind, 1)
    t_true = _flat(st, truth)
    x1 = torch.cat([x, torch.ones_like(x)], -1).unsqueeze(0)
    _, J = _forward(st, t_true.unsqueeze(0), x1, x1, True)
    se = (0.01 * torch.linalg.inv(J[0].T @ J[0])).diagonal().sqrt()
    z = (_flat(st, fitted) - t_true) / se
    assert float(z.abs().max()) < (10 if kind == "relu" else 5), z
    xs = torch.linspace(-1, 1, 101, dtype=DT).unsqueeze(-1)
    assert float(regression_distance(model, truth, xs)) < 0.01
    assert abs(float(res.noise_variance) - 0.01) < 0.001  # σ² = 0.01 within 10%
    if gate == "softmax":
        assert float(res.model.gate.slope[-1].abs().max()) == 0 and float(res.model.gate.intercept[-1]) == 0


def test_truth_is_a_fixed_point_and_losses_vanish():
    truth = truth_of("sigmoid", "gelu")
    assert float(d1_loss(truth.map_tensors(lambda t: t.unsqueeze(0)), truth)) == 0
    # a split of an atom into two exact copies has zero loss under softmax (masses add up)
    sm = truth_of("softmax", "gelu")
    split = RegressionMoE(
        SoftmaxGate(torch.tensor([[[4.0], [4.0], [0.0]]], dtype=DT), torch.tensor([[0.5 - math.log(2)] * 2 + [0.0]], dtype=DT)),
        RegressionExperts(torch.tensor([[[3.0], [3.0], [-2.0]]], dtype=DT), torch.tensor([[1.0, 1.0, 1.0]], dtype=DT), "gelu"))
    xs = torch.linspace(-1, 1, 11, dtype=DT).unsqueeze(-1)
    torch.testing.assert_close(split.predict(xs)[0], sm.predict(xs))
    assert float(lse_loss(split, sm)) < 1e-12


def test_batched_fit_equals_separate_fits():
    truth = truth_of("sigmoid", "relu")
    x, y = data(truth, 300, seed=4, batch=(2,))
    start = truth.map_tensors(lambda t: (t + 0.05).expand(2, *t.shape))
    both = fit_lse(x, y, 2, gate="sigmoid", expert="relu", init_model=start, max_iter=50, warn=False)
    for b in range(2):
        one = fit_lse(x[b], y[b], 2, gate="sigmoid", expert="relu", init_model=truth.map_tensors(lambda t: t + 0.05),
                      max_iter=50, warn=False)
        torch.testing.assert_close(both.objective[b], one.objective)
        torch.testing.assert_close(both.model.experts.slope[b], one.model.experts.slope)


def test_several_user_starts_per_problem_pick_the_best():
    truth = truth_of("softmax", "linear")
    x, y = data(truth, 300, seed=5)
    starts = truth.map_tensors(lambda t: torch.stack([t, t + 0.3, t - 0.3]))  # batch (S,) = 3 starts
    res = fit_lse(x, y, 2, gate="softmax", expert="linear", init_model=starts, max_iter=100, warn=False)
    assert res.start_objective.shape == (3,)
    assert float(res.objective) == float(res.start_objective.min())


def test_polynomial_experts_map_back_exactly():
    truth = truth_of("softmax", "polynomial", degree=2)
    x = torch.linspace(-3, 5, 50, dtype=DT).unsqueeze(-1)
    loc, scale = torch.tensor([1.5], dtype=DT), torch.tensor([2.5], dtype=DT)
    ex = truth.experts
    scaled = ex.to_scaled(loc, scale)
    torch.testing.assert_close(scaled.outputs((x - loc) / scale), ex.outputs(x))
    back = scaled.to_original(loc, scale)
    torch.testing.assert_close(back.slope, ex.slope)
    torch.testing.assert_close(back.intercept, ex.intercept)
    # and a fit with polynomial experts in shifted units reaches the noise level
    gen = torch.Generator().manual_seed(6)
    xx = 10 + 2 * torch.rand(2000, 1, generator=gen, dtype=DT) - 1
    shifted = RegressionMoE(truth.gate.to_scaled(-torch.tensor([10.0], dtype=DT), torch.ones(1, dtype=DT)),
                            truth.experts.to_scaled(-torch.tensor([10.0], dtype=DT), torch.ones(1, dtype=DT)))
    torch.testing.assert_close(shifted.predict(xx), truth.predict(xx - 10))
    yy = shifted.sample(xx, 0.1, gen)
    res = fit_lse(xx, yy, 2, gate="softmax", expert="polynomial", degree=2, n_init=6, max_iter=200, random_state=0, warn=False)
    assert float(res.objective) < 0.0105


def test_sigmoid_gate_is_not_normalised_and_has_no_reference():
    g = SigmoidGate(torch.tensor([[1.0], [2.0], [-1.0]], dtype=DT), torch.zeros(3, dtype=DT))
    w = g.weights(torch.tensor([[0.5]], dtype=DT))
    assert not torch.allclose(w.sum(-1), torch.ones(1, dtype=DT))
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[0.5, 1.0, -0.5]], dtype=DT)))
    assert g.n_free_parameters() == 3 * 2
    assert "sigmoid" in moelab.gates.GATES and moelab.gates.GATES["sigmoid"].estimators == ("lse",)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gate="temperature"), "fit_lse fits gate 'sigmoid' or 'softmax'"),
    (dict(gate="nope"), "unknown gate 'nope'"),
    (dict(expert="cubic"), "unknown expert 'cubic'"),
    (dict(expert="polynomial"), "needs degree"),
    (dict(expert="polynomial", degree=0), "degree must be an integer >= 1"),
    (dict(expert="relu", degree=2), "degree applies to expert='polynomial' only"),
    (dict(n_init=0), "n_init must be a positive integer"),
    (dict(max_iter=1.5), "max_iter must be a positive integer"),
    (dict(tol=-1), "tol must be a number >= 0"),
    (dict(init="kmeans++"), "unknown init 'kmeans\\+\\+'"),
])
def test_bad_options_are_named(kwargs, match):
    x = torch.rand(50, 1, dtype=DT)
    with pytest.raises(ValueError, match=match):
        fit_lse(x, x[:, 0], 2, **kwargs)


def test_bad_data_get_the_same_errors_as_fit_em():
    x = torch.rand(50, 1, dtype=DT)
    y = x[:, 0].clone()
    bad = x.clone()
    bad[3, 0] = math.nan
    for args in ((bad, y), (x, y[:40]), (torch.ones(50, 1, dtype=DT), y)):
        with pytest.raises(ValueError) as lse_err:
            fit_lse(*args, 2)
        with pytest.raises(ValueError) as em_err:
            moelab.fit_em(*args, 2, n_init=1)
        assert str(lse_err.value) == str(em_err.value)
    with pytest.raises(ValueError, match="5 samples are fewer than the 6 free parameters"):
        fit_lse(x[:5], y[:5], 2, gate="softmax", expert="linear")
    with pytest.raises(ValueError, match="n_experts must be an integer >= 1"):
        fit_lse(x, y, 0)
    x_before = x.clone()
    fit_lse(x, y, 1, n_init=1, max_iter=5, warn=False)
    assert torch.equal(x, x_before)  # the caller's data are not modified


def test_bad_init_model():
    x = torch.rand(50, 1, dtype=DT)
    truth = truth_of("sigmoid", "relu")
    with pytest.raises(ValueError, match="init_model has a 'sigmoid' gate but gate='softmax'"):
        fit_lse(x, x[:, 0], 2, gate="softmax", expert="relu", init_model=truth)
    with pytest.raises(ValueError, match="init_model has relu experts but expert='gelu'"):
        fit_lse(x, x[:, 0], 2, expert="gelu", init_model=truth)
    with pytest.raises(ValueError, match="init_model has 2 experts and 1 features; expected 3 and 1"):
        fit_lse(x, x[:, 0], 3, expert="relu", init_model=truth)
    with pytest.raises(TypeError, match="init_model must be a moelab.RegressionMoE"):
        fit_lse(x, x[:, 0], 2, init_model="start")


def test_likelihood_estimators_refuse_the_sigmoid_gate():
    x = torch.rand(50, 1, dtype=DT)
    for fit in (moelab.fit_em, moelab.fit_mle):
        with pytest.raises(ValueError, match="gate 'sigmoid' is not normalised .* moelab.fit_lse"):
            fit(x, x[:, 0], 2, gate="sigmoid")


def test_cli_fit_refuses_the_sigmoid_gate_in_one_line(tmp_path, capsys):
    from moelab.cli import main

    x = torch.linspace(0, 1, 60, dtype=DT)
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "\n".join(f"{float(a)},{float(2 * a + 0.1 * math.sin(40 * a))}" for a in x))
    assert main(["fit", str(path), "--x", "x", "--y", "y", "--experts", "2", "--gate", "sigmoid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not normalised" in err and "fit_lse" in err
