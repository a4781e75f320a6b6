"""GaussianMoE densities against the reference values in tests/data (../shared/oracle)."""

import math

import numpy as np
import pytest
import torch

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate, load_dataset


def _oracle_model(rows):
    # the oracle's reference expert is k1; moelab's is the last one: order k2..kK, k1
    rows = rows.sort_values("expert")
    rows = rows.iloc[list(range(1, len(rows))) + [0]]
    gate = SoftmaxGate(torch.tensor(rows.gate_slope.values)[:, None], torch.tensor(rows.gate_intercept.values))
    experts = GaussianExperts(
        torch.tensor(rows.expert_slope.values)[:, None],
        torch.tensor(rows.expert_intercept.values),
        torch.tensor(rows.sigma.values) ** 2,
    )
    return GaussianMoE(gate, experts)


def test_log_prob_reproduces_oracle_loglik(oracle_params):
    checked = 0
    for (ds, xc, yc, K), rows in oracle_params.groupby(["dataset", "x", "y", "n_experts"]):
        df = load_dataset(ds)
        model = _oracle_model(rows)
        ll = float(model.log_prob(torch.tensor(df[xc].values)[:, None], torch.tensor(df[yc].values)).sum())
        assert ll == pytest.approx(rows.loglik_at_these_params.iloc[0], abs=1e-6)
        checked += 1
    assert checked == 9


def _naive_log_prob(model, x, y):
    """Loop over samples and experts in plain Python (reference implementation)."""
    out = []
    for xi, yi in zip(x.tolist(), y.tolist()):
        logits = [float(np.dot(model.gate.slope[k].numpy(), xi) + model.gate.intercept[k]) for k in range(model.n_experts)]
        mx = max(logits)
        w = [math.exp(v - mx) for v in logits]
        w = [v / sum(w) for v in w]
        dens = 0.0
        for k in range(model.n_experts):
            mu = float(np.dot(model.experts.slope[k].numpy(), xi) + model.experts.intercept[k])
            var = float(model.experts.variance[k])
            dens += w[k] * math.exp(-0.5 * (yi - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)
        out.append(math.log(dens))
    return torch.tensor(out, dtype=torch.float64)


def _random_model(K=3, d=2, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*batch, *s, generator=g, dtype=torch.float64)  # noqa: E731
    gate = SoftmaxGate(r(K, d), r(K))
    experts = GaussianExperts(r(K, d), r(K), torch.rand(*batch, K, generator=g, dtype=torch.float64) + 0.2)
    return GaussianMoE(gate, experts)


def test_log_prob_matches_naive_loop():
    model = _random_model()
    x = torch.randn(50, 2, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    assert torch.allclose(model.log_prob(x, y), _naive_log_prob(model, x, y), atol=1e-10)


def test_batched_model_equals_each_problem():
    model = _random_model(batch=(4,))
    x = torch.randn(4, 30, 2, dtype=torch.float64)
    y = torch.randn(4, 30, dtype=torch.float64)
    lp = model.log_prob(x, y)
    assert lp.shape == (4, 30)
    for b in range(4):
        assert torch.allclose(lp[b], model[b].log_prob(x[b], y[b]))


def test_shapes_and_moments():
    model = _random_model(K=3, d=2)
    x = torch.randn(20, 2, dtype=torch.float64)
    assert model.gate_weights(x).shape == (20, 3)
    assert torch.allclose(model.gate_weights(x).sum(-1), torch.ones(20, dtype=torch.float64))
    assert model.expert_means(x).shape == (20, 3)
    assert model.mean(x).shape == (20,)
    y = torch.randn(20, dtype=torch.float64)
    assert torch.allclose(model.responsibilities(x, y).sum(-1), torch.ones(20, dtype=torch.float64))


def test_sample_moments_match_mean_and_variance():
    """Monte Carlo check: 200,000 draws at one x; tolerance 5 standard errors."""
    model = _random_model(K=3, d=2, seed=3)
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64).expand(200_000, 2)
    g = torch.Generator().manual_seed(11)
    ys = model.sample(x, generator=g)
    mean, var = float(model.mean(x[:1])), float(model.variance(x[:1]))
    assert abs(float(ys.mean()) - mean) < 5 * math.sqrt(var / ys.numel())
    assert float(ys.var()) == pytest.approx(var, rel=0.02)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="expert variance must be > 0"):
        GaussianExperts(torch.zeros(2, 1), torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="gate slope contains 1 NaN"):
        SoftmaxGate(torch.tensor([[float("nan")], [0.0]]), torch.zeros(2))
    with pytest.raises(ValueError, match="gate has 2 experts but experts has 3"):
        GaussianMoE(SoftmaxGate(torch.zeros(2, 1), torch.zeros(2)), GaussianExperts(torch.zeros(3, 1), torch.zeros(3), torch.ones(3)))
    model = _random_model(K=2, d=2)
    with pytest.raises(ValueError, match="x has 10 samples but y has 9"):
        model.log_prob(torch.zeros(10, 2), torch.zeros(9))
    with pytest.raises(ValueError, match="x has 3 features but the gate was built for 2"):
        model.gate_weights(torch.zeros(10, 3))


def test_caller_arrays_are_not_modified():
    model = _random_model(K=2, d=2)
    x = np.random.default_rng(0).normal(size=(10, 2))
    y = np.random.default_rng(1).normal(size=10)
    x0, y0 = x.copy(), y.copy()
    model.log_prob(x, y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("model_cls", ["GaussianMoE", "RegressionMoE"])
def test_gate_and_experts_are_checked_the_same_way_by_both_models(model_cls):
    """Both models take their pair through one check (moelab._gated.GatedModel): types, n_experts,
    n_features and batch shape, each with a message naming the mismatch."""
    import moelab

    cls = getattr(moelab, model_cls)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731

    def experts(K, d, batch=()):
        if model_cls == "GaussianMoE":
            return GaussianExperts(z(*batch, K, d), z(*batch, K), torch.ones(*batch, K, dtype=torch.float64))
        return moelab.RegressionExperts(z(*batch, K, d), z(*batch, K))

    gate = SoftmaxGate(z(3, 2), z(3))
    m = cls(gate, experts(3, 2))
    assert (m.n_experts, m.n_features, m.batch_shape, m.dtype) == (3, 2, torch.Size([]), torch.float64)
    assert m.n_free_parameters() == gate.n_free_parameters() + m.experts.n_free_parameters()
    with pytest.raises(TypeError, match="gate must be a moelab.gates.Gate, got str"):
        cls("softmax", experts(3, 2))
    if model_cls == "GaussianMoE":
        wrong, want = moelab.RegressionExperts(z(3, 2), z(3)), "GaussianExperts"
    else:
        wrong, want = GaussianExperts(z(3, 2), z(3), torch.ones(3, dtype=torch.float64)), "RegressionExperts"
    with pytest.raises(TypeError, match=f"experts must be {want}, got {type(wrong).__name__}"):
        cls(gate, wrong)
    with pytest.raises(ValueError, match="gate has 3 experts but experts has 2"):
        cls(gate, experts(2, 2))
    with pytest.raises(ValueError, match="gate has 2 features but experts has 1"):
        cls(gate, experts(3, 1))
    with pytest.raises(ValueError, match=r"gate batch shape \(\) differs from experts batch shape \(4,\)"):
        cls(gate, experts(3, 2, (4,)))
