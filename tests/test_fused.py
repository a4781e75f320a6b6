"""The fused one-pass EM iteration (moelab/_fused.py) against naive references and the eager loop.

The statistics and M-step are checked eagerly (no compiler needed) for several
K and d; the compiled path (torch.compile) is checked end to end against the
eager loop on one model shape, plus its fallback when compilation fails.
"""

import math
import warnings

import pytest
import torch

from moelab import _fused
from moelab import autocompile
from moelab import fit_em
from moelab.mstep import expert_m_step, softmax_gate_newton_step

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _problem(R, n, K, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(R, n, generator=g, dtype=torch.float64) + x.sum(-1)
    gth = torch.randn(R, K, d + 1, generator=g, dtype=torch.float64)
    gth[:, -1] = 0
    eth = torch.randn(R, K, d + 1, generator=g, dtype=torch.float64)
    var = torch.rand(R, K, generator=g, dtype=torch.float64) + 0.3
    return gth, eth, var, x, y


def _naive(gth, eth, var, x, y):
    """(R, K, n) tensors and explicit sums: the textbook E-step and M-step statistics."""
    R, n, d = x.shape
    x1 = torch.cat([x, torch.ones(R, n, 1, dtype=x.dtype)], -1)
    logits = torch.einsum("rkp,rnp->rkn", gth, x1)
    logg = torch.log_softmax(logits, 1)
    e = y[:, None, :] - torch.einsum("rkp,rnp->rkn", eth, x1)
    logf = -HALF_LOG_2PI - 0.5 * var.log()[..., None] - 0.5 * e**2 / var[..., None]
    joint = logg + logf
    lse = torch.logsumexp(joint, 1)
    r = torch.exp(joint - lse[:, None])
    g = logg.exp()
    xx = torch.einsum("rnp,rnq->rnpq", x1, x1)
    K = gth.shape[1]
    return dict(
        loglik=lse.sum(-1),
        lse_gate=torch.logsumexp(logits, 1).sum(-1),
        S=torch.einsum("rkn,rnp->rkp", r, x1),
        A=torch.einsum("rkn,rnpq->rkpq", r, xx),
        be=torch.einsum("rkn,rnp->rkp", r * e, x1),
        ee=(r * e * e).sum(-1),
        G=torch.einsum("rkn,rnp->rkp", g[:, : K - 1], x1),
        Gxx=torch.einsum("rkn,rnpq->rkpq", g[:, : K - 1], xx),
        GG=torch.einsum("rkn,rln,rnpq->rklpq", g[:, : K - 1], g[:, : K - 1], xx),
    ), r


@pytest.mark.parametrize("K,d", [(2, 1), (3, 1), (4, 2), (3, 3)])
def test_statistics_match_naive(K, d):
    args = _problem(3, 57, K, d)
    got = _fused.em_statistics(*args)
    ref, _ = _naive(*args)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-10, msg=k)


def test_gate_lse_sum_and_logit_range():
    gth, eth, _, x, _ = _problem(4, 31, 3, 2)
    cand = torch.stack([gth, 0.5 * gth, -gth])
    x1 = torch.cat([x, torch.ones(4, 31, 1, dtype=x.dtype)], -1)
    ref = torch.stack([torch.logsumexp(torch.einsum("rkp,rnp->rkn", c, x1), 1).sum(-1) for c in cand])
    torch.testing.assert_close(_fused.gate_lse_sum(cand, x), ref, rtol=1e-13, atol=1e-12)
    rng = torch.einsum("rkp,rnp->rkn", eth, x1).abs().amax((-1, -2))
    torch.testing.assert_close(_fused.logit_range(eth, x), rng, rtol=0, atol=1e-13)


@pytest.mark.parametrize("K,d", [(2, 1), (3, 1), (4, 2)])
def test_m_step_matches_eager_kernels(K, d):
    gth, eth, var, x, y = _problem(5, 80, K, d, seed=K + d)
    stats = _fused.em_statistics(gth, eth, var, x, y)
    new_g, new_e, new_v = _fused.m_step(stats, gth, eth, var, x, 1e-6, compiled=False)
    _, r = _naive(gth, eth, var, x, y)
    x1 = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)
    ref_e, ref_v = expert_m_step(x1, y, r, 1e-6, eth, var)
    ref_g = softmax_gate_newton_step(x1, r, gth, 1)
    torch.testing.assert_close(new_e, ref_e, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(new_v, ref_v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(new_g, ref_g, rtol=1e-9, atol=1e-9)


def test_m_step_keeps_empty_expert_and_floors_variance():
    gth, eth, var, x, y = _problem(2, 40, 3, 1, seed=3)
    eth[:, 2, -1] = 1e3  # expert 2 sits far from every y: responsibility ~ 0
    stats = _fused.em_statistics(gth, eth, var, x, y)
    _, new_e, new_v = _fused.m_step(stats, gth, eth, var, x, 0.5, compiled=False)
    torch.testing.assert_close(new_e[:, 2], eth[:, 2])
    torch.testing.assert_close(new_v[:, 2], var[:, 2])
    assert (new_v[:, :2] >= 0.5).all()  # live experts floored; the empty one keeps its old variance


def _data(n=300, R=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(R, n, 1, generator=g, dtype=torch.float64)
    z = torch.rand(R, n, generator=g, dtype=torch.float64) < torch.sigmoid(-8 + 16 * x[..., 0])
    y = torch.where(z, 2 - 3 * x[..., 0], -1 + 4 * x[..., 0]) + 0.3 * torch.randn(R, n, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("gate,opts", [("softmax", None), ("temperature", {"temperature": 0.5})])
def test_compiled_fit_equals_eager(gate, opts):
    x, y = _data()
    kw = dict(gate=gate, gate_options=opts, n_init=6, init="kmeans", random_state=0, max_iter=300, tol=1e-10, warn=False)
    eager = fit_em(x, y, 3, compile=False, **kw)
    comp = fit_em(x, y, 3, compile=True, **kw)
    assert comp.settings["compiled"] and not eager.settings["compiled"]
    torch.testing.assert_close(comp.loglik, eager.loglik, rtol=1e-9, atol=0)
    # the same optimum (starts can reach it with experts in another order, so compare sorted)
    torch.testing.assert_close(comp.model.experts.variance.sort(-1).values, eager.model.experts.variance.sort(-1).values,
                               rtol=1e-5, atol=1e-9)
    # every start's final log-likelihood too (problems leave the batch at different iterations)
    torch.testing.assert_close(comp.start_loglik, eager.start_loglik, rtol=1e-9, atol=0)
    # EM never decreases the log-likelihood
    h = comp.history
    steps = h[..., 1:] - h[..., :-1]
    assert bool((steps[~torch.isnan(steps)] >= -1e-9 * h.abs().nanmean()).all())


def test_compile_failure_falls_back(monkeypatch):
    x, y = _data(n=120, R=1)

    def broken(fn):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call

    cache = _fused.KernelCache()  # a fresh cache whose kernels all fail
    monkeypatch.setattr(cache, "get", broken)
    monkeypatch.setattr(_fused, "kernels", cache)
    monkeypatch.setattr(autocompile, "compile_cost", lambda *a, **k: 0.0)
    kw = dict(n_init=4, init="kmeans", random_state=0, warn=False)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compiler"):
        auto = fit_em(x, y, 2, **kw)
    assert not auto.settings["compiled"]
    ref = fit_em(x, y, 2, compile=False, **kw)
    torch.testing.assert_close(auto.loglik, ref.loglik, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="compile=True: torch.compile of the fused EM kernels failed"):
        fit_em(x, y, 2, compile=True, **kw)


def test_auto_uses_eager_below_threshold():
    x, y = _data(n=100, R=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = fit_em(x, y, 2, n_init=4, init="kmeans", random_state=0, warn=False)
    assert not res.settings["compiled"]


def test_compile_option_errors():
    x, y = _data(n=100, R=1)
    with pytest.raises(ValueError, match="compile must be"):
        fit_em(x, y, 2, compile="yes")
    for bad in (0, 1, None, "on"):  # 0/1 are not booleans here: they must not act as "auto"
        with pytest.raises(ValueError, match="compile must be"):
            fit_em(x, y, 2, compile=bad)
    with pytest.raises(ValueError, match="needs a named activation \\(got a callable"):
        fit_em(x, y, 2, gate="activation", gate_options={"activation": lambda t: t.tanh()}, compile=True, n_init=2)
    with pytest.raises(ValueError, match="needs gate_steps=1"):
        fit_em(x, y, 2, gate_steps=2, compile=True, n_init=2)
    with pytest.raises(ValueError, match="needs dtype=torch.float64"):
        fit_em(x, y, 2, dtype=torch.float32, compile=True, n_init=2)
    with pytest.raises(ValueError, match="2 or more experts"):
        fit_em(x, y, 1, compile=True, n_init=2)


def test_one_feature_logit_range_shortcut_matches_the_pass():
    gth, eth, var, x, y = _problem(6, 50, 3, 1, seed=11)
    gth = gth * 40  # large steps, so the logit-change cap binds for some problems
    stats = _fused.em_statistics(gth, eth, var, x, y)
    a, pa = _fused.gate_proposal(stats, gth, x, _fused.runner(False))
    b, pb = _fused.gate_proposal(stats, gth, x, _fused.runner(False), x_range=(x[..., 0].amin(-1), x[..., 0].amax(-1)))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pa["step"], pb["step"], rtol=1e-12, atol=1e-12)


def test_single_problem_compiled_equals_eager():
    # one problem (R = 1) runs as two rows of half its samples inside the compiled kernels (n = 250 is even)
    x, y = _data(n=250, R=1, seed=4)
    kw = dict(n_init=1, init="kmeans", random_state=0, max_iter=60, tol=0, warn=False)
    comp = fit_em(x[0], y[0], 3, compile=True, **kw)
    eager = fit_em(x[0], y[0], 3, compile=False, **kw)
    assert comp.loglik.shape == ()
    torch.testing.assert_close(comp.loglik, eager.loglik, rtol=1e-9, atol=0)


@pytest.fixture
def broken_compile(monkeypatch):
    """torch.compile returns kernels that raise (a missing C++ compiler, a failed recompilation)."""
    def fake_compile(fn, **kw):
        def broken(*a):
            raise RuntimeError("no C++ compiler found")
        return broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())


def test_failing_compiled_call_runs_eagerly(broken_compile):
    args = _problem(2, 30, 3, 1)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = _fused.statistics(*args)
    ref = _fused.em_statistics(*args)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    one = [a[:1] for a in args]  # one problem, n = 30 < MIN_SPLIT_SAMPLES: repeated, first row returned
    torch.testing.assert_close(_fused.statistics(*one)["A"], _fused.em_statistics(*one)["A"])


def test_compiler_failure_is_detected_at_start(broken_compile):
    # the start-up check must see a failing torch.compile, not silently fall back call by call
    with pytest.warns(RuntimeWarning, match="running the eager EM loop instead"):
        assert not _fused.available(3, 1, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        _fused.available(3, 1, torch.float64, "cpu", strict=True)


def test_auto_uses_warm_kernels_for_mid_sizes(monkeypatch):
    """compile='auto': a mid-size fit (starts·n·K = 3.2e4, far below the cold threshold 1e6) stays eager in a
    process without compiled kernels and takes the fused pass once they are compiled and checked (issue 11)."""
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    x, y = _data(4000, R=1, seed=3)
    kw = dict(init="kmeans", n_init=4, max_iter=30, random_state=0, warn=False)
    cold = fit_em(x, y, 2, **kw)
    assert cold.settings["compiled"] is False
    fit_em(x, y, 2, compile=True, **kw)  # compiles and checks the (K=2, d=1) kernels
    assert _fused.kernels.is_ready(_fused.kernel_key(2, 1, torch.float64, "cpu"))
    warm = fit_em(x, y, 2, **kw)
    assert warm.settings["compiled"] is True
    assert float(warm.loglik.sum()) == pytest.approx(float(cold.loglik.sum()), rel=1e-9)
    tiny = fit_em(x[:, :600], y[:, :600], 2, **dict(kw, n_init=2))  # 2·600·2 = 2,400 < 1e4: eager even when warm
    assert tiny.settings["compiled"] is False


@pytest.mark.parametrize("n", [250, 251])
def test_one_problem_runs_as_two_rows_of_half_its_samples(monkeypatch, n):
    # the compiled kernels never see one problem: an even n becomes two rows of n/2 (one problem's work,
    # rows added, or maxed, per-sample values rejoined in order), an odd n is repeated. "Compiled" here is the
    # kernel itself, recording the shapes it is called with, so the wrapper's bookkeeping is what is tested.
    from moelab._fused import cache as fcache
    from moelab._fused import linear, newton

    seen = []

    def fake_compile(fn, **kw):
        def run(*a):
            seen.append(next(t.shape for t in a if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] > 100))  # x
            return fn(*a)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    kc = fcache.KernelCache()
    gth, eth, var, x, y = _problem(1, n, 3, 1, seed=5)
    half = (2, n // 2, 1) if n % 2 == 0 else (2, n, 1)
    torch.testing.assert_close(kc.get(linear.em_sums)(gth, eth, var, x, y), linear.em_sums(gth, eth, var, x, y),
                               rtol=1e-12, atol=1e-12)
    delta = torch.randn(1, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(kc.get(linear.logit_range)(delta, x), linear.logit_range(delta, x), rtol=0, atol=0)
    cand = torch.randn(4, 1, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(kc.get(linear.gate_lse_sum)(cand, x), linear.gate_lse_sum(cand, x), rtol=1e-12, atol=0)
    slope, icpt, tau = gth[..., :1].contiguous(), gth[..., 1].contiguous(), torch.full((1,), 0.7, dtype=torch.float64)
    check = torch.softmax(torch.randn(1, 3, n, dtype=torch.float64), 1)
    spec = ("activation", "tanh", True, False)  # the random gate's reference row is not zero
    got, resp = kc.get(newton.newton_sums_resp)(slope, icpt, tau, eth, var, x, y, check, spec)
    ref, ref_resp = newton.newton_sums_resp(slope, icpt, tau, eth, var, x, y, check, spec)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert resp.shape == (1, 3, n)
    torch.testing.assert_close(resp, ref_resp, rtol=0, atol=0)
    assert seen and all(s == half for s in seen)


def test_one_feature_m_step_is_the_unpacked_m_step():
    """m_step_one_feature (one graph when compiled) = unpack_sums + expert_update + gate_proposal, bit for bit."""
    gth, eth, var, x, y = _problem(5, 80, 3, 1, seed=12)
    gth = gth * 20  # some steps capped
    sums = _fused.em_sums(gth, eth, var, x, y)
    lo, hi = x[..., 0].amin(-1), x[..., 0].amax(-1)
    theta, v, bad, prop, pending = _fused.linear.m_step_one_feature(sums, gth, eth, var, lo, hi, 80, 1e-8)
    st = _fused.unpack_sums(sums, 3, 1)
    ref_theta, ref_v = _fused.expert_update(st, eth, var, 80, 1e-8)
    ref_prop, ref_pending = _fused.gate_proposal(st, gth, x, _fused.runner(False), x_range=(lo, hi))
    assert not bad.any()
    assert torch.equal(theta, ref_theta) and torch.equal(v, ref_v) and torch.equal(prop, ref_prop)
    assert pending.keys() == ref_pending.keys() and all(torch.equal(pending[k], ref_pending[k]) for k in pending)


def test_a_singular_expert_system_is_solved_by_least_squares():
    """Where Cholesky fails (an indefinite Σ r x1 x1ᵀ), expert_solve flags the expert and expert_update
    takes the least-squares step for it, leaving the other experts' Cholesky steps as they were."""
    gth, eth, var, x, y = _problem(2, 60, 2, 1, seed=13)
    st = _fused.em_statistics(gth, eth, var, x, y)
    st["A"] = st["A"].clone()
    st["A"][1, 0] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite: no Cholesky factor
    theta, v, bad = _fused.linear.expert_solve(st, eth, var, 60, 1e-8)
    assert bad.tolist() == [[False, False], [True, False]]
    new_theta, new_var = _fused.expert_update(st, eth, var, 60, 1e-8)
    keep = ~bad
    assert torch.equal(new_theta[keep], theta[keep]) and torch.equal(new_var[keep], v[keep])
    A, be = st["A"][1, 0], st["be"][1, 0]
    ridge = 1e-10 * A.diagonal().mean() + 1e-30
    delta = torch.linalg.lstsq(A + ridge * torch.eye(2, dtype=A.dtype), (be - ridge * eth[1, 0]).unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(new_theta[1, 0], eth[1, 0] + delta, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(new_var).all()


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_exp_terms_without_the_max_exponential_is_the_same_to_the_bit(K):
    """The compiled form of exp_terms (K − 1 exponentials) against the eager one (K), with ties for the
    maximum, terms below EXP_FLOOR and huge spreads."""
    g = torch.Generator().manual_seed(K)
    terms = [50 * torch.randn(7, 300, generator=g, dtype=torch.float64) for _ in range(K)]
    terms[1][:, :40] = terms[0][:, :40]  # ties for the largest
    terms[-1][:, 40:80] = terms[0][:, 40:80] - 400  # below the floor
    terms[0][:, 80:90] = 1e6
    ref = _fused.linear.exp_terms(terms)  # eager
    got = _fused.linear._exp_terms_but_max(terms)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))


def test_the_compiled_m_step_is_not_compiled_again_for_another_variance_floor():
    """The stepper passes the variance floor as a 0-dim tensor: dynamo specialises compiled functions on
    float arguments, and a new floor (the first fit after prepare_compiled, whose check used 1e-8) compiled
    the M-step again (2.6 CPU-s). Two floors, one graph; the tensor floor gives the float floor's result."""
    from torch._dynamo.utils import counters

    if not _fused.available(3, 1, torch.float64, "cpu"):
        pytest.skip("torch.compile is not available here")
    gth, eth, var, x, y = _problem(4, 50, 3, 1, seed=14)
    sums = _fused.em_sums(gth, eth, var, x, y)
    lo, hi = x[..., 0].amin(-1), x[..., 0].amax(-1)
    kernel = _fused.kernels.get(_fused.linear.m_step_one_feature)
    var = var * torch.tensor([1.0, 1e-7, 1.0], dtype=torch.float64)  # one tiny variance: the floor binds
    kernel(sums, gth, eth, var, lo, hi, 50, torch.tensor(1e-8, dtype=torch.float64))
    before = counters["stats"]["unique_graphs"]
    out = kernel(sums, gth, eth, var, lo, hi, 50, torch.tensor(0.05, dtype=torch.float64))
    assert counters["stats"]["unique_graphs"] == before  # no new graph (a float 0.05 here makes one)
    ref = _fused.linear.m_step_one_feature(sums, gth, eth, var, lo, hi, 50, 0.05)
    assert (out[1] >= 0.05).all()
    for a, b in zip(out[:4], ref[:4]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
