"""EM: monotonicity for every gate, recovery of a known truth, batching, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

from moelab import (ActivationGate, GaussianExperts, GaussianMoE, SoftmaxGate, TemperatureGate, TopKGate, fit_em,
                    fit_mle)

D = torch.float64

GATES = [
    ("softmax", {}),
    ("temperature", {"temperature": 0.5}),
    ("temperature", {"learn_temperature": True}),
    ("activation", {"activation": "tanh", "temperature": 0.3}),
    ("activation", {"activation": "sigmoid", "learn_temperature": True}),
    ("topk", {"top_k": 2}),
]


def _truth(gate, opts, K):
    """A well-separated truth for each gate family, x ~ Uniform(-2, 2)."""
    a = torch.tensor([2.0, -1.5, 0.0][:K], dtype=D)[:, None]
    b = torch.tensor([1.0, -1.0, 4.0][:K], dtype=D)
    var = torch.tensor([0.3, 0.5, 0.4][:K], dtype=D) ** 2
    slope = torch.tensor([3.0, -2.0, 0.0][:K], dtype=D)[:, None]
    slope[-1] = 0
    intercept = torch.tensor([0.5, 0.3, 0.0][:K], dtype=D)
    intercept[-1] = 0
    if gate == "softmax":
        g = SoftmaxGate(slope, intercept)
    elif gate == "temperature":
        g = TemperatureGate(slope * opts.get("temperature", 1.0), intercept, temperature=opts.get("temperature", 1.0),
                            learn_temperature=opts.get("learn_temperature", False))
    elif gate == "activation":
        g = ActivationGate(slope, -0.2 * (torch.arange(K, dtype=D) < K - 1), temperature=opts.get("temperature", 0.3),
                           activation=opts["activation"], learn_temperature=opts.get("learn_temperature", False))
    else:
        g = TopKGate(slope, intercept, top_k=opts["top_k"])
    return GaussianMoE(g, GaussianExperts(a, b, var))


def _simulate(model, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen, dtype=D) * 4 - 2
    return x, model.sample(x, generator=gen)


@pytest.mark.parametrize("gate,opts", GATES)
def test_em_never_decreases_loglik(gate, opts):
    """Step by step, for every gate, from several kinds of start (tolerance: 1e-9 relative, rounding)."""
    K = 3 if gate == "topk" else 2
    x, y = _simulate(_truth(gate, opts, K), 600, seed=1)
    for init in ("random", "kmeans", "segments"):
        res = fit_em(x, y, K, gate=gate, gate_options=opts, n_init=1, init=init, max_iter=150, random_state=3, warn=False)
        h = res.history[~torch.isnan(res.history)]
        assert h.numel() > 2
        drops = h[:-1] - h[1:]
        assert float(drops.max()) <= 1e-9 * float(h.abs().max()), f"{init}: largest decrease {float(drops.max())}"
        assert float(res.loglik) == pytest.approx(float(h[-1]), abs=1e-8)


def _match(fitted, truth):
    """Permutation of fitted experts that best matches the truth's expert means (K ≤ 3)."""
    import itertools

    K = truth.n_experts
    best = None
    for perm in itertools.permutations(range(K)):
        err = float((fitted.experts.intercept[list(perm)] - truth.experts.intercept).abs().sum())
        if best is None or err < best[0]:
            best = (err, list(perm))
    return best[1]


@pytest.mark.parametrize("gate,opts", GATES)
def test_recovers_truth_n20000(gate, opts):
    """n = 20,000: experts within 0.05 (means, sd) and the gate's identifiable
    parameters within 0.25 absolute; standard errors are ~0.01 here."""
    K = 3 if gate == "topk" else 2
    truth = _truth(gate, opts, K)
    x, y = _simulate(truth, 20_000, seed=7)
    res = fit_em(x, y, K, gate=gate, gate_options=opts, n_init=4, init="kmeans", random_state=0, warn=False)
    m = res.model
    perm = _match(m, truth)
    assert torch.allclose(m.experts.slope[perm], truth.experts.slope, atol=0.05)
    assert torch.allclose(m.experts.intercept[perm], truth.experts.intercept, atol=0.05)
    assert torch.allclose(m.experts.variance[perm].sqrt(), truth.experts.variance.sqrt(), atol=0.05)
    # compare gates on a grid through what is identifiable: the gate weights
    grid = torch.linspace(-2, 2, 41, dtype=D)[:, None]
    w_fit = m.gate_weights(grid)[:, perm]
    w_true = truth.gate_weights(grid)
    # top-K: EM keeps each sample's routing set from its (dense softmax) start, so the
    # routing boundary keeps the dense fit's small offset: a looser tolerance there
    assert float((w_fit - w_true).abs().max()) < (0.1 if gate == "topk" else 0.05)
    if gate == "temperature":
        # β_1/τ is identified; with τ estimated, τ alone is not (EM keeps its start)
        ratio_fit = m.gate.slope[perm] / m.gate.temperature
        ratio_true = truth.gate.slope / truth.gate.temperature
        assert torch.allclose(ratio_fit - ratio_fit[-1], ratio_true - ratio_true[-1], atol=0.25)
    elif gate == "softmax" or (gate == "activation" and not opts.get("learn_temperature")):
        ref = perm[-1]
        s = m.gate.slope[perm] - (m.gate.slope[ref] if gate != "activation" else 0)
        assert torch.allclose(s, truth.gate.slope, atol=0.25 * max(1.0, float(truth.gate.slope.abs().max())))


def test_batched_problems_equal_separate_fits():
    truth = _truth("softmax", {}, 2)
    xs, ys = zip(*[_simulate(truth, 300, seed=s) for s in range(3)])
    x, y = torch.stack(xs), torch.stack(ys)
    start = GaussianMoE(SoftmaxGate(torch.tensor([[1.0], [0.0]], dtype=D), torch.zeros(2, dtype=D)),
                        GaussianExperts(torch.tensor([[1.0], [-1.0]], dtype=D), torch.tensor([0.5, -0.5], dtype=D),
                                        torch.ones(2, dtype=D)))
    batched = fit_em(x, y, 2, init_model=start, max_iter=300, warn=False)
    assert batched.loglik.shape == (3,)
    for b in range(3):
        single = fit_em(x[b], y[b], 2, init_model=start, max_iter=300, warn=False)
        assert float(batched.loglik[b]) == pytest.approx(float(single.loglik), abs=1e-8)


def test_best_of_starts_at_least_single_start():
    truth = _truth("softmax", {}, 2)
    x, y = _simulate(truth, 400, seed=2)
    single = fit_em(x, y, 3, n_init=1, init="random", random_state=5, warn=False)
    many = fit_em(x, y, 3, n_init=30, random_state=5, n_candidates=100, warn=False)
    assert float(many.loglik) >= float(single.loglik) - 1e-9


def test_convergence_warning_and_flags():
    truth = _truth("softmax", {}, 2)
    x, y = _simulate(truth, 300, seed=4)
    with pytest.warns(Warning, match="did not converge in 2 iterations"):
        res = fit_em(x, y, 2, n_init=1, init="random", max_iter=2, random_state=0)
    assert not bool(res.converged) and int(res.n_iter) == 2


def test_mle_path_reaches_em_optimum():
    truth = _truth("softmax", {}, 2)
    x, y = _simulate(truth, 500, seed=8)
    em = fit_em(x, y, 2, n_init=8, n_candidates=40, random_state=0, warn=False)
    mle = fit_mle(x, y, 2, init_model=em.model, max_iter=50, warn=False)
    assert float(mle.loglik) >= float(em.loglik) - 1e-6
    assert float(mle.loglik) == pytest.approx(float(em.loglik), abs=1e-3)


def test_collapsed_starts_are_rejected():
    """A start whose expert sits on a handful of points is not a better fit."""
    truth = _truth("softmax", {}, 2)
    x, y = _simulate(truth, 200, seed=9)
    res = fit_em(x, y, 3, n_init=40, n_candidates=200, random_state=1, warn=False)
    sd_y = float(y.std())
    assert float(res.expert_size.min()) >= 10
    assert float(res.model.experts.variance.sqrt().min()) >= 0.01 * sd_y


@pytest.mark.parametrize("kwargs,msg", [
    (dict(x=[[1.0], [float("nan")], [2.0]], y=[1.0, 2.0, 3.0], n_experts=1), "x contains 1 NaN"),
    (dict(x=np.arange(10.0), y=np.arange(9.0), n_experts=1), "x has 10 samples but y has 9"),
    (dict(x=np.ones((30, 1)), y=np.arange(30.0), n_experts=2), r"x column\(s\) \[0\] are constant"),
    (dict(x=np.arange(30.0), y=np.ones(30), n_experts=2), "y is constant"),
    (dict(x=np.arange(8.0), y=np.arange(8.0) ** 2, n_experts=3), "8 samples are fewer than the 13 free parameters"),
    (dict(x=np.arange(30.0), y=np.arange(30.0) ** 2, n_experts=0), "n_experts must be an integer >= 1"),
    (dict(x=np.arange(30.0), y=np.arange(30.0) ** 2, n_experts=2, gate="sparse"), "unknown gate 'sparse'"),
    (dict(x=np.arange(30.0), y=np.arange(30.0) ** 2, n_experts=2, gate="temperature",
          gate_options={"temperature": 0.0}), "temperature must be > 0"),
    (dict(x=np.arange(30.0), y=np.arange(30.0) ** 2, n_experts=2, gate="activation",
          gate_options={"activation": "swish"}), "unknown activation"),
    (dict(x=np.arange(30.0), y=np.arange(30.0) ** 2, n_experts=2, init="magic"), "unknown init 'magic'"),
])
def test_bad_input_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fit_em(**kwargs)


def test_one_expert_is_least_squares_from_one_start():
    """K = 1 has one fit, the least-squares line: one start (not n_init identical ones), no FewStartsWarning;
    reference numpy.linalg.lstsq and the ML variance RSS / n."""
    import warnings as _w

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(200, 2, generator=gen, dtype=D)
    y = 1.5 - 2.0 * x[:, 0] + 0.7 * x[:, 1] + 0.3 * torch.randn(200, generator=gen, dtype=D)
    with _w.catch_warnings():
        _w.simplefilter("error")
        res = fit_em(x, y, 1, random_state=0)
    assert res.start_loglik.shape[-1] == 1 and res.settings["n_init"] == 1
    X = np.column_stack([x.numpy(), np.ones(200)])
    coef, rss, *_ = np.linalg.lstsq(X, y.numpy(), rcond=None)
    np.testing.assert_allclose(res.model.experts.slope.numpy().ravel(), coef[:2], rtol=1e-9)
    np.testing.assert_allclose(float(res.model.experts.intercept), coef[2], rtol=1e-9)
    np.testing.assert_allclose(float(res.model.experts.variance), rss[0] / 200, rtol=1e-9)
