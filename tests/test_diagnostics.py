"""Warnings that are true (issue 15 item 6): each one tested on the input the issue quotes, and its absence
where it would be false (the README's mcycle fit stays clean)."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import moelab
from moelab import MixtureOfExpertsRegressor, fit_em, fit_mle, load_dataset
from moelab.cli import main
from moelab.diagnostics import RANK_TOL, design_rank, small_experts
from moelab.exceptions import (ConvergenceWarning, DegenerateFitWarning, FewStartsWarning, IdentifiabilityWarning,
                               MoelabWarning, RankDeficientWarning, SmallExpertWarning)

FAST = dict(n_init=10, n_candidates=20, max_iter=300, random_state=0)


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, MoelabWarning)]


def _of(caught, cls):
    return [str(x.message) for x in caught if x.category is cls]


@pytest.fixture(scope="module")
def mcycle():
    df = load_dataset("mcycle")
    return df[["times"]], df["accel"]


@pytest.fixture(scope="module")
def switch():
    """200 samples, y = 2t (t > 0.5) or −t, noise sd 0.1; t ~ U(0, 1), seed 0."""
    rng = np.random.default_rng(0)
    t = rng.uniform(size=200)
    y = np.where(t > 0.5, 2 * t, -t) + 0.1 * rng.normal(size=200)
    return t, y, rng


# ----------------------------------------------------------------- hierarchy
def test_every_moelab_warning_is_a_moelab_warning():
    import sklearn.exceptions

    for cls in (ConvergenceWarning, DegenerateFitWarning, IdentifiabilityWarning, RankDeficientWarning,
                SmallExpertWarning, FewStartsWarning):
        assert issubclass(cls, MoelabWarning) and issubclass(cls, UserWarning)
    assert issubclass(ConvergenceWarning, sklearn.exceptions.ConvergenceWarning)
    assert moelab.ConvergenceWarning is moelab.exceptions.ConvergenceWarning is moelab.em.ConvergenceWarning
    assert moelab.IdentifiabilityWarning is moelab.gates.IdentifiabilityWarning


def test_filtering_the_base_class_silences_them(mcycle):
    X, y = mcycle
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=MoelabWarning)
        MixtureOfExpertsRegressor(2, n_init=1, random_state=0).fit(X, y)
    assert not w


# ------------------------------------------------------------ rank deficiency
@pytest.mark.parametrize("name, second, relation", [
    ("[t, t]", lambda t, rng: t, "t2 ≈ t)"),
    ("[t, 2t]", lambda t, rng: 2 * t, "t2 ≈ 2·t)"),
    ("[t, t + 1e-9·noise]", lambda t, rng: t + 1e-9 * rng.normal(size=t.shape), "t2 ≈ t)"),
])
def test_rank_deficient_x_warns_and_names_the_columns(switch, name, second, relation):
    t, y, rng = switch
    X = pd.DataFrame({"t": t, "t2": second(t, rng), "u": rng.normal(size=t.shape)})
    est, caught = _caught(lambda: MixtureOfExpertsRegressor(2, **FAST).fit(X, y))
    (msg,) = _of(caught, RankDeficientWarning)
    assert "x has numerical rank 2 < 3 columns: 't', 't2' are linearly dependent" in msg, name
    assert relation in msg and "'u'" not in msg
    assert "\n" not in msg
    # fit_em without names says x[:, j]
    _, caught = _caught(lambda: fit_em(X.to_numpy(), y, 2, **FAST))
    assert "'x[:, 0]', 'x[:, 1]' are linearly dependent" in _of(caught, RankDeficientWarning)[0]


def test_full_rank_x_does_not_warn(switch):
    t, y, rng = switch
    # a tiny but real difference, 1e-4 of sd(t): relative singular value ~3e-4 >> 1e-7
    X = np.c_[t, t + 1e-4 * t.std() * rng.normal(size=t.shape), rng.normal(size=t.shape)]
    assert design_rank(X).rank == 3
    _, caught = _caught(lambda: fit_em(X, y, 2, **FAST))
    assert not _of(caught, RankDeficientWarning)


def test_design_rank_against_numpy_and_the_relation_in_original_units():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 10, 500), rng.normal(100, 5, 500)
    x = np.c_[a, b, a + 2 * b - 3]
    r = design_rank(x)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    assert r.rank == np.linalg.matrix_rank(z, tol=RANK_TOL * np.linalg.svd(z, compute_uv=False)[0]) == 2
    col, coef, const = r.relation
    assert col == 2 and r.dependent == (0, 1, 2)
    np.testing.assert_allclose(coef[:2], [1, 2], rtol=1e-9)
    assert const == pytest.approx(-3, rel=1e-7)
    assert "c ≈ a + 2·b − 3" in r.describe(["a", "b", "c"])
    # the tolerance: 1e-9 relative noise is rank deficient, 1e-6 is not
    t = rng.normal(size=500)
    assert design_rank(np.c_[t, t + 1e-9 * rng.normal(size=500)]).rank == 1
    assert design_rank(np.c_[t, t + 1e-6 * rng.normal(size=500)]).rank == 2


# --------------------------------------------------------------- small experts
def test_three_experts_on_13_samples_warn(mcycle):
    """13 mcycle rows (sample(13, random_state=0)), 3 experts: sizes 3, 6, 4, reported as converged."""
    X, y = mcycle
    sub = X.sample(13, random_state=0).index
    est, caught = _caught(lambda: MixtureOfExpertsRegressor(3, random_state=0).fit(X.loc[sub], y.loc[sub]))
    assert est.converged_
    np.testing.assert_allclose(np.sort(est.expert_size_), [3, 4, 6], atol=1e-6)
    (msg,) = _of(caught, SmallExpertWarning)
    sizes = re.match(r"experts 1, 2, 3 of 3 \(numbered from 1\) have effective sizes (\d), (\d), (\d) ", msg)
    assert sizes and sorted(map(int, sizes.groups())) == [3, 4, 6]  # the experts' order is the optimiser's
    assert "fewer than n_features + 6 = 7" in msg


def test_small_experts_rule():
    """n_k < d + 6: 5 residual degrees of freedom after d + 1 regression coefficients."""
    np.testing.assert_array_equal(small_experts([6.99, 7.0, 100], 1), [True, False, False])
    np.testing.assert_array_equal(small_experts([[8.9, 9.0]], 3), [[True, False]])


def test_readme_mcycle_fit_is_clean(mcycle):
    """README: moelab fit mcycle --x times --y accel --experts 3 --seed 0 (sizes 65, 24.2, 43.8); no warning is true."""
    X, y = mcycle
    est, caught = _caught(lambda: MixtureOfExpertsRegressor(3, random_state=0).fit(X, y))
    assert est.loglik_ == pytest.approx(-577.625, abs=1e-3)
    assert caught == []


# ---------------------------------------------------------------- few starts
def test_single_start_warns(mcycle):
    """mcycle, 2 experts: n_init=1 stops at −643.39 'converged'; the default 160 starts find −614.54."""
    X, y = mcycle
    one, caught = _caught(lambda: MixtureOfExpertsRegressor(2, n_init=1, random_state=0).fit(X, y))
    assert one.converged_ and one.loglik_ == pytest.approx(-643.39, abs=0.01)
    (msg,) = _of(caught, FewStartsWarning)
    assert msg.startswith("a single start (n_init=1) is unreliable")
    best, caught = _caught(lambda: MixtureOfExpertsRegressor(2, random_state=0).fit(X, y))
    assert best.loglik_ == pytest.approx(-614.54, abs=0.01) and caught == []


def test_few_starts_say_how_many_reached_the_best(mcycle):
    X, y = mcycle
    _, caught = _caught(lambda: fit_em(X.to_numpy(), y.to_numpy(), 2, n_init=4, n_candidates=8, random_state=0))
    (msg,) = _of(caught, FewStartsWarning)
    assert msg.startswith("n_init=4 starts are few") and "of 4 starts reached the best log-likelihood found" in msg
    # fit_mle's default (10 starts) and a user start do not warn
    _, caught = _caught(lambda: fit_mle(X.to_numpy(), y.to_numpy(), 2, random_state=0, max_iter=50))
    assert not _of(caught, FewStartsWarning)
    res = fit_em(X.to_numpy(), y.to_numpy(), 2, n_init=10, n_candidates=20, random_state=0, warn=False)
    _, caught = _caught(lambda: fit_em(X.to_numpy(), y.to_numpy(), 2, init_model=res.model, max_iter=5))
    assert not _of(caught, FewStartsWarning)
    # warn=False (rate studies) says nothing
    _, caught = _caught(lambda: fit_em(X.to_numpy(), y.to_numpy(), 2, n_init=1, warn=False))
    assert caught == []


# ---------------------------------------------------------------- extreme x
def test_extreme_x_gives_a_value_or_an_error_never_nan(mcycle):
    X, y = mcycle
    est, _ = _caught(lambda: MixtureOfExpertsRegressor(3, random_state=0).fit(X, y))
    far = pd.DataFrame({"times": [1e200, -1e200]})
    var = est.predict_variance(far)  # was [nan, nan]
    # the gate saturates: all weight on one expert, whose variance is then Var[y | x]
    k = est.predict_proba(far).argmax(1)
    np.testing.assert_allclose(var, est.expert_variance_[k], rtol=1e-12)
    assert np.isfinite(est.predict(far)).all()
    for v in (1e308, -1e308):
        with pytest.raises(ValueError, match=r"is not a finite number for 1 of 1 row\(s\) \(first: row 0, counted from 0"):
            est.predict_variance(pd.DataFrame({"times": [v]}))
    with pytest.raises(ValueError, match="predict: E\\[y \\| x\\] is not a finite number"):
        est.predict(pd.DataFrame({"times": [60.0, 1e308]}))


def test_variance_unchanged_inside_the_range():
    gate = moelab.SoftmaxGate(torch.tensor([[2.0], [0.0]], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64))
    experts = moelab.GaussianExperts(torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                     torch.tensor([1.0, 4.0], dtype=torch.float64))
    model = moelab.GaussianMoE(gate, experts)
    x = torch.linspace(-3, 3, 50, dtype=torch.float64).unsqueeze(-1)
    g, m = model.gate_weights(x), model.expert_means(x)
    mean = (g * m).sum(-1, keepdim=True)
    direct = (g * (experts.variance + (m - mean) ** 2)).sum(-1)
    assert torch.equal(model.variance(x), direct)


# ---------------------------------------------------------------------- CLI
def test_cli_prints_each_warning_as_one_line(tmp_path, switch, capsys):
    t, y, rng = switch
    path = tmp_path / "d.csv"
    pd.DataFrame({"t": t, "t_twice": 2 * t, "y": y}).to_csv(path, index=False)
    rc = main(["fit", str(path), "--x", "t,t_twice", "--y", "y", "--experts", "2", "--n-init", "1", "--format", "json"])
    cap = capsys.readouterr()
    assert rc == 0
    lines = cap.err.splitlines()
    assert any(line.startswith("moelab fit: warning: x has numerical rank 1 < 2 columns: 't', 't_twice'") for line in lines)
    assert any(line.startswith("moelab fit: warning: a single start (n_init=1) is unreliable") for line in lines)
    assert all(line.startswith("moelab fit: warning: ") for line in lines)
    assert len(json.loads(cap.out)["warnings"]) == len(lines)
