"""fit_em: several user starts per problem (init_model with a start dimension) and the stopping rules."""

import math

import pytest
import torch

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate, fit_em

D = torch.float64


def _truth():
    gate = SoftmaxGate(torch.tensor([[25.0], [0.0]], dtype=D), torch.tensor([-8.0, 0.0], dtype=D))
    experts = GaussianExperts(torch.tensor([[-20.0], [20.0]], dtype=D), torch.tensor([15.0, -5.0], dtype=D),
                              torch.tensor([0.09, 0.16], dtype=D))
    return GaussianMoE(gate, experts)


def _data(n, seed, B=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1) if B is None else (B, n, 1)
    x = torch.rand(*shape, generator=gen, dtype=D)
    return x, _truth().sample(x, generator=gen)


def _starts(shape, seed, sd=0.5):
    """Perturbed 3-expert starts of batch shape ``shape`` (the reference expert duplicated)."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda *s: sd * torch.randn(*shape, *s, generator=gen, dtype=D)  # noqa: E731
    slope = torch.tensor([[25.0], [0.0], [0.0]], dtype=D) + noise(3, 1)
    slope = slope - slope[..., -1:, :]
    icpt = torch.tensor([-8.0, 0.0, 0.0], dtype=D) + noise(3)
    icpt = icpt - icpt[..., -1:]
    a = torch.tensor([[-20.0], [20.0], [20.0]], dtype=D) + noise(3, 1)
    b = torch.tensor([15.0, -5.0, -5.0], dtype=D) + noise(3)
    v = torch.tensor([0.09, 0.16, 0.16], dtype=D) * noise(3).exp()
    return GaussianMoE(SoftmaxGate(slope, icpt), GaussianExperts(a, b, v))


def _take(model, idx):
    f = lambda t: t[idx]  # noqa: E731
    return GaussianMoE(model.gate.map_tensors(f), model.experts.map_tensors(f))


def test_several_user_starts_keep_the_best_and_match_single_fits():
    """init_model of batch shape (B, S): every start runs as its own fit; the kept one has the max log-likelihood."""
    B, S = 2, 4
    x, y = _data(400, seed=1, B=B)
    starts = _starts((B, S), seed=2)
    # plain EM: with SQUAREM start (1, 3) heads faster for a collapsing expert (size 6.6 < min_expert_size),
    # which a batch marks -inf (tests/test_acceleration.py compares accelerated batches with single fits)
    res = fit_em(x, y, 3, init_model=starts, max_iter=60, tol=1e-9, warn=False, compile=False, accelerate=None)
    assert res.loglik.shape == (B,) and res.start_loglik.shape == (B, S)
    assert torch.equal(res.loglik, res.start_loglik.max(-1).values)
    assert res.settings["n_init"] == S
    for b in range(B):
        for s in range(S):
            single = fit_em(x[b], y[b], 3, init_model=_take(starts, (b, s)), max_iter=60, tol=1e-9, warn=False,
                            compile=False, accelerate=None)
            assert float(res.start_loglik[b, s]) == pytest.approx(float(single.loglik), abs=1e-8)
    # the starts differ, so the best-of is a real choice (not S copies of one fit)
    assert float((res.start_loglik.max(-1).values - res.start_loglik.min(-1).values).max()) > 1e-6


def test_user_starts_of_the_wrong_batch_shape_are_refused():
    x, y = _data(200, seed=3, B=2)
    with pytest.raises(ValueError, match=r"batch shape \(3, 4\) does not match .*\(2,\)"):
        fit_em(x, y, 3, init_model=_starts((3, 4), seed=0), max_iter=5, warn=False)


def _stop_index(h):
    """Index of the last recorded iteration of a history row."""
    return int((~torch.isnan(h)).sum()) - 1


def test_relative_rule_stops_at_the_first_small_relative_change():
    """|Δℓ| < tol·|ℓ_prev| with ℓ in the original units of y (history is in those units)."""
    x, y = _data(3000, seed=4)
    y = y + 40.0  # |ℓ| in the original units differs from its value on standardised y
    tol = 1e-6
    res = fit_em(x, y, 3, init_model=_starts((), seed=5), max_iter=500, tol=tol, convergence="relative", warn=False,
                 compile=False)
    h = res.history
    t = _stop_index(h)
    assert bool(res.converged) and 1 <= t < 500
    rel = (h[1:t + 1] - h[:t]).abs() / h[:t].abs()
    assert float(rel[-1]) < tol
    assert bool((rel[:-1] >= tol).all()), "stopped later than the first small relative change"
    assert bool((h[1:t + 1] - h[:t] >= -1e-9 * h[:t].abs()).all()), "log-likelihood decreased"


def test_mean_rule_is_the_default_and_differs_from_the_relative_rule():
    x, y = _data(3000, seed=4)
    start = _starts((), seed=5)
    kw = dict(init_model=start, max_iter=500, warn=False, compile=False)
    default = fit_em(x, y, 3, tol=1e-6, **kw)
    mean = fit_em(x, y, 3, tol=1e-6, convergence="mean", **kw)
    assert torch.equal(default.history, mean.history) and default.settings["convergence"] == "mean"
    h = mean.history
    t = _stop_index(h)
    step = (h[1:t + 1] - h[:t]).abs() / 3000
    assert float(step[-1]) < 1e-6 and bool((step[:-1] >= 1e-6).all())
    # |ℓ|/n ≈ 0.45 here, so the relative rule at the same tol is stricter (|Δℓ|/n < 4.5e-7) and stops later
    rel = fit_em(x, y, 3, tol=1e-6, convergence="relative", **kw)
    assert _stop_index(rel.history) > t


@pytest.mark.parametrize("bad", ["rel", "", None, 1])
def test_bad_convergence_rule(bad):
    x, y = _data(100, seed=0)
    with pytest.raises(ValueError, match=r"convergence must be one of 'mean', 'relative'"):
        fit_em(x, y, 2, convergence=bad, n_init=1, init="random", max_iter=2, warn=False)


def test_relative_rule_on_the_fused_path_matches_eager():
    """The fused kernel uses the same stopping code; fits agree to rounding."""
    x, y = _data(2000, seed=6, B=2)
    start = _starts((2,), seed=7)
    kw = dict(init_model=start, max_iter=300, tol=1e-7, convergence="relative", warn=False)
    eager = fit_em(x, y, 3, compile=False, **kw)
    fused = fit_em(x, y, 3, compile=True, **kw)
    assert fused.settings["compiled"]
    assert torch.equal(eager.n_iter, fused.n_iter)
    assert torch.allclose(eager.loglik, fused.loglik, rtol=1e-10, atol=0)
    assert math.isfinite(float(fused.loglik.sum()))
