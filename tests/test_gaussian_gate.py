"""Gaussian-gated MoE (issue 12, part 2): gate maths, closed-form EM, recovery, units, errors, BIC."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from moelab import GaussianExperts, GaussianGate, GaussianMoE, MixtureOfExpertsRegressor, fit_em, fit_mle
from moelab.gates import gate_spec, make_gate

DT = torch.float64


def authors_truth(d=1):
    """The CRPE-GMoE Type I design (models.py, model 1 / 3), d = 1 or 2."""
    pi = torch.tensor([0.3, 0.4, 0.3], dtype=DT)
    c = torch.tensor([-0.1, 0.1, 0.5], dtype=DT)[:, None].expand(3, d)
    gam = torch.tensor([0.042824, 0.0175, 0.01], dtype=DT)[:, None, None] * torch.eye(d, dtype=DT)
    a = torch.tensor([0.017324 / 0.042824, -0.0125 / 0.0175, 0.0], dtype=DT)[:, None].expand(3, d)
    b = torch.tensor([0.3 + 0.1 * 0.017324 / 0.042824, -0.4 + 0.1 * 0.0125 / 0.0175, 0.2], dtype=DT)
    nu = torch.tensor([0.0081759 + 0.1 * 0.017324**2 / 0.042824, 0.0175 + 0.0125**2 / 0.0175, 0.0175], dtype=DT)
    return GaussianMoE(GaussianGate(pi, c, gam), GaussianExperts(a, b, nu))


def draw(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    x, _ = model.gate.sample_x(n, g)
    return x, model.sample(x, g)


def test_log_weights_and_marginal_match_scipy():
    gate = GaussianGate(torch.tensor([0.2, 0.5, 0.3], dtype=DT), torch.tensor([[0.0, 1.0], [1.0, -1.0], [2.0, 0.5]], dtype=DT),
                        torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.4, -0.1], [-0.1, 0.2]], [[2.0, 0.0], [0.0, 1.0]]], dtype=DT))
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    comp = np.stack([np.log(w) + multivariate_normal(m, C).logpdf(x.numpy())
                     for w, m, C in zip(gate.proportions.numpy(), gate.means.numpy(), gate.covariances.numpy())], -1)
    ref_marg = np.logaddexp.reduce(comp, -1)
    np.testing.assert_allclose(gate.log_marginal(x).numpy(), ref_marg, rtol=1e-12)
    np.testing.assert_allclose(gate.log_weights(x).numpy(), comp - ref_marg[:, None], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gate.weights(x).sum(-1).numpy(), 1.0, rtol=1e-12)


def test_m_step_matches_weighted_formulas_and_maximises_q():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 200, 2, generator=g, dtype=DT)
    resp = torch.softmax(torch.randn(1, 3, 200, generator=g, dtype=DT), -2)
    new = make_gate("gaussian", 3, 2, (1,)).m_step(x, resp)
    r, xn = resp[0].numpy(), x[0].numpy()
    for k in range(3):
        nk = r[k].sum()
        mk = (r[k, :, None] * xn).sum(0) / nk
        Sk = ((r[k, :, None] * (xn - mk)).T @ (xn - mk)) / nk
        np.testing.assert_allclose(new.proportions[0, k].item(), nk / 200, rtol=1e-12)
        np.testing.assert_allclose(new.means[0, k].numpy(), mk, rtol=1e-12)
        np.testing.assert_allclose(new.covariances[0, k].numpy(), Sk, rtol=1e-10)

    def q(gate):
        return float((resp * gate.logits_kn(x)).sum())

    q0 = q(new)
    for eps in (1e-3, -1e-3):  # perturbing any parameter lowers Q (first-order optimality)
        for change in ({"means": new.means + eps}, {"covariances": new.covariances * (1 + eps)}):
            assert q(new.replace(**change)) < q0


def test_covariance_floor_is_the_constrained_maximiser():
    x = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]], dtype=DT)  # collinear: singular scatter
    resp = torch.ones(1, 1, 3, dtype=DT)
    new = GaussianGate.uniform(1, 2, (1,), reg_covariance=1e-3).m_step(x, resp)
    ev = torch.linalg.eigvalsh(new.covariances[0, 0])
    assert float(ev.min()) == pytest.approx(1e-3, rel=1e-9)
    assert float(ev.max()) == pytest.approx(4.0 / 3.0, rel=1e-9)


@pytest.mark.parametrize("d", [1, 2])
def test_em_never_decreases_joint_loglik_per_step(d):
    """Three data sets fitted as one batch, 300 EM steps each from random starts (over-specified, K = 4)."""
    truth = authors_truth(d)
    data = [draw(truth, 400, seed=10 * d + s) for s in range(3)]
    x, y = torch.stack([a for a, _ in data]), torch.stack([b for _, b in data])
    res = fit_em(x, y, 4, gate="gaussian", init="random", n_init=4, max_iter=300, tol=0, random_state=0, warn=False)
    for h in res.history:
        h = h[~torch.isnan(h)]
        assert h.numel() == 301
        steps = h[1:] - h[:-1]
        assert float(steps.min()) >= -1e-9 * float(h.abs().max()), float(steps.min())


def test_loglik_is_joint_and_x_loglik_in_original_units():
    truth = authors_truth(1)
    x, y = draw(truth, 500, seed=7)
    res = fit_em(x, y, 3, gate="gaussian", init_model=truth, max_iter=50, random_state=0, warn=False)
    m = res.model
    joint = float(m.loglik(x, y) + m.gate.log_marginal(x).sum())
    assert float(res.loglik) == pytest.approx(joint, rel=1e-10)
    assert float(res.x_loglik) == pytest.approx(float(m.gate.log_marginal(x).sum()), rel=1e-10)


def test_units_equivariance():
    """Fitting 10·x + 3 and 5·y − 1 gives the mapped parameters and ℓ − n log 10 − n log 5."""
    truth = authors_truth(1)
    x, y = draw(truth, 600, seed=11)
    kw = dict(gate="gaussian", init="kmeans", n_init=4, random_state=0, tol=1e-12, max_iter=3000, warn=False)
    a, b = fit_em(x, y, 3, **kw), fit_em(10 * x + 3, 5 * y - 1, 3, **kw)
    assert float(b.loglik) == pytest.approx(float(a.loglik) - 600 * (math.log(10) + math.log(5)), rel=1e-7)
    oa, ob = a.model.gate.means[:, 0].argsort(), b.model.gate.means[:, 0].argsort()
    np.testing.assert_allclose(b.model.gate.means[ob, 0], 10 * a.model.gate.means[oa, 0] + 3, rtol=1e-5)
    np.testing.assert_allclose(b.model.gate.covariances[ob, 0, 0], 100 * a.model.gate.covariances[oa, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(b.model.experts.variance[ob], 25 * a.model.experts.variance[oa], rtol=1e-5)


@pytest.mark.parametrize("d", [1, 2])
def test_recovers_truth_at_n_20000(d):
    """Tolerances (stated): |π̂−π| < 0.02, |ĉ−c| < 0.02, |Γ̂−Γ| < 15% of Γ, |Â−A| < 0.1, |b̂−b| < 0.03,
    |ν̂−ν| < 15% of ν, every expert matched up to permutation by its gate mean (about 4 sd at n = 20,000)."""
    truth = authors_truth(d)
    x, y = draw(truth, 20000, seed=2024 + d)
    res = fit_em(x, y, 3, gate="gaussian", init="kmeans", n_init=6, random_state=0, warn=False)
    m = res.model
    order = m.gate.means[:, 0].argsort()  # truth's means are increasing: -0.1, 0.1, 0.5
    g, e = m.gate, m.experts
    assert (g.proportions[order] - truth.gate.proportions).abs().max() < 0.02
    assert (g.means[order] - truth.gate.means).abs().max() < 0.02
    assert ((g.covariances[order] - truth.gate.covariances).abs() <= 0.15 * truth.gate.covariances.diagonal(dim1=-2, dim2=-1)[..., None]).all()
    assert (e.slope[order] - truth.experts.slope).abs().max() < 0.1
    assert (e.intercept[order] - truth.experts.intercept).abs().max() < 0.03
    assert ((e.variance[order] - truth.experts.variance).abs() < 0.15 * truth.experts.variance).all()
    assert bool(res.converged)


def test_parameter_counts_joint_and_conditional():
    spec = gate_spec("gaussian")
    assert spec.n_free_parameters(3, 1) == 2 + 3 + 3
    assert spec.n_free_parameters(3, 2) == 2 + 6 + 9
    g = make_gate("gaussian", 3, 2)
    assert g.n_conditional_parameters() == 2 * (1 + 2 + 3)


def test_estimator_bic_joint_and_conditional():
    truth = authors_truth(1)
    x, y = draw(truth, 300, seed=5)
    X = x.numpy()
    est = MixtureOfExpertsRegressor(3, gate="gaussian", init="kmeans", n_init=4, random_state=0).fit(X, y.numpy())
    ll_c = est.score_samples(X, y.numpy()).sum()
    assert est.loglik_ == pytest.approx(ll_c + est.x_loglik_, rel=1e-9)
    assert est.bic(X, y.numpy()) == pytest.approx(-2 * est.loglik_ + 17 * math.log(300), rel=1e-9)
    assert est.bic(X, y.numpy(), conditional=True) == pytest.approx(-2 * ll_c + 15 * math.log(300), rel=1e-9)
    assert est.gate_covariances_.shape == (3, 1, 1)
    np.testing.assert_allclose(est.predict_proba(X).sum(-1), 1.0)


@pytest.mark.parametrize("call, match", [
    (lambda x, y: fit_em(x, y, 2, gate="gaussian", gate_options={"top_k": 1}), "does not take top_k"),
    (lambda x, y: fit_em(x, y, 2, gate="gaussian", gate_options={"reg_covariance": -1.0}), "reg_covariance must be > 0"),
    (lambda x, y: fit_mle(x, y, 2, gate="gaussian"), "cannot fit the 'gaussian' gate"),
    (lambda x, y: fit_em(x, y, 2, gate="gaussian", compile=True), "compile=True"),
])
def test_bad_options_get_clear_errors(call, match):
    x = torch.linspace(0, 1, 50, dtype=DT)
    with pytest.raises(ValueError, match=match):
        call(x, x.square())


def test_bad_parameters_get_clear_errors():
    c, cov = torch.zeros(2, 1, dtype=DT), torch.ones(2, 1, 1, dtype=DT)
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianGate(torch.tensor([0.5, 0.6], dtype=DT), c, cov)
    with pytest.raises(ValueError, match="must be > 0"):
        GaussianGate(torch.tensor([1.5, -0.5], dtype=DT), c, cov)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianGate(torch.tensor([0.5, 0.5], dtype=DT), c, torch.tensor([[[1.0]], [[-1.0]]], dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        GaussianGate(torch.tensor([0.5, 0.5], dtype=DT), c, torch.ones(2, 2, 2, dtype=DT))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianGate(torch.tensor([1.0], dtype=DT), torch.zeros(1, 2, dtype=DT), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]], dtype=DT))


def test_cli_fit_mcycle_gaussian_reports_joint_and_conditional(capsys):
    from moelab.cli import main

    assert main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", "--gate", "gaussian",
                 "--n-init", "20", "--format", "json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    assert rep["gate"] == "gaussian" and rep["likelihood"] == "joint p(x, y)"
    assert rep["n_free_parameters"] == 17 and rep["n_free_parameters_conditional"] == 15
    assert rep["loglik"] == pytest.approx(rep["loglik_conditional"] + rep["loglik_x"], rel=1e-9)
    assert rep["bic_conditional"] == pytest.approx(-2 * rep["loglik_conditional"] + 15 * math.log(133), rel=1e-9)
    assert len(rep["params"]["gate"]["covariances"]) == 3
    assert main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", "--gate", "gaussian", "--n-init", "20"]) == 0
    text = capsys.readouterr().out
    assert "BIC (y | x)" in text and "log p(y | x)" in text and "Gamma times" in text


@pytest.mark.parametrize("flags, match", [
    (["--estimator", "mle"], "cannot fit the 'gaussian' gate"),
    (["--top-k", "2"], "--top-k needs --gate topk"),
    (["--compile", "on"], "--compile on needs"),
])
def test_cli_bad_flags_for_gaussian(capsys, flags, match):
    from moelab.cli import main

    assert main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", "--gate", "gaussian"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_gaussian_gate_model_file_round_trip(tmp_path):
    """save/load of a Gaussian-gated fit: π, c, Γ stored; the loaded model predicts identically."""
    import moelab

    df = moelab.load_dataset("mcycle")
    est = moelab.MixtureOfExpertsRegressor(2, gate="gaussian", n_init=4, random_state=0).fit(df[["times"]], df["accel"])
    path = est.save(tmp_path / "model.json")
    doc = json.loads(path.read_text())
    assert set(doc["params"]["gate"]) >= {"proportions", "means", "covariances"}
    back = moelab.MixtureOfExpertsRegressor.load(path)
    X = df[["times"]]
    np.testing.assert_allclose(back.predict(X), est.predict(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back.predict_proba(X), est.predict_proba(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(back.gate_means_, est.gate_means_)
