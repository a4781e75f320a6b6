"""Bootstrap refits in one batched fit_em call; the estimator's and the CLI's standard errors (issue 15)."""

import json
import re

import numpy as np
import pytest
import torch

import moelab
from moelab import bootstrap as bootstrap_module
from moelab.bootstrap import bootstrap_fit
from moelab.cli import main
from moelab.inference import wald_inference


@pytest.fixture(scope="module")
def mcycle():
    df = moelab.load_dataset("mcycle")
    x, y = df[["times"]].to_numpy(), df["accel"].to_numpy()
    return x, y, moelab.fit_em(x, y, 2, random_state=0).model


def test_one_batched_fit_em_call_started_from_the_fit(mcycle, monkeypatch):
    x, y, model = mcycle
    calls = []
    real = bootstrap_module.fit_em

    def spy(xb, yb, K, **kw):
        calls.append((tuple(xb.shape), tuple(yb.shape), kw["init_model"]))
        return real(xb, yb, K, **kw)

    monkeypatch.setattr(bootstrap_module, "fit_em", spy)
    b = bootstrap_fit(model, x, y, 30, random_state=0)
    assert len(calls) == 1 and calls[0][:2] == ((30, 133, 1), (30, 133)) and calls[0][2] is model
    assert b.draws.shape == (30, 8) and b.n_valid == 30


def test_reproducible_by_seed_and_kinds_differ(mcycle):
    x, y, model = mcycle
    a = bootstrap_fit(model, x, y, 20, random_state=5)
    b = bootstrap_fit(model, x, y, 20, random_state=5)
    c = bootstrap_fit(model, x, y, 20, random_state=6)
    p = bootstrap_fit(model, x, y, 20, random_state=5, kind="parametric")
    np.testing.assert_array_equal(a.draws, b.draws)
    assert not np.allclose(a.draws, c.draws) and not np.allclose(a.draws, p.draws)
    lo, hi = a.percentile_interval(0.9)
    assert (lo <= hi).all()
    np.testing.assert_allclose(lo, np.quantile(a.draws, 0.05, axis=0))
    ci = a.confint()
    assert list(ci.columns) == ["parameter", "estimate", "se", "lower", "upper"]
    sp = a.as_params()
    assert sp["lower"]["gate"]["slope"][1] == [None]
    assert sp["upper"]["experts"]["variance"][0] == pytest.approx(sp["upper"]["experts"]["sd"][0] ** 2)


def test_parametric_bootstrap_se_agrees_with_wald_on_a_regular_model():
    """n = 1000 from a smooth 2-expert model; 200 parametric refits. The bootstrap sd has a relative
    Monte Carlo error of about 1/sqrt(2·199) = 5%; tolerance 20% for every parameter."""
    gen = torch.Generator().manual_seed(11)
    truth = moelab.GaussianMoE(moelab.SoftmaxGate(torch.tensor([[3.0], [0.0]]), torch.tensor([0.5, 0.0])),
                               moelab.GaussianExperts(torch.tensor([[1.0], [-1.5]]), torch.tensor([0.5, -0.5]),
                                                      torch.tensor([0.25, 0.09])))
    x = torch.rand(1000, 1, generator=gen, dtype=torch.float64) * 2 - 1
    y = truth.sample(x, gen)
    fit = moelab.fit_em(x, y, 2, init_model=truth).model
    b = bootstrap_fit(fit, x, y, 200, kind="parametric", random_state=0)
    w = wald_inference(fit, x, y)
    assert b.n_valid == 200
    np.testing.assert_allclose(b.se(), w.se, rtol=0.2)


def test_relabelled_replicates_are_aligned(mcycle):
    x, y, model = mcycle
    # the fit with its experts swapped (gate re-referenced to the new last expert) is the same model
    g, e = model.gate, model.experts
    swapped = moelab.GaussianMoE(
        moelab.SoftmaxGate(g.slope.flip(0) - g.slope[0], g.intercept.flip(0) - g.intercept[0]),
        moelab.GaussianExperts(e.slope.flip(0), e.intercept.flip(0), e.variance.flip(0)))
    np.testing.assert_allclose(swapped.loglik(x, y), model.loglik(x, y))
    batch = moelab.GaussianMoE(
        moelab.SoftmaxGate(torch.stack([g.slope, swapped.gate.slope]), torch.stack([g.intercept, swapped.gate.intercept])),
        moelab.GaussianExperts(torch.stack([e.slope, swapped.experts.slope]), torch.stack([e.intercept, swapped.experts.intercept]),
                               torch.stack([e.variance, swapped.experts.variance])))
    aligned, moved = bootstrap_module._align(batch, model, torch.tensor(x), torch.tensor(y))
    assert moved == 1
    torch.testing.assert_close(aligned.gate.slope[1], g.slope)
    torch.testing.assert_close(aligned.experts.intercept[1], e.intercept)


def test_bootstrap_errors(mcycle):
    x, y, model = mcycle
    with pytest.raises(ValueError, match="n_boot must be an integer >= 2"):
        bootstrap_fit(model, x, y, 1)
    with pytest.raises(ValueError, match="kind must be one of nonparametric, parametric"):
        bootstrap_fit(model, x, y, 10, kind="wild")
    with pytest.raises(ValueError, match="x must have shape"):
        bootstrap_fit(model, np.hstack([x, x]), y, 10)


# ------------------------------------------------------------------ estimator
def test_estimator_standard_errors_and_confint():
    df = moelab.load_dataset("mcycle")
    reg = moelab.MixtureOfExpertsRegressor(2, random_state=0, bootstrap=20).fit(df[["times"]], df["accel"])
    se = reg.standard_errors_
    assert np.shape(se["gate"]["slope"]) == reg.gate_slope_.shape and se["gate"]["slope"][1] == [None]
    assert se["experts"]["sd"][0] == pytest.approx(2.9439, rel=1e-3)
    wald = reg.confint()
    assert wald["parameter"][1] == "gate[1] times"
    boot = reg.confint(0.9, method="bootstrap")
    assert reg.bootstrap_.n_boot == 20 and len(boot) == 8
    again = moelab.MixtureOfExpertsRegressor(2, random_state=0, bootstrap=20).fit(df[["times"]], df["accel"])
    np.testing.assert_array_equal(again.bootstrap_.draws, reg.bootstrap_.draws)  # seeded by random_state
    with pytest.raises(ValueError, match="method must be 'wald' or 'bootstrap'"):
        reg.confint(method="profile")
    plain = moelab.MixtureOfExpertsRegressor(2, random_state=0, n_init=5).fit(df[["times"]], df["accel"])
    with pytest.raises(ValueError, match="needs the estimator fitted with bootstrap=B"):
        plain.confint(method="bootstrap")
    for bad, msg in (({"bootstrap": 1}, "bootstrap must be None or an integer >= 2"),
                     ({"bootstrap_kind": "wild"}, "bootstrap_kind must be")):
        with pytest.raises(ValueError, match=msg):
            moelab.MixtureOfExpertsRegressor(2, **bad).fit(df[["times"]], df["accel"])


# ------------------------------------------------------------------ CLI
def _shape(v):
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shape(x) for x in v]
    return "leaf"


def test_cli_json_standard_errors_mirror_params(capsys):
    rc = main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", "--format", "json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert _shape(r["standard_errors"]) == _shape(r["params"]) == _shape(r["parameter_status"])
    assert r["standard_errors"]["gate"]["slope"] == [[pytest.approx(2.9534, rel=1e-3)], [None]]
    assert r["parameter_status"]["gate"]["intercept"] == ["estimated", "reference"]
    assert r["switch_points"] == [] and r["confidence_level"] == 0.95


def test_cli_hard_switch_text_and_json(capsys):
    from moelab.summary import format_report

    argv = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", "--format", "json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "gate probabilities numerically 0 or 1" in cap.err
    r = json.loads(cap.out)
    assert r["parameter_status"]["gate"]["slope"][0] == ["unbounded"] and r["standard_errors"]["gate"]["slope"][0] == [None]
    (sw,) = r["switch_points"]
    assert (sw["expert"], sw["versus"], sw["likelihood_interval"]) == (1, 3, [24.0, 24.2])
    text = format_report(r)  # what the text format prints
    assert "unbounded" in text and "gate[1] switch (times)" in text
    assert re.search(r"hard switch: expert 3 -> 1 at times = 24\.09\d\d \(between samples 24 and 24\.2", text)


def test_cli_bootstrap_and_level(capsys):
    argv = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", "--n-init", "20",
            "--bootstrap", "20", "--bootstrap-kind", "parametric", "--level", "0.9", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "boot se" in out and "parametric bootstrap, 20 of 20 refits, 90% percentile interval, seed 3" in out
    r = json.loads((main(argv + ["--format", "json"]), capsys.readouterr().out)[1])
    assert r["bootstrap"]["n_boot"] == 20 and _shape(r["bootstrap"]["lower"]) == _shape(r["params"])
    assert r["confidence_level"] == 0.9


@pytest.mark.parametrize("flags, msg", [(["--bootstrap", "1"], "--bootstrap must be >= 2"),
                                        (["--level", "95"], "--level must be a number in (0, 1)")])
def test_cli_bad_inference_flags(capsys, flags, msg):
    rc = main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
