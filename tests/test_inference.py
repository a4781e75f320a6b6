"""Standard errors from the observed information, hard gate switches (issue 15, items 1 and 2)."""

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import binom

import moelab
from moelab.inference import SeparationWarning, wald_inference


def naive_loglik(theta, x, y, K, gate="softmax", tau=1.0, act=np.tanh, learn_tau=False):
    """log-likelihood in the reported order, original units, written from the model's definition (numpy)."""
    n, d = x.shape
    th = list(theta)
    gi, gs = [], []
    for _ in range(K - 1):
        gi.append(th.pop(0))
        gs.append([th.pop(0) for _ in range(d)])
    if learn_tau:
        tau = th.pop(0)
    gi.append(0.0)
    gs.append([0.0] * d)
    gi, gs = np.array(gi), np.array(gs)
    lin = x @ gs.T
    logits = {"softmax": lin, "activation": act(lin) / tau, "temperature": lin / tau}[gate] + gi
    logg = logits - logsumexp(logits, axis=1, keepdims=True)
    b, a, sd = [], [], []
    for _ in range(K):
        b.append(th.pop(0))
        a.append([th.pop(0) for _ in range(d)])
        sd.append(th.pop(0))
    mean = x @ np.array(a).T + np.array(b)
    sd = np.array(sd)
    logf = -0.5 * np.log(2 * np.pi * sd**2) - 0.5 * (y[:, None] - mean) ** 2 / sd**2
    return logsumexp(logg + logf, axis=1).sum()


def fd_standard_errors(f, theta, rel=1e-4):
    """sqrt(diag((−H)⁻¹)) with H by central differences (steps rel·max(|θ_i|, 0.01))."""
    p = len(theta)
    h = rel * np.maximum(np.abs(theta), 1e-2)
    H = np.zeros((p, p))
    for i in range(p):
        for j in range(i, p):
            def at(si, sj):
                t = np.array(theta, dtype=float)
                t[i] += si * h[i]
                t[j] += sj * h[j]
                return f(t)
            H[i, j] = H[j, i] = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / (4 * h[i] * h[j])
    return np.sqrt(np.diag(np.linalg.inv(-H)))


@pytest.fixture(scope="module")
def mcycle():
    df = moelab.load_dataset("mcycle")
    return df[["times"]].to_numpy(), df["accel"].to_numpy()


def test_standard_errors_equal_a_finite_difference_hessian_mcycle(mcycle):
    x, y = mcycle
    res = moelab.fit_em(x, y, 2, random_state=0)
    inf = wald_inference(res.model, x, y, feature_names=["times"])
    est = inf.estimate
    assert inf.layout.names == ["gate[1] intercept", "gate[1] times", "expert[1] intercept", "expert[1] times",
                                "expert[1] sd", "expert[2] intercept", "expert[2] times", "expert[2] sd"]
    assert math.isclose(naive_loglik(est, x, y, 2), float(res.loglik), rel_tol=1e-12)
    ref = fd_standard_errors(lambda t: naive_loglik(t, x, y, 2), est)
    np.testing.assert_allclose(inf.se, ref, rtol=0.01)
    assert (inf.status == "estimated").all() and inf.switch_points == [[]]


def test_standard_errors_two_features_and_three_experts():
    rng = np.random.default_rng(3)
    n = 600
    x = rng.normal(size=(n, 2))
    truth = moelab.GaussianMoE(moelab.SoftmaxGate(torch.tensor([[1.5, -1.0], [-1.0, 0.5], [0.0, 0.0]]),
                                                  torch.tensor([0.3, -0.2, 0.0])),
                               moelab.GaussianExperts(torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -2.0]]),
                                                      torch.tensor([3.0, 0.0, -3.0]), torch.tensor([0.5, 0.3, 0.4])))
    y = truth.sample(torch.tensor(x), torch.Generator().manual_seed(0)).numpy()
    res = moelab.fit_em(x, y, 3, init_model=truth, random_state=0)
    inf = wald_inference(res.model, x, y)
    ref = fd_standard_errors(lambda t: naive_loglik(t, x, y, 3), inf.estimate)
    np.testing.assert_allclose(inf.se, ref, rtol=0.01)


def test_estimated_temperature_of_a_tanh_gate_has_a_standard_error():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=(400, 1))
    truth = moelab.GaussianMoE(moelab.ActivationGate(torch.tensor([[2.0], [0.0]]), torch.tensor([0.2, 0.0]),
                                                     temperature=0.5, activation="tanh", learn_temperature=True),
                               moelab.GaussianExperts(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, -1.0]),
                                                      torch.tensor([0.09, 0.16])))
    y = truth.sample(torch.tensor(x), torch.Generator().manual_seed(1)).numpy()
    inf = wald_inference(truth, x, y)  # at any point: the Hessian there (truth is near the optimum)
    assert "temperature" in inf.layout.names and (inf.status == "estimated").all()
    f = lambda t: naive_loglik(t, x, y, 2, gate="activation", learn_tau=True)  # noqa: E731
    np.testing.assert_allclose(inf.se, fd_standard_errors(f, inf.estimate), rtol=0.01)
    assert inf.as_params()["gate"]["temperature"] > 0


def test_temperature_not_identified_or_fixed_has_no_standard_error(mcycle):
    x, y = mcycle
    res = moelab.fit_em(x, y, 2, gate="temperature", gate_options={"learn_temperature": True}, random_state=0, warn=False,
                        n_init=20)
    inf = wald_inference(res.model, x, y)
    i = inf.layout.names.index("temperature")
    assert inf.status[i] == "not identified" and math.isnan(inf.se[i])
    assert inf.as_params()["gate"]["temperature"] is None
    assert inf.status_params()["gate"]["temperature"] == "not identified"
    assert np.isfinite(np.delete(inf.se, i)).all()  # the rest: conditional on τ
    fixed = moelab.fit_em(x, y, 2, gate="temperature", gate_options={"temperature": 2.0}, random_state=0, n_init=20)
    inf2 = wald_inference(fixed.model, x, y)
    assert "temperature" not in inf2.layout.names
    assert inf2.as_params()["gate"]["temperature"] is None and inf2.status_params()["gate"]["temperature"] == "fixed"
    # the fixed-τ fit is the softmax fit with slopes scaled by τ: same SEs for the slope times τ
    soft = wald_inference(moelab.fit_em(x, y, 2, random_state=0, n_init=20).model, x, y)
    np.testing.assert_allclose(inf2.se[1], 2.0 * soft.se[1], rtol=1e-4)


def test_as_params_mirrors_the_parameters(mcycle):
    x, y = mcycle
    inf = wald_inference(moelab.fit_em(x, y, 2, random_state=0).model, x, y)
    sp = inf.as_params()
    assert sp["gate"]["slope"][1] == [None] and sp["gate"]["intercept"][1] is None  # reference expert
    assert len(sp["experts"]["slope"]) == 2 and len(sp["experts"]["slope"][0]) == 1
    assert sp["expert_size"] == [None, None]
    sd, se_sd = inf.estimate[inf.layout.expert_sd], inf.se[inf.layout.expert_sd]
    np.testing.assert_allclose(sp["experts"]["variance"], 2 * sd * se_sd)  # delta method
    assert inf.status_params()["gate"]["intercept"] == ["estimated", "reference"]


def test_confint_columns_and_level(mcycle):
    x, y = mcycle
    inf = wald_inference(moelab.fit_em(x, y, 2, random_state=0).model, x, y)
    ci = inf.confint(0.9)
    assert list(ci.columns) == ["parameter", "estimate", "se", "lower", "upper", "status"]
    np.testing.assert_allclose(ci["upper"] - ci["estimate"], 1.6448536269514722 * ci["se"])
    with pytest.raises(ValueError, match="level must be a number in"):
        inf.confint(95)


def test_wald_intervals_cover_the_truth_in_95_percent_of_replicates():
    """200 replicates fitted in one batched call from the truth; each parameter's coverage of its 95%
    Wald interval must lie in the central 99.9% of Binomial(200, 0.95): [181, 197] (fixed seed), and the
    coverage pooled over the 8 parameters within ±3 points of 95%."""
    R, n = 200, 1000
    gen = torch.Generator().manual_seed(7)
    truth = moelab.GaussianMoE(moelab.SoftmaxGate(torch.tensor([[3.0], [0.0]]), torch.tensor([0.5, 0.0])),
                               moelab.GaussianExperts(torch.tensor([[1.0], [-1.5]]), torch.tensor([0.5, -0.5]),
                                                      torch.tensor([0.25, 0.09])))
    x = torch.rand(R, n, 1, generator=gen, dtype=torch.float64) * 2 - 1
    y = truth.sample(x, gen)
    res = moelab.fit_em(x, y, 2, init_model=truth, random_state=0)
    inf = wald_inference(res.model, x, y, warn=False)
    theta = moelab.inference.ParameterLayout.of(truth).vector(
        moelab.GaussianMoE(truth.gate.map_tensors(lambda t: t[None]), truth.experts.map_tensors(lambda t: t[None])))
    theta = theta.numpy()[0]
    covered = np.abs(inf.estimate - theta) <= 1.959963984540054 * inf.se  # (R, p)
    lo, hi = binom.ppf(0.0005, R, 0.95), binom.ppf(0.9995, R, 0.95)
    per = covered.sum(0)
    assert ((per >= lo) & (per <= hi)).all(), (per, lo, hi)
    assert abs(covered.mean() - 0.95) < 0.03


# ------------------------------------------------------------ hard switches (item 2)
def test_mcycle_three_experts_hard_switch_is_reported(mcycle):
    """Issue 15: mcycle, 3 experts, gate slope 133.6 per ms, intercept -3219 (plain EM's stop; SQUAREM
    stops at a sharper switch of the same likelihood, 139.05 and -3350.9)."""
    x, y = mcycle
    res = moelab.fit_em(x, y, 3, random_state=0, accelerate=None)
    np.testing.assert_allclose(res.model.gate.slope[0, 0], 133.58, rtol=1e-3)
    with pytest.warns(SeparationWarning, match=r"numerically 0 or 1.*expert 3 to expert 1.*times = 24\.09"):
        inf = wald_inference(res.model, x, y, feature_names=["times"])
    assert list(inf.status[:2]) == ["unbounded", "unbounded"] and np.isnan(inf.se[:2]).all()
    assert (inf.status[2:] == "estimated").all() and np.isfinite(inf.se[2:]).all()
    (sw,) = inf.switch_points[0]
    assert (sw.expert, sw.versus) == (1, 3)
    assert sw.location == pytest.approx(3219.0956 / 133.58001, rel=1e-6)
    assert sw.data_interval == (24.0, 24.2) and sw.likelihood_interval == (24.0, 24.2)
    assert sw.loglik_gap > 0  # the slope still grows at the stop
    ci = inf.confint()
    assert ci["upper"][1] == np.inf and np.isnan(ci["lower"][1])
    row = ci[ci["parameter"] == "gate[1] switch (times)"].iloc[0]
    assert (row["lower"], row["upper"]) == (24.0, 24.2)
    assert inf.status_params()["gate"]["slope"][0] == ["unbounded"]


def step_data():
    """A step at x = 0.5 in y: x = linspace(0, 1, 200), y = 1{x > 0.5} + 0.1·N(0, 1) (seed 0)."""
    x = np.linspace(0, 1, 200)
    return x[:, None], (x > 0.5) + 0.1 * np.random.default_rng(0).standard_normal(200)


def test_step_in_y_is_a_hard_switch_whose_slope_grows_with_more_iterations():
    x, y = step_data()
    res = moelab.fit_em(x, y, 2, random_state=0, accelerate=None)  # plain EM: SQUAREM saturates the gate at once
    slope = abs(float(res.model.gate.slope[0, 0]))
    assert res.converged and slope > 1000  # "converged" with a slope that the data do not bound
    more = moelab.fit_em(x, y, 2, init_model=res.model, tol=0, max_iter=500, warn=False, accelerate=None)
    assert abs(float(more.model.gate.slope[0, 0])) > slope and float(more.loglik) >= float(res.loglik)
    with pytest.warns(SeparationWarning, match=r"x0 = 0\.5"):
        inf = wald_inference(res.model, x, y)
    (sw,) = inf.switch_points[0]
    assert sw.location == pytest.approx(0.5, abs=0.003)
    assert sw.likelihood_interval[0] < 0.5 < sw.likelihood_interval[1]
    assert sw.likelihood_interval == pytest.approx((99 / 199, 100 / 199))


def test_smooth_gate_is_not_flagged(mcycle):
    x, y = mcycle
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeparationWarning)
        inf = wald_inference(moelab.fit_em(x, y, 2, random_state=0).model, x, y)
    assert (inf.status == "estimated").all()


def test_not_a_maximum_gives_no_standard_errors(mcycle):
    x, y = mcycle
    start = moelab.fit_em(x, y, 2, random_state=0, max_iter=1, n_init=1, init="kmeans", warn=False).model
    bad = moelab.GaussianMoE(start.gate, start.experts.replace(variance=start.experts.variance * 30))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = wald_inference(bad, x, y)
    assert [w.category for w in caught] == [RuntimeWarning] and "not positive definite" in str(caught[0].message)
    assert np.isnan(inf.se).all() and (inf.status == "not a maximum").all() and inf.switch_points == [[]]


def test_bad_input_is_refused(mcycle):
    x, y = mcycle
    model = moelab.fit_em(x, y, 2, random_state=0, n_init=5).model
    with pytest.raises(ValueError, match="feature_names has 2 names for 1 features"):
        wald_inference(model, x, y, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="x has 2 features but the model has 1"):
        wald_inference(model, np.hstack([x, x]), y)
    with pytest.raises(TypeError, match="GaussianMoE"):
        wald_inference("model", x, y)
    x0 = x.copy()
    wald_inference(model, x, y)
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------------ R flexmix refit() references
def _flexmix_model(table):
    """flexmix's refit coefficients → a moelab model. flexmix: gate multinom with component 1 as the
    reference (concomitant_Comp.2 = logit_2 − logit_1); moelab: the last expert is the reference, so
    gate[1] = logit_1 − logit_2 = −(flexmix's Comp.2 coefficients), same standard errors. flexmix's optim
    works on log(sigma); se(σ) = σ·se(log σ) (delta method)."""
    r = table.set_index("name")["estimate"]
    e = lambda k, t: r[f"model.1_Comp.{k}_{t}"]  # noqa: E731
    gate = moelab.SoftmaxGate(torch.tensor([[-r["concomitant_Comp.2.x"]], [0.0]]),
                              torch.tensor([-r["concomitant_Comp.2.(Intercept)"], 0.0]))
    sd = np.exp([e(1, "log(sigma)"), e(2, "log(sigma)")])
    experts = moelab.GaussianExperts(torch.tensor([[e(1, "coef.x")], [e(2, "coef.x")]]),
                                     torch.tensor([e(1, "coef.(Intercept)"), e(2, "coef.(Intercept)")]),
                                     torch.tensor(sd**2))
    s = table.set_index("name")["se"]
    se = np.array([s["concomitant_Comp.2.(Intercept)"], s["concomitant_Comp.2.x"],
                   s["model.1_Comp.1_coef.(Intercept)"], s["model.1_Comp.1_coef.x"], s["model.1_Comp.1_log(sigma)"] * sd[0],
                   s["model.1_Comp.2_coef.(Intercept)"], s["model.1_Comp.2_coef.x"], s["model.1_Comp.2_log(sigma)"] * sd[1]])
    return moelab.GaussianMoE(gate, experts), se


@pytest.mark.parametrize("name, xcol, ycol, own_rtol", [("mcycle", "times", "accel", 1e-3),
                                                        ("faithful", "eruptions", "waiting", 0.06)])
def test_standard_errors_match_flexmix_refit(name, xcol, ycol, own_rtol):
    """tests/data/flexmix_refit.R (flexmix 2.3-18, concomitant = FLXPmultinom(~ x), started from moelab's
    posterior). At flexmix's own refit estimates both Hessians agree to 0.1% (R's is optim's numerical
    one). At moelab's optimum, 0.1% on mcycle; on faithful refit's optim stopped 2e-4 below the maximum on
    the flat gate ridge, where the gate SEs change by 5% (expert SEs 0.2%)."""
    import pandas as pd

    DATA = Path(__file__).parent / "data"
    df = moelab.load_dataset(name)
    x, y = df[[xcol]].to_numpy(), df[ycol].to_numpy()
    model, se_r = _flexmix_model(pd.read_csv(DATA / f"flexmix_refit_{name}.csv"))
    np.testing.assert_allclose(wald_inference(model, x, y).se, se_r, rtol=1e-3)
    fit = moelab.fit_em(x, y, 2, random_state=0)
    assert float(fit.loglik) >= float(model.loglik(x, y)) - 1e-6  # moelab's point is at least as good
    own = wald_inference(fit.model, x, y)
    assert (np.abs(own.estimate - wald_inference(model, x, y).estimate) <= 0.05 * se_r).all()  # same optimum
    np.testing.assert_allclose(own.se, se_r, rtol=own_rtol)


def test_parameters_without_local_information(mcycle):
    """A top-1 gate's likelihood is piecewise constant in the gate; a relu gate stuck at slope 0 has
    relu'(0) = 0: both 'no information', never 'unbounded', and the experts keep their SEs."""
    x, y = mcycle
    top1 = moelab.fit_em(x, y, 2, gate="topk", gate_options={"top_k": 1}, n_init=10, random_state=0)
    inf = wald_inference(top1.model, x, y)
    assert list(inf.status[:2]) == ["no information"] * 2 and np.isfinite(inf.se[2:]).all()
    relu_fit = moelab.fit_em(x, y, 2, gate="activation", gate_options={"activation": "relu", "learn_temperature": True},
                             n_init=10, random_state=0, warn=False)
    assert float(relu_fit.model.gate.slope[0, 0]) == 0.0  # EM stays at relu's flat zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relu = wald_inference(relu_fit.model, x, y)
    assert list(relu.status[:3]) == ["estimated", "no information", "not identified"]
    assert relu.status[1] == "no information" and relu.switch_points == [[]]


def test_hard_switch_in_two_features_is_a_hyperplane():
    """y steps across the line x1 + x2 = 0.2: reported as u·x = t with u ≈ (1, 1)/√2, t ≈ 0.2/√2."""
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(400, 2))
    y = 2.0 * (x.sum(1) > 0.2) + 0.1 * rng.standard_normal(400)
    res = moelab.fit_em(x, y, 2, random_state=0, n_init=20)
    with pytest.warns(SeparationWarning, match="hyperplane"):
        inf = wald_inference(res.model, x, y, feature_names=["a", "b"])
    (sw,) = inf.switch_points[0]
    u = np.array(sw.normal) * np.sign(sw.normal[0])
    np.testing.assert_allclose(u, [2**-0.5, 2**-0.5], atol=0.05)
    assert abs(sw.offset * np.sign(sw.normal[0]) - 0.2 / 2**0.5) < 0.03 and sw.location is None
    lo, hi = sw.likelihood_interval
    assert lo <= sw.offset <= hi
    assert inf.confint()["parameter"].iloc[-1] == "gate[1] switch offset"


def test_hard_switch_with_an_almost_uninformed_intercept_keeps_its_standard_errors():
    """The diamonds 6k × 3 default fit (tests/data/diamonds6k_hard_switch_fit.json): expert 2's switch is hard, so
    its intercept carries almost no information. Inverting the raw observed information lost that direction to
    rounding (an eigenvalue ≤ 0) and made every standard error NaN; the correlation form keeps them. Reference:
    the same fit's parameters 1e-11 away (previous EM), whose raw inverse happened to survive — the standard
    errors of the other 19 parameters agree to 1e-6 relative."""
    import json
    from pathlib import Path

    p = json.loads((Path(__file__).parent / "data" / "diamonds6k_hard_switch_fit.json").read_text())
    t = lambda k: torch.tensor(p[k], dtype=torch.float64)  # noqa: E731
    model = moelab.GaussianMoE(moelab.SoftmaxGate(t("gate_slope"), t("gate_intercept")),
                               moelab.GaussianExperts(t("expert_slope"), t("expert_intercept"), t("expert_variance")))
    d = moelab.load_dataset("diamonds").iloc[:6000]
    w = moelab.wald_inference(model, d[["carat", "depth", "table"]].to_numpy(), d["price"].to_numpy(), warn=False)
    se = np.asarray(w.se, dtype=float)
    status = np.asarray(w.status)
    assert list(status[4:8]) == ["unbounded"] * 4  # expert 2's gate row
    ok = status == "estimated"
    assert ok.sum() == 19 and np.isfinite(se[ok]).all()
    ref = [2.4883, 0.46961, 0.032299, 0.020791, 256.95, 43.331, 3.2124, 2.3056, 4.3790, 183.84, 67.661, 2.2081,
           1.2813, 1.6977, 158.22, 32.484, 1.9359, 1.3617, 4.6901]
    np.testing.assert_allclose(se[ok], ref, rtol=1e-4)  # the reference is printed to 5 digits


def test_collinear_inputs_are_not_identified_rather_than_not_a_maximum():
    """x = [x0, 2·x0 + 1e-9 noise]: the information is singular (a flat ridge), not indefinite, so the parameters are
    'not identified' with a warning that says so (a test session found 'not a maximum' here)."""
    g = np.random.default_rng(1)
    n = 400
    x = g.uniform(-1, 1, size=(n, 1))
    z = x[:, 0] + 0.3 * g.normal(size=n) > 0
    y = np.where(z, 1 + 2 * x[:, 0], -1 - x[:, 0]) + 0.5 * g.normal(size=n)
    xd = np.c_[x, 2 * x + 1e-9 * g.normal(size=(n, 1))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = moelab.fit_em(xd, y, 2, random_state=0, n_init=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf = wald_inference(fit.model, xd, y)
    assert abs(float(inf.min_eigenvalue)) <= 1e-8
    assert (np.asarray(inf.status) == "not identified").all() and np.isnan(inf.se).all()
    msgs = [str(w.message) for w in caught]
    assert any("singular" in m and "not identified" in m for m in msgs) and not any("not positive definite" in m for m in msgs)
