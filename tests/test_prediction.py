"""Mixture quantiles, prediction intervals and the per-row prediction table (issue 15 item 4)."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, stats

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate, predict_table, prediction_interval
from moelab.prediction import mixture_cdf, mixture_quantile


def _naive_quantile(w, m, s, q):
    """Reference: scipy's brentq on the mixture CDF, one row at a time."""
    out = []
    for wi, mi in zip(w, m):
        f = lambda y: float(np.sum(wi * stats.norm.cdf(y, mi, s))) - q  # noqa: E731
        out.append(optimize.brentq(f, mi.min() - 20 * s.max(), mi.max() + 20 * s.max(), xtol=1e-13))
    return np.array(out)


@pytest.fixture(scope="module")
def mixture():
    rng = np.random.default_rng(0)
    n, K = 300, 3
    return rng.dirichlet(np.ones(K), n), rng.normal(0, 5, (n, K)), rng.uniform(0.2, 3, K)


@pytest.mark.parametrize("q", [0.005, 0.05, 0.3, 0.5, 0.7, 0.95, 0.995])
def test_quantile_equals_row_by_row_brentq(mixture, q):
    w, m, s = mixture
    Q = mixture_quantile(w, m, s, q)
    np.testing.assert_allclose(Q, _naive_quantile(w, m, s, q), atol=1e-9)
    np.testing.assert_allclose(mixture_cdf(w, m, s, Q), q, atol=1e-13)


def test_far_upper_tail_keeps_precision(mixture):
    """Above the median the survival function is solved, so 1 − F(Q) = 1e-10 to relative 1e-6."""
    w, m, s = mixture
    Q = mixture_quantile(w, m, s, 1 - 1e-10)
    np.testing.assert_allclose(mixture_cdf(w, m, s, Q, upper=True), 1e-10, rtol=1e-6)


def test_one_expert_is_the_normal_quantile():
    m = np.array([[0.0], [3.0], [-1e4]])
    for q in (0.025, 0.5, 0.975):
        np.testing.assert_allclose(mixture_quantile(np.ones((3, 1)), m, [2.0], q),
                                   m[:, 0] + 2.0 * stats.norm.ppf(q), rtol=1e-12, atol=1e-12)


def test_zero_gate_weights_are_ignored():
    """A top-K gate gives some experts weight exactly 0: they must not move the quantile."""
    w = np.array([[1.0, 0.0]])
    m = np.array([[0.0, 100.0]])
    np.testing.assert_allclose(mixture_quantile(w, m, [1.0, 1.0], 0.9), stats.norm.ppf(0.9), rtol=1e-12)


@pytest.mark.parametrize("q", [0, 1, -0.1, 1.5, True, float("nan")])
def test_bad_probability(q):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        mixture_quantile(np.ones((1, 1)), np.zeros((1, 1)), [1.0], q)


def _model():
    gate = SoftmaxGate(torch.tensor([[4.0], [0.0]], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64))
    experts = GaussianExperts(torch.tensor([[1.0], [-2.0]], dtype=torch.float64),
                              torch.tensor([0.0, 3.0], dtype=torch.float64), torch.tensor([0.25, 1.0], dtype=torch.float64))
    return GaussianMoE(gate, experts)


def test_interval_covers_level_on_simulated_data():
    """20,000 draws from the model: the share inside the 90% interval is 0.9 ± 0.01 (sd 0.0021, ~5 sd)."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(20_000, 1, generator=gen, dtype=torch.float64) * 4 - 2
    y = model.sample(x, gen).numpy()
    lo, hi = prediction_interval(model, x.numpy(), 0.9)
    assert abs(np.mean((y >= lo) & (y <= hi)) - 0.9) < 0.01
    assert abs(np.mean(y < lo) - 0.05) < 0.007  # equal tails
    assert abs(np.mean(y > hi) - 0.05) < 0.007


def test_table_columns_and_values():
    model = _model()
    x = np.linspace(-2, 2, 7)[:, None]
    t = predict_table(model, x, level=0.8)
    assert list(t.columns) == ["mean", "sd", "lower", "upper", "expert", "gate_1", "gate_2"]
    g = model.gate_weights(torch.tensor(x)).numpy()
    np.testing.assert_allclose(t["mean"], model.mean(torch.tensor(x)).numpy(), rtol=1e-14)
    np.testing.assert_allclose(t["sd"] ** 2, model.variance(torch.tensor(x)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(t[["gate_1", "gate_2"]].to_numpy(), g)
    assert (t["expert"].to_numpy() == g.argmax(1) + 1).all()  # argmax of the gate, numbered 1..K
    assert (t["lower"] < t["mean"]).all() and (t["mean"] < t["upper"]).all()
    lo, hi = prediction_interval(model, x, 0.8)
    np.testing.assert_array_equal(t["lower"], lo)
    np.testing.assert_array_equal(t["upper"], hi)


def test_bimodal_interval_is_the_equal_tailed_one():
    """Two far-apart experts of weight 1/2: the equal-tailed 90% interval spans the gap between them."""
    gate = SoftmaxGate(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    experts = GaussianExperts(torch.zeros(2, 1, dtype=torch.float64), torch.tensor([-10.0, 10.0], dtype=torch.float64),
                              torch.ones(2, dtype=torch.float64))
    lo, hi = prediction_interval(GaussianMoE(gate, experts), np.zeros((1, 1)), 0.9)
    # F(lo) = 0.05: half of expert 1's mass below lo is 0.1 -> lo = -10 + z_0.1
    np.testing.assert_allclose([lo[0], hi[0]], [-10 + stats.norm.ppf(0.1), 10 - stats.norm.ppf(0.1)], rtol=1e-9)


@pytest.mark.parametrize("level", [0, 1, 1.2, -0.5, float("nan"), True])
def test_bad_level(level):
    with pytest.raises(ValueError, match="level must be a probability strictly between 0 and 1"):
        predict_table(_model(), np.zeros((2, 1)), level)


def test_extreme_inputs_saturate_and_overflow_is_an_error_naming_the_row():
    """x = 1e200 saturates the gate (one expert, its sd; variance in log space); x = 1.7e308 overflows the
    expert mean itself: an error naming the row, never NaN in the table."""
    row = predict_table(_model(), np.array([[0.0], [1e200], [1.0]])).iloc[1]
    assert np.isfinite(row[["mean", "sd", "lower", "upper"]].to_numpy(float)).all()
    assert row["gate_1"] + row["gate_2"] == 1.0 and max(row["gate_1"], row["gate_2"]) == 1.0
    x = np.array([[0.0], [1.7e308], [1.0]])
    with pytest.raises(ValueError, match=r"not finite for 1 input row\(s\) \(first: row 2"):
        predict_table(_model(), x)


def test_wrong_shape():
    with pytest.raises(ValueError, match=r"x must have shape \(n_samples, 1\)"):
        predict_table(_model(), np.zeros((3, 2)))


def test_input_not_modified():
    x = np.linspace(-1, 1, 5)[:, None]
    before = x.copy()
    predict_table(_model(), x)
    np.testing.assert_array_equal(x, before)
    assert isinstance(predict_table(_model(), pd.DataFrame({"a": [0.0, 1.0]})), pd.DataFrame)
