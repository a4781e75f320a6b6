"""The textbook EM loop with one data set shared by all starts (``TextbookStepper(shared_by=R)``) equals the loop
on R copies of it, step by step, for the linear-logit gates, and keeps it once (no copies when starts stop)."""

import pytest
import torch

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate, TemperatureGate
from moelab.fitcore import State
from moelab.options import FitOptions
from moelab.textbook import TextbookStepper

D = torch.float64


def _starts(R, d, K, seed, temperature=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    slope, icpt = r(R, K, d), r(R, K)
    slope[:, -1], icpt[:, -1] = 0, 0
    gate = (TemperatureGate(slope, icpt, temperature=0.5 + r(R).exp()) if temperature else SoftmaxGate(slope, icpt))
    return State(gate, r(R, K, d + 1), 0.5 + r(R, K).exp())


@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("d", [1, 3])
def test_shared_data_equals_copies_step_by_step(d, temperature):
    R, K, n = 6, 3, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = x @ torch.randn(d, generator=g, dtype=D) + torch.randn(n, generator=g, dtype=D).abs()
    x1 = torch.cat([x, torch.ones(n, 1, dtype=D)], -1)
    opts = FitOptions(K, "temperature" if temperature else "softmax",
                      {"learn_temperature": True} if temperature else None, estimator="em")
    copies = TextbookStepper(x.expand(R, n, d).clone(), x1.expand(R, n, d + 1).clone(), y.expand(R, n).clone(), opts)
    shared = TextbookStepper(x, x1, y, opts, shared_by=R)
    a = b = _starts(R, d, K, seed=1, temperature=temperature)
    for it in range(12):
        a, lla = copies.evaluate(a)
        b, llb = shared.evaluate(b)
        torch.testing.assert_close(llb, lla, rtol=1e-12, atol=0)
        torch.testing.assert_close(shared.resp, copies.resp, rtol=1e-10, atol=1e-14)
        assert shared.ya.shape == copies.ya.shape
        if it == 5:  # two starts stop: the shared stepper drops their rows only
            keep = torch.tensor([True, False, True, True, False, True])
            a, b = a.take(keep), b.take(keep)
            copies.keep(keep)
            shared.keep(keep)
            assert shared.xa.shape == (n, d) and shared.xxa.shape == (n, (d + 1) ** 2)
        a, b = copies.m_step(a), shared.m_step(b)
        torch.testing.assert_close(b.theta, a.theta, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.var, a.var, rtol=1e-9, atol=0)
        torch.testing.assert_close(b.gate.logit_coefficients(), a.gate.logit_coefficients(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(shared.sizes, copies.sizes, rtol=1e-10, atol=1e-12)


def test_shared_needs_one_data_set():
    x = torch.zeros(2, 5, 1, dtype=D)
    with pytest.raises(ValueError, match="one data set"):
        TextbookStepper(x, x, x[..., 0], FitOptions(2, "softmax", estimator="em"), shared_by=2)


def test_float32_reaches_the_float64_optimum_from_the_same_starts():
    """float32 (the textbook loop) from 6 fixed starts ends within 0.01 of float64's best log-likelihood. A test
    session found the float64 form of Q_gate (Σθ·S − Σ logsumexp) stalling float32 fits 0.2 below: the two sums
    cancel; float32 keeps per-sample differences."""
    from moelab import fit_em

    g = torch.Generator().manual_seed(11)
    n, d, K = 500, 3, 3
    x = torch.randn(n, d, generator=g, dtype=D)
    z = (x @ torch.tensor([4.0, -3.0, 2.0], dtype=D) > 0).to(D)  # a sharp true gate
    y = z * (1 + x @ torch.tensor([1.0, 0.5, -1.0], dtype=D)) + (1 - z) * (-2 + x[:, 0]) + 0.2 * torch.randn(n, generator=g, dtype=D)
    start = _starts(6, d, K, seed=12)
    model = GaussianMoE(start.gate.replace(slope=start.gate.slope * 0.1, intercept=start.gate.intercept * 0.1),
                        GaussianExperts(start.theta[..., :-1], start.theta[..., -1], start.var))
    kw = dict(init_model=model, max_iter=2000, compile=False, warn=False, accelerate=None)
    r64 = fit_em(x, y, K, **kw)
    m32 = GaussianMoE(model.gate.map_tensors(lambda t: t.float()), model.experts.map_tensors(lambda t: t.float()))
    r32 = fit_em(x.float(), y.float(), K, **dict(kw, init_model=m32), dtype=torch.float32)
    assert abs(float(r32.loglik) - float(r64.loglik)) < 0.01, (float(r32.loglik), float(r64.loglik))


def test_groups_of_starts_equal_one_block(monkeypatch):
    """Shared data with the starts in groups (GROUP_BYTES small: groups of 2 of 6) equals one block step by step."""
    import moelab.textbook as tb

    R, K, n, d = 6, 3, 400, 2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = x.sum(-1) + torch.randn(n, generator=g, dtype=D).abs()
    x1 = torch.cat([x, torch.ones(n, 1, dtype=D)], -1)
    opts = FitOptions(K, "softmax", None, estimator="em")
    one = TextbookStepper(x, x1, y, opts, shared_by=R)
    monkeypatch.setattr(tb, "GROUP_BYTES", 2 * K * n * 8)
    grouped = TextbookStepper(x, x1, y, opts, shared_by=R)
    a = b = _starts(R, d, K, seed=5)
    for it in range(8):
        monkeypatch.setattr(tb, "GROUP_BYTES", 16 * 2**20)
        a, lla = one.evaluate(a)
        ra = one.resp.clone()
        a = one.m_step(a)
        monkeypatch.setattr(tb, "GROUP_BYTES", 2 * K * n * 8)
        assert len(grouped._groups(R, K)) == 3
        b, llb = grouped.evaluate(b)
        torch.testing.assert_close(llb, lla, rtol=1e-13, atol=0)
        torch.testing.assert_close(grouped.resp, ra, rtol=1e-12, atol=1e-15)
        b = grouped.m_step(b)
        torch.testing.assert_close(b.theta, a.theta, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.gate.logit_coefficients(), a.gate.logit_coefficients(), rtol=1e-10, atol=1e-12)
