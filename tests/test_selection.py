"""Choosing K: select_n_experts, ICL, K = 1 by least squares (issue 15 item 3)."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from moelab import MixtureOfExpertsRegressor, fit_em, load_dataset, select_n_experts
from moelab.selection import (choose_n_experts, linear_regression_model, parse_experts,
                              responsibility_entropy)

FAST = dict(n_init=2, n_candidates=8, max_iter=300, random_state=0)


@pytest.fixture(scope="module")
def mcycle():
    df = load_dataset("mcycle")
    return df[["times"]], df["accel"]


@pytest.fixture(scope="module")
def table(mcycle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_n_experts(*mcycle, "1-3", return_estimators=True, **FAST)


@pytest.mark.parametrize("spec,expected", [("1-6", [1, 2, 3, 4, 5, 6]), ("1,2,4", [1, 2, 4]), ("2-4,6", [2, 3, 4, 6]),
                                           (" 3 , 1-2 ", [1, 2, 3]), ("4,4", [4]), (range(1, 4), [1, 2, 3]), (5, [5])])
def test_parse_experts(spec, expected):
    assert parse_experts(spec) == expected


@pytest.mark.parametrize("spec,message", [("1-x", "cannot read '1-x'"), ("6-1", "is empty; write it as 1-6"),
                                          ("0-3", "must be >= 1"), ("", "cannot read ''"), ([2.5], "integers"),
                                          ([], "no number of experts")])
def test_parse_experts_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_experts(spec)


def test_entropy():
    assert responsibility_entropy([[1.0, 0.0], [0.0, 1.0]]) == 0.0
    assert responsibility_entropy([[0.5, 0.5]]) == pytest.approx(math.log(2))
    r = np.array([[0.2, 0.3, 0.5]])
    assert responsibility_entropy(r) == pytest.approx(-(r * np.log(r)).sum())


def test_one_expert_is_least_squares(mcycle):
    X, y = (a.to_numpy(dtype=float) for a in mcycle)
    model = linear_regression_model(X, y)
    design = np.column_stack([X, np.ones(len(y))])
    coef, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(model.experts.slope.numpy()[0], coef[:1], rtol=1e-12)
    np.testing.assert_allclose(model.experts.intercept.numpy(), coef[1:], rtol=1e-12)
    n = len(y)
    assert float(model.loglik(torch.tensor(X), torch.tensor(y))) == pytest.approx(
        -n / 2 * (math.log(2 * math.pi * rss[0] / n) + 1), rel=1e-12)  # the Gaussian MLE in closed form
    res = fit_em(X, y, 1, random_state=0)  # EM with all its starts agrees
    assert float(res.loglik) == pytest.approx(float(model.loglik(torch.tensor(X), torch.tensor(y))), rel=1e-12)


def test_table(table, mcycle):
    tab, ests = table
    assert list(tab.columns) == ["n_experts", "loglik", "n_params", "bic", "aic", "icl", "min_expert_size",
                                 "converged", "degenerate"]
    assert tab["n_experts"].tolist() == [1, 2, 3]
    assert tab["n_params"].tolist() == [3, 8, 13]  # K(d + 2) + (K - 1)(d + 1), d = 1
    n = 133
    np.testing.assert_allclose(tab["bic"], -2 * tab["loglik"] + tab["n_params"] * math.log(n))
    np.testing.assert_allclose(tab["aic"], -2 * tab["loglik"] + 2 * tab["n_params"])
    assert tab.loc[0, "icl"] == tab.loc[0, "bic"]  # one expert: entropy 0
    assert tab.loc[0, "min_expert_size"] == n
    X, y = mcycle
    for K in (2, 3):  # ICL = BIC + 2 EN from the fitted estimator's responsibilities
        est = ests[K]
        resp = est.model_.responsibilities(torch.tensor(X.to_numpy()), torch.tensor(y.to_numpy())).numpy()
        row = tab[tab["n_experts"] == K].iloc[0]
        assert row["icl"] == pytest.approx(row["bic"] + 2 * responsibility_entropy(resp), rel=1e-12)
        assert row["icl"] > row["bic"]
        assert row["min_expert_size"] == pytest.approx(est.expert_size_.min())
    assert tab.attrs == {"criterion": "bic", "chosen": int(tab.loc[tab["bic"].idxmin(), "n_experts"])}


def test_row_equals_the_estimator_with_the_same_seed(table, mcycle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MixtureOfExpertsRegressor(3, **FAST).fit(*mcycle)
    assert table[0].loc[2, "loglik"] == pytest.approx(est.loglik_, rel=1e-12)


def test_k1_estimator_predicts_least_squares(table, mcycle):
    est = table[1][1]
    X, y = mcycle
    coef = np.polyfit(X["times"], y, 1)
    np.testing.assert_allclose(est.predict(X), np.polyval(coef, X["times"]), rtol=1e-9)
    np.testing.assert_allclose(est.predict_proba(X), 1.0)
    assert est.get_params()["gate"] == "softmax"


def test_criterion_chooses(mcycle):
    tab = pd.DataFrame({"n_experts": [1, 2, 3, 4], "bic": [10.0, 5.0, 5.0, 1.0], "aic": [3.0, 2.0, 1.0, 0.0],
                        "icl": [4.0, 3.0, 3.0, 9.0], "degenerate": [False, False, False, True]})
    assert choose_n_experts(tab, "bic") == 2  # K = 4 collapsed; tie 2/3 -> smaller K
    assert choose_n_experts(tab, "aic") == 3
    assert choose_n_experts(tab, "icl") == 2
    assert choose_n_experts(tab.assign(degenerate=True), "bic") is None
    with pytest.raises(ValueError, match="criterion must be one of bic, aic, icl"):
        choose_n_experts(tab, "cv")


def test_icl_prefers_separated_experts():
    """Two overlapping lines (slopes 1 and 1.05): ICL's entropy penalty makes it choose fewer experts than AIC."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, 400)
    y = np.where(rng.random(400) < 0.5, x, 1.05 * x + 0.05) + 0.3 * rng.normal(size=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = select_n_experts(x[:, None], y, [1, 2], criterion="icl", **FAST)
    assert tab.attrs["chosen"] == 1
    assert (tab["icl"] >= tab["bic"]).all()


def test_errors(mcycle):
    X, y = mcycle
    with pytest.raises(ValueError, match="criterion must be one of"):
        select_n_experts(X, y, [1, 2], criterion="bayes")
    with pytest.raises(ValueError, match=r"n_experts=2: top_k=3 is outside \[1, n_experts=2\]"):  # invalid settings before any fit
        select_n_experts(X, y, [1, 2], gate="topk", top_k=3)
    with pytest.raises(ValueError, match="constant"):
        select_n_experts(np.ones((20, 1)), np.arange(20.0), [1])
    with pytest.raises(ValueError, match="n_experts=4: "):  # the K is named
        select_n_experts(X.iloc[:12], y.iloc[:12], [1, 4], **FAST)


def test_warnings_name_their_k(mcycle):
    with pytest.warns(Warning, match=r"^n_experts=3: "):
        select_n_experts(*mcycle, [3], n_init=1, n_candidates=2, max_iter=2, random_state=0)
