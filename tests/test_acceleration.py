"""SQUAREM acceleration of EM (moelab.acceleration; Varadhan & Roland 2008, scheme S3).

Checked: the S3 step against its closed form on a linear fixed-point map (exact in one step), the
parameter vector round trip, that accelerated EM never lowers the log-likelihood (every step of the
history, every family that extrapolates, textbook and one-pass iterations), that it needs far fewer
iterations than plain EM in an over-specified fit and ends no lower, that batched problems equal
single fits, and the options' validation.
"""

import math

import pytest
import torch

from moelab import GaussianExperts, GaussianMoE, fit_em
from moelab.acceleration import Squarem, extrapolate, flatten, supported, unflatten
from moelab.fitcore import State
from moelab.gates import ActivationGate, GaussianGate, SoftmaxGate, TopKGate
from moelab.options import FitOptions

D = torch.float64


def test_s3_step_is_exact_for_a_linear_contraction():
    """F(θ) = c + λ(θ − c), 0 < λ < 1, per coordinate with one λ: α = 1/(1 − λ) lands on c."""
    c = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], dtype=D)
    lam = torch.tensor([[0.9], [0.99]], dtype=D)
    v0 = torch.zeros(2, 3, dtype=D)
    F = lambda v: c + lam * (v - c)  # noqa: E731
    v1, v2 = F(v0), F(F(v0))
    ext, alpha = extrapolate(v0, v1, v2, step_max=torch.full((2,), 1e6, dtype=D))
    torch.testing.assert_close(alpha, 1 / (1 - lam[:, 0]))
    torch.testing.assert_close(ext, c, rtol=1e-10, atol=1e-10)
    # the step bound: α = 1 is plain EM's second step
    ext1, alpha1 = extrapolate(v0, v1, v2, step_max=torch.ones(2, dtype=D))
    assert alpha1.tolist() == [1.0, 1.0]
    torch.testing.assert_close(ext1, v2)


def test_no_change_gives_the_plain_point():
    v = torch.randn(3, 4, dtype=D)
    ext, alpha = extrapolate(v, v, v, step_max=torch.full((3,), 64.0, dtype=D))
    assert alpha.tolist() == [1.0, 1.0, 1.0] and torch.equal(ext, v)


def test_parameter_vector_round_trip_and_positive_parameters():
    g = torch.Generator().manual_seed(0)
    R, K, d = 3, 3, 2
    gate = ActivationGate(torch.randn(R, K, d, generator=g, dtype=D), torch.randn(R, K, generator=g, dtype=D),
                          temperature=torch.rand(R, generator=g, dtype=D) + 0.2, activation="tanh", learn_temperature=True)
    st = State(gate, torch.randn(R, K, d + 1, generator=g, dtype=D), torch.rand(R, K, generator=g, dtype=D) + 0.1)
    v = flatten(st)
    assert v.shape == (R, K * d + K + K * (d + 1) + K)  # τ is not extrapolated
    back = unflatten(st, v, 1e-6)
    for a, b in [(back.gate.slope, gate.slope), (back.gate.intercept, gate.intercept),
                 (back.gate.temperature, gate.temperature), (back.theta, st.theta), (back.var, st.var)]:
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    far = unflatten(st, v - 100.0, 1e-6)  # τ kept from the plain point, variances floored
    assert torch.equal(far.gate.temperature, gate.temperature) and bool((far.var == 1e-6).all())


def test_families_that_cannot_be_extrapolated_say_so():
    assert supported(SoftmaxGate.uniform(3, 1, (2,))) and supported(ActivationGate.uniform(3, 1, (2,), activation="tanh"))
    assert not supported(TopKGate.uniform(3, 1, (2,), top_k=1))
    assert not supported(GaussianGate.uniform(3, 1, (2,)))


def _overspecified(n=2000, R=4, seed=0):
    """softmax-2023 truth (2 experts), x ~ U(0, 1): fitted with 3 experts EM converges sub-linearly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(R, n, 1, generator=g, dtype=D)
    w1 = torch.sigmoid(25 * x[..., 0] - 8)
    z = torch.rand(R, n, generator=g, dtype=D) < w1
    y = torch.where(z, 15 - 20 * x[..., 0] + 0.3 * torch.randn(R, n, generator=g, dtype=D),
                    -5 + 20 * x[..., 0] + 0.4 * torch.randn(R, n, generator=g, dtype=D))
    return x, y


def _monotone(res):
    h = res.history
    steps = h[:, 1:] - h[:, :-1]
    steps = steps[~torch.isnan(steps)]
    return bool((steps >= -1e-12 * h.nan_to_num(0).abs().max()).all())


@pytest.fixture(scope="module")
def overspecified_fits():
    x, y = _overspecified()
    kw = dict(n_init=2, init="kmeans", random_state=0, max_iter=1500, tol=1e-10, warn=False, compile=False)
    return x, y, kw, fit_em(x, y, 3, accelerate=None, **kw), fit_em(x, y, 3, **kw)


def test_squarem_needs_fewer_iterations_and_ends_no_lower(overspecified_fits):
    """Over-specified (3 fitted experts, 2 true), n = 2000, 4 problems × 2 k-means starts, tol 1e-10 on the
    mean log-likelihood: plain EM's median start needs hundreds of iterations; SQUAREM's at most half."""
    x, y, kw, plain, fast = overspecified_fits
    assert _monotone(plain) and _monotone(fast)
    assert fast.settings["extrapolations"][0] > 0  # extrapolations were kept
    assert float(fast.n_iter.float().median()) <= 0.5 * float(plain.n_iter.float().median())
    # ends at least as high, up to the stopping rule's slack (tol · n per step)
    assert bool((fast.loglik >= plain.loglik - 1e-6).all())


@pytest.mark.parametrize("gate, options", [
    ("softmax", None),
    ("temperature", {"temperature": 0.7, "learn_temperature": True}),
    ("activation", {"activation": "tanh", "learn_temperature": True}),
    ("activation", {"activation": "sigmoid"}),
])
@pytest.mark.parametrize("path", ["one-pass", "textbook"])
def test_accelerated_em_never_lowers_the_log_likelihood(gate, options, path, monkeypatch):
    from moelab import _fused

    if path == "textbook":
        monkeypatch.setattr(_fused, "supported", lambda *a, **k: False)
    x, y = _overspecified(n=600, R=3, seed=2)
    res = fit_em(x, y, 3, gate=gate, gate_options=options, n_init=3, init="kmeans", random_state=1, max_iter=150,
                 tol=1e-12, warn=False, compile=False)
    assert _monotone(res)
    assert res.settings["accelerate"] == "squarem" and res.settings["extrapolations"][1] > 0


def test_one_pass_and_textbook_reach_the_same_optimum(monkeypatch):
    """Accelerated, the two iterations agree to the stopping rule's accuracy (not step by step: an accepted or
    rejected extrapolation near a tie can differ at rounding level)."""
    from moelab import _fused

    x, y = _overspecified(n=800, R=2, seed=3)
    kw = dict(n_init=3, init="kmeans", random_state=0, max_iter=3000, tol=1e-13, warn=False, compile=False)
    one = fit_em(x, y, 2, **kw)  # exact-specified: a unique, well-separated optimum
    monkeypatch.setattr(_fused, "supported", lambda *a, **k: False)
    text = fit_em(x, y, 2, **kw)
    torch.testing.assert_close(one.loglik, text.loglik, rtol=1e-10, atol=0)


def test_a_batch_equals_its_single_fits():
    """Each problem of a batch (its own start) follows the same accelerated path as its fit alone."""
    x, y = _overspecified(n=500, R=3, seed=4)
    g = torch.Generator().manual_seed(5)
    noise = lambda *s: 0.3 * torch.randn(3, *s, generator=g, dtype=D)  # noqa: E731
    start = GaussianMoE(SoftmaxGate(torch.tensor([[25.0], [20.0], [0.0]], dtype=D) + noise(3, 1) * torch.tensor([[1.0], [1.0], [0.0]], dtype=D),
                                    torch.tensor([-8.0, -7.0, 0.0], dtype=D) + noise(3) * torch.tensor([1.0, 1.0, 0.0], dtype=D)),
                        GaussianExperts(torch.tensor([[-20.0], [-20.0], [20.0]], dtype=D) + noise(3, 1),
                                        torch.tensor([15.0, 15.0, -5.0], dtype=D) + noise(3),
                                        torch.tensor([0.09, 0.09, 0.16], dtype=D) * noise(3).exp()))
    kw = dict(max_iter=300, tol=1e-10, warn=False, compile=False)
    batch = fit_em(x, y, 3, init_model=start, **kw)
    assert batch.settings["extrapolations"][0] > 0
    for b in range(3):
        one = GaussianMoE(start.gate.map_tensors(lambda t: t[b]), start.experts.map_tensors(lambda t: t[b]))
        single = fit_em(x[b], y[b], 3, init_model=one, **kw)
        assert float(single.loglik) == pytest.approx(float(batch.loglik[b]), rel=1e-12)
        assert int(single.n_iter) == int(batch.n_iter[b])


def test_squarem_state_follows_problems_leaving_the_batch():
    acc = Squarem(4, 1e-6, D, "cpu")
    st = State(SoftmaxGate.uniform(2, 1, (4,)), torch.zeros(4, 2, 2, dtype=D), torch.ones(4, 2, dtype=D))
    acc.record(st, torch.zeros(4, dtype=D))
    acc.keep(torch.tensor([True, False, True, True]))
    assert acc.v0.shape[0] == 3 and acc.step_max.shape == (3,)
    acc.record(State(st.gate.map_tensors(lambda t: t[:3]), st.theta[:3], st.var[:3]), torch.zeros(3, dtype=D))
    ext, plain = acc.candidate(State(st.gate.map_tensors(lambda t: t[:3]), st.theta[:3] + 1, st.var[:3]))
    assert plain is not None and ext.theta.shape == (3, 2, 2)


def test_bad_accelerate_is_refused():
    with pytest.raises(ValueError, match="accelerate must be 'squarem'"):
        FitOptions(2, accelerate="anderson")
    x, y = _overspecified(n=100, R=1)
    with pytest.raises(ValueError, match="accelerate must be"):
        fit_em(x[0], y[0], 2, accelerate=True)
    res = fit_em(x[0], y[0], 2, n_init=2, accelerate=None, warn=False)
    assert res.settings["accelerate"] is None and res.settings["extrapolations"] == (0, 0)
    assert math.isfinite(float(res.loglik))


def _tester_data(n, d, seed):
    """x ~ U(-1, 1)^d, s = Σx: y = 2 + 3s + 0.3ε with prob sigmoid(6s), else -1 - 2s + 0.5ε."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=D) * 2 - 1
    s = x.sum(-1)
    z = torch.rand(n, generator=g, dtype=D) < torch.sigmoid(6 * s)
    y = torch.where(z, 2 + 3 * s + 0.3 * torch.randn(n, generator=g, dtype=D), -1 - 2 * s + 0.5 * torch.randn(n, generator=g, dtype=D))
    return x, y


def test_no_start_ends_below_plain_em_where_tau_would_have_jumped():
    """Found by a test session: a sigmoid activation gate with τ estimated, 6 random starts. Extrapolating
    log τ took τ from 0.48 to 0.004, where EM stalled 95 below plain EM's optimum and reported converged;
    τ is no longer extrapolated and an extrapolation must beat the last plain step's gain."""
    x, y = _tester_data(1500, 1, 2)
    kw = dict(gate="activation", gate_options={"activation": "sigmoid", "learn_temperature": True}, n_init=6,
              init="random", max_iter=3000, tol=1e-10, random_state=2, compile=False, warn=False)
    fast, plain = fit_em(x, y, 2, **kw), fit_em(x, y, 2, accelerate=None, **kw)
    ok = torch.isfinite(plain.start_loglik)
    assert bool((fast.start_loglik[ok] >= plain.start_loglik[ok] - 1e-3).all())


def test_settings_say_what_ran_and_the_bootstrap_and_model_file_keep_the_setting(tmp_path):
    from moelab import MixtureOfExpertsRegressor
    from moelab.persistence import load_estimator, save_model

    x, y = _tester_data(400, 1, 0)
    gauss = fit_em(x, y, 2, gate="gaussian", n_init=2, max_iter=50, warn=False)
    assert gauss.settings["accelerate"] is None and gauss.settings["extrapolations"] == (0, 0)
    est = MixtureOfExpertsRegressor(2, accelerate=None, bootstrap=5, n_init=4, random_state=0).fit(x.numpy(), y.numpy())
    assert est.result_.settings["accelerate"] is None
    calls = []
    import moelab.bootstrap as bs

    orig = bs.fit_em
    try:
        bs.fit_em = lambda *a, **k: calls.append(k.get("accelerate", "missing")) or orig(*a, **k)
        est.fit(x.numpy(), y.numpy())
    finally:
        bs.fit_em = orig
    assert calls == [None]  # the bootstrap refits run the fit's EM
    save_model(est, tmp_path / "model.json")
    assert load_estimator(tmp_path / "model.json").get_params()["accelerate"] is None
    # MLE has no EM iterations: accelerate=None is accepted there (a grid over estimators), bad values are not
    MixtureOfExpertsRegressor(2, estimator="mle", accelerate=None, n_init=2, random_state=0).fit(x.numpy(), y.numpy())
    with pytest.raises(ValueError, match="accelerate must be"):
        MixtureOfExpertsRegressor(2, estimator="mle", accelerate="anderson").fit(x.numpy(), y.numpy())


@pytest.mark.parametrize("gate,options", [("activation", {"activation": "tanh", "learn_temperature": True}),
                                          ("temperature", {"learn_temperature": True}), ("softmax", None)])
def test_a_cycle_at_step_length_one_evaluates_the_plain_point_once(gate, options, monkeypatch):
    """α = 1 makes θ' the plain θ₂: θ₂ itself is evaluated and that pass is kept (before, a failed test
    ℓ(θ') ≥ ℓ_min redid the same pass: 15 % of the passes of the headline cell). The fit equals the one
    that evaluates θ' as a rounded copy of θ₂ and redoes the pass on failure (same iterations, log-likelihoods
    to rounding), with fewer problem-passes redone (the activation gate's cycles often fall back to α = 1 after
    a rejected extrapolation; the linear gates' rarely)."""
    from moelab._fused import steppers as fsteppers

    x, y = _overspecified(n=600, R=3, seed=4)
    kw = dict(gate=gate, gate_options=options, n_init=2, init="random", max_iter=300, tol=1e-10, random_state=0,
              compile=False, warn=False)
    same_rows, redone = [], []
    cand, ev_ext = Squarem.candidate, fsteppers._Stepper.evaluate_extrapolated

    def spy_cand(self, st):
        out = cand(self, st)
        if self.same is not None:
            same_rows.append(int(self.same.sum()))
        return out

    def spy_sub(self, st, idx, pending):
        redone.append(len(idx))
        return type(self)._orig_subset(self, st, idx, pending)

    for cls in (fsteppers.LinearStepper, fsteppers.NewtonStepper):
        monkeypatch.setattr(cls, "_orig_subset", cls._evaluate_subset, raising=False)
        monkeypatch.setattr(cls, "_evaluate_subset", spy_sub)
    monkeypatch.setattr(Squarem, "candidate", spy_cand)
    fast = fit_em(x, y, 3, **kw)
    fast_redone = sum(redone)
    assert sum(same_rows) > 0 and _monotone(fast)  # some cycles ran at α = 1

    def old_rule(self, ext, plain, ll_min, same=None):  # θ' = θ₂ up to rounding, the pass redone where ℓ falls short
        if same is not None and bool(same.any()):
            idx = same.nonzero().squeeze(-1)
            ext = ext.put(idx, unflatten(plain, flatten(plain), 1e-300).take(idx))
        return ev_ext(self, ext, plain, ll_min, None)

    redone.clear()
    monkeypatch.setattr(fsteppers._Stepper, "evaluate_extrapolated", old_rule)
    slow = fit_em(x, y, 3, **kw)
    assert torch.equal(fast.n_iter, slow.n_iter)
    torch.testing.assert_close(fast.start_loglik, slow.start_loglik, rtol=1e-10, atol=0)
    assert fast_redone <= sum(redone) and (gate != "activation" or fast_redone < sum(redone))
