"""The one-pass EM iteration for every gate family (issue 11): moelab/_fused/newton.py and the steppers.

* the pass's Q_gate, gradient and Hessian equal autograd's on the textbook
  Q_gate = Σ r log g (the reference: moelab.mstep.gate_newton_step's own derivatives);
* Q at candidates (the line search) equals gate_q, −inf where top-K drops a routed expert;
* blocked over samples equals one block to rounding;
* fits: the eager one-pass loop equals the textbook loop (autograd gate step) and the compiled
  pass equals the eager one, to 1e-9 relative in every parameter and the log-likelihood, and the
  log-likelihood never decreases — for every registered family the pass covers.

Compiled kernels are shared through one module-scoped fit per family; all but one family's compiled
check are marked slow (a cold compile costs 10-40 s per pass spec).
"""

import functools
import math

import pytest
import torch

from moelab import GaussianMoE, _fused, fit_em
from moelab.gates import GATES
from moelab import em as em_mod
from moelab.activations import ACTIVATIONS, activation_derivatives
from moelab.gates import ActivationGate, TopKGate
from moelab.mstep import GateParameters, gate_q
from moelab._fused import cache as fcache
from moelab._fused import newton
from moelab._fused import steppers as fsteppers

D = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_closed_form_derivatives_equal_autograd(name):
    z = torch.linspace(-30, 30, 1201, dtype=D)
    s, s1, s2 = activation_derivatives(name)(z)
    zz = z.clone().requires_grad_(True)
    out = ACTIVATIONS[name](zz)
    (g,) = torch.autograd.grad(out.sum(), zz, create_graph=True)
    h = torch.autograd.grad(g.sum(), zz)[0] if g.requires_grad else torch.zeros_like(z)
    torch.testing.assert_close(s, out.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(s1, g.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(s2, h, rtol=0, atol=1e-15)


def test_closed_form_tanh_is_relatively_accurate_at_every_scale():
    # the pass's tanh is expm1(2z) / (expm1(2z) + 2) (cheaper than torch.tanh when compiled): within
    # 2 ulp of torch.tanh relative to the value, from subnormal-small |z| to saturation; nan and inf kept
    mag = torch.logspace(-300, 1.5, 4001, dtype=D)
    z = torch.cat([mag, -mag, torch.tensor([0.0, 25.0, -25.0, math.inf, -math.inf], dtype=D)])
    s = activation_derivatives("tanh")(z)[0]
    ref = torch.tanh(z)
    assert ((s - ref).abs() <= 2 * torch.finfo(D).eps * ref.abs()).all()
    assert math.isnan(activation_derivatives("tanh")(torch.tensor([math.nan], dtype=D))[0].item())


def test_callable_derivatives_by_forward_mode():
    s, s1, s2 = activation_derivatives(lambda t: torch.sin(t))(torch.tensor([0.3, -1.2], dtype=D))
    torch.testing.assert_close(s1, torch.cos(torch.tensor([0.3, -1.2], dtype=D)))
    torch.testing.assert_close(s2, -torch.sin(torch.tensor([0.3, -1.2], dtype=D)))


def _gate(spec, R, K, d, gen):
    slope = 1.5 * torch.randn(R, K, d, generator=gen, dtype=D)
    slope[:, -1] = 0
    if spec[0] == "activation" and not spec[3]:
        slope[:, -1] = 0.8 * torch.randn(R, d, generator=gen, dtype=D)
    icpt = torch.randn(R, K, generator=gen, dtype=D)
    icpt[:, -1] = 0
    if spec[0] == "activation":
        tau = torch.rand(R, generator=gen, dtype=D) + 0.3
        return ActivationGate(slope, icpt, temperature=tau, activation=spec[1], learn_temperature=spec[2])
    return TopKGate(slope, icpt, top_k=spec[1])


def _keep_reference(gate, ps):
    """``GateParameters.unflatten`` output with the gate's own (fixed) reference slope row, zero or not."""
    ref = gate.slope[..., -1:, :].expand(*ps["slope"].shape[:-2], 1, gate.slope.shape[-1])
    return dict(ps, slope=torch.cat([ps["slope"][..., :-1, :], ref], -2))


def _problem(spec, R=3, n=90, K=3, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, d, generator=gen, dtype=D)
    y = x.sum(-1) + torch.randn(R, n, generator=gen, dtype=D)
    gate = _gate(spec, R, K, d, gen)
    eth = torch.randn(R, K, d + 1, generator=gen, dtype=D)
    var = torch.rand(R, K, generator=gen, dtype=D) + 0.3
    return gate, eth, var, x, y


def _textbook(gate, eth, var, x, y):
    """Responsibilities (R, n, K) and log-likelihood from the gate's own log_weights."""
    R, n, d = x.shape
    x1 = torch.cat([x, torch.ones(R, n, 1, dtype=D)], -1)
    mean = torch.einsum("rkp,rnp->rnk", eth, x1)
    joint = gate.log_weights(x) - HALF_LOG_2PI - 0.5 * var.log()[:, None] - 0.5 * (y[..., None] - mean) ** 2 / var[:, None]
    lse = torch.logsumexp(joint, -1)
    return (joint - lse[..., None]).exp(), lse.sum(-1)


# activation specs: (name, learn_temperature, reference slope zero); the last False puts a nonzero
# fixed reference row in the problem (its activation computed per sample, not the constant σ(0))
SPECS = [("activation", "tanh", False, True), ("activation", "tanh", True, True), ("activation", "sigmoid", True, True),
         ("activation", "gelu", True, True), ("activation", "softplus", False, True), ("activation", "relu", True, True),
         ("activation", "identity", True, True), ("activation", "tanh", True, False), ("activation", "sigmoid", True, False),
         ("activation", "softplus", False, False), ("activation", "gelu", False, False),
         ("topk", 2), ("topk", 1), ("topk", 3)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_pass_derivatives_equal_autograd(spec):
    gate, eth, var, x, y = _problem(spec)
    assert gate.em_pass_spec() == spec
    K, d = 3, 2
    st = newton.unpack_sums(newton.newton_sums(*newton.gate_args(gate), eth, var, x, y, spec), spec, K, d)
    resp, ll = _textbook(gate, eth, var, x, y)
    torch.testing.assert_close(st["loglik"], ll, rtol=1e-13, atol=0)
    torch.testing.assert_close(st["S"][..., -1], resp.sum(1), rtol=1e-12, atol=1e-12)
    layout = GateParameters(gate)
    assert layout.P == newton.n_params(spec, K, d)
    theta = layout.flatten().clone().requires_grad_(True)
    with torch.enable_grad():
        q = gate_q(gate.replace(**_keep_reference(gate, layout.unflatten(theta))).log_weights(x), resp)
        (grad,) = torch.autograd.grad(q.sum(), theta, create_graph=True)
        hess = torch.stack([torch.autograd.grad(grad[:, a].sum(), theta, retain_graph=True)[0] for a in range(layout.P)], 1)
    torch.testing.assert_close(st["q0"], q.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(st["grad"], grad.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["negH"], -hess, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", [("activation", "tanh", True, True), ("activation", "sigmoid", False, True), ("activation", "tanh", True, False), ("topk", 2)], ids=str)
def test_candidate_q_equals_gate_q(spec):
    gate, eth, var, x, y = _problem(spec, seed=3)
    resp, _ = _textbook(gate, eth, var, x, y)
    layout = GateParameters(gate)
    th = layout.flatten()
    gen = torch.Generator().manual_seed(1)
    cand = torch.stack([th, th + 0.01 * torch.randn(th.shape, generator=gen, dtype=D), th + torch.randn(th.shape, generator=gen, dtype=D)])
    ps = _keep_reference(gate, layout.unflatten(cand))
    tau = newton.gate_args(gate)[2]
    ctau = ps.get("temperature", tau.expand(3, -1))
    got = newton.newton_q(ps["slope"], ps["intercept"], ctau, *newton.gate_args(gate), eth, var, x, y, spec)
    ref = torch.stack([gate_q(gate.replace(**{k: v[a] for k, v in ps.items()}).log_weights(x), resp) for a in range(3)])
    if spec[0] == "topk":  # the big step re-routes samples: Q = −inf exactly where the textbook Q is
        assert torch.isneginf(ref[2]).all() and torch.isneginf(got[2]).all()
        got, ref = got[:2], ref[:2]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("spec", [("activation", "tanh", True, True), ("topk", 2)], ids=str)
def test_blocked_over_samples_equals_one_block(spec):
    gate, eth, var, x, y = _problem(spec, R=4, n=2000, seed=5)
    args = newton.gate_args(gate) + (eth, var, x, y, spec)
    whole = newton.newton_sums(*args)
    blocked = fcache.run_blocked(newton.newton_sums, args, block_elements=1024)  # 256-sample blocks
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-9)
    lin = (torch.cat([gate.slope, gate.intercept[..., None]], -1), eth, var, x, y)
    torch.testing.assert_close(fcache.run_blocked(_fused.em_sums, lin, block_elements=1024), _fused.em_sums(*lin),
                               rtol=1e-12, atol=1e-9)
    # blocks over problems too (4 problems of 2000 samples in blocks of 1 × 1024), and the max reduction
    torch.testing.assert_close(fcache.run_blocked(_fused.logit_range, (eth, x), block_elements=1024),
                               _fused.logit_range(eth, x), rtol=0, atol=0)


# ------------------------------------------------------------------ fits
def _data(n=400, R=3, seed=1):
    """Two experts behind the tanh activation gate of the temperature-2024 preset (part b)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(R, n, 1, generator=g, dtype=D)
    w1 = torch.sigmoid(torch.tanh(3 * x[..., 0]) / 0.2 - 2.5)
    z = torch.rand(R, n, generator=g, dtype=D) < w1
    y = torch.where(z, 15 - 20 * x[..., 0], -5 + 20 * x[..., 0]) + 0.3 * torch.randn(R, n, generator=g, dtype=D)
    return x, y


#: (gate, options, n_experts) for every family the pass covers; top-K fits 3 experts, 2 per sample
FAMILIES = {
    "activation-tanh-learned": ("activation", {"activation": "tanh", "learn_temperature": True}, 2),
    "activation-tanh-fixed": ("activation", {"activation": "tanh", "temperature": 0.2}, 2),
    "activation-sigmoid-learned": ("activation", {"activation": "sigmoid", "learn_temperature": True}, 2),
    "topk": ("topk", {"top_k": 2}, 3),
    "temperature-learned": ("temperature", {"learn_temperature": True}, 2),
    "softmax": ("softmax", None, 2),
}


def _params(m):
    g, e = m.gate, m.experts
    parts = [g.slope, g.intercept] + ([g.temperature] if hasattr(g, "temperature") else []) + [e.slope, e.intercept, e.variance]
    return torch.cat([t.flatten() for t in parts])


def _assert_equal_fits(a, b, rtol=1e-9):
    """Same log-likelihood of every start, same iterations, same fitted density at every sample; the same parameters
    unless the best starts tie: several starts may reach one optimum with the experts' labels swapped (same density,
    e.g. all 4 sigmoid-gate starts), and which of them is reported then rests on rounding."""
    torch.testing.assert_close(a.loglik, b.loglik, rtol=rtol, atol=0)
    torch.testing.assert_close(a.start_loglik, b.start_loglik, rtol=rtol, atol=0)
    assert torch.equal(a.n_iter, b.n_iter)
    x, y = _data()
    torch.testing.assert_close(a.model.log_prob(x, y), b.model.log_prob(x, y), rtol=rtol, atol=1e-11)
    best = a.start_loglik.max(-1).values
    tied = ((a.start_loglik - best[..., None]).abs() <= 1e-9 * best.abs()[..., None]).sum(-1) > 1
    for r in range(a.loglik.shape[0]):
        if not bool(tied[r]):
            torch.testing.assert_close(_params(a.model[r]), _params(b.model[r]), rtol=rtol, atol=1e-12)


def _monotone(res):
    h = res.history
    steps = h[..., 1:] - h[..., :-1]
    steps = steps[~torch.isnan(steps)]
    return bool((steps >= -1e-12 * h.nan_to_num(0).abs().max()).all())


@functools.lru_cache(maxsize=None)
def _topk_start():
    """The top-2 sparsification of one dense softmax fit, the start of every top-K fit compared here: the
    dense stage is the softmax case's (compared there), and a sample whose dense gate nearly ties between
    two experts would otherwise take a different routing set on a path that differs from another by rounding."""
    x, y = _data()
    dense = fit_em(x, y, 3, n_init=4, init="kmeans", random_state=0, max_iter=200, tol=1e-10, warn=False,
                   accelerate=None, compile=False)
    return GaussianMoE(TopKGate.from_dense(dense.model.gate, top_k=2), dense.model.experts)


def _fit(name, **kw):
    gate, opts, K = FAMILIES[name]
    x, y = _data()
    base = dict(gate=gate, gate_options=opts, n_init=4, init="kmeans", random_state=0, max_iter=200, tol=1e-10, warn=False,
                accelerate=None)  # the kernels of plain EM compared (tests/test_acceleration.py: SQUAREM)
    if gate == "topk":
        base = dict(base, init_model=_topk_start(), n_init=None, init=None, random_state=None)
        base = {k: v for k, v in base.items() if v is not None}
    return fit_em(x, y, K, **dict(base, **kw))


def test_every_registered_family_is_covered_or_declines():
    for name, cls in GATES.items():
        assert cls.em_pass in (None, "linear", "newton"), name
    covered = [n for n in GATES if GATES[n].em_pass is not None]
    assert set(FAMILIES[f][0] for f in FAMILIES) == set(covered)


@pytest.fixture(scope="module")
def eager_fits():
    """Every family's uncompiled one-pass fit (forced: compile="auto"'s rule may send a linear-logit
    fit to the textbook loop, which would then be compared with itself)."""
    from unittest import mock
    from moelab import autocompile

    with mock.patch.object(em_mod, "pass_mode", autocompile._pass_mode):
        fits = {name: _fit(name, compile=False) for name in FAMILIES}
    return fits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_pass_eager_equals_the_textbook_loop(name, eager_fits, monkeypatch):
    """The one-pass loop (eager, blocked) against the textbook loop: E-step (R, K, n), closed-form experts,
    and the gate step of moelab.mstep (autograd Newton, or IRLS for linear logits)."""
    one_pass = eager_fits[name]
    monkeypatch.setattr(_fused, "supported", lambda *a, **k: False)
    textbook = _fit(name, compile=False)
    _assert_equal_fits(one_pass, textbook)
    assert _monotone(one_pass) and _monotone(textbook)
    assert bool(one_pass.converged.all())


def test_eager_blocking_does_not_change_a_fit(eager_fits, monkeypatch):
    monkeypatch.setattr(fcache, "BLOCK_ELEMENTS", 512)  # 256-sample blocks instead of one
    _assert_equal_fits(_fit("activation-tanh-learned", compile=False), eager_fits["activation-tanh-learned"], rtol=1e-11)


def _compiled_case(name):
    marks = [] if name == "activation-tanh-learned" else [pytest.mark.slow]
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_compiled_case(n) for n in FAMILIES if n != "softmax"])
def test_compiled_equals_eager(name, eager_fits):
    comp = _fit(name, compile=True)
    assert comp.settings["compiled"] and not eager_fits[name].settings["compiled"]
    _assert_equal_fits(comp, eager_fits[name])
    assert _monotone(comp)


def test_auto_uses_warm_activation_kernels(monkeypatch):
    """compile="auto" takes the compiled pass once this process has the kernels of the pass spec."""
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    assert not _fused.kernels.is_ready(_fused.kernel_key(2, 1, D, "cpu", ("activation", "tanh", True, True)))
    assert em_mod.prepare_compiled(2, 1, gate="activation", gate_options={"activation": "tanh", "learn_temperature": True})
    assert _fused.kernels.is_ready(_fused.kernel_key(2, 1, D, "cpu", ("activation", "tanh", True, True)))
    assert _fit("activation-tanh-learned", n_init=10).settings["compiled"]  # 3·10 starts·400·2 = 24,000 >= 10^4
    assert not _fit("activation-tanh-learned", n_init=1).settings["compiled"]  # 2,400 < 10^4: eager


def test_callable_activation_runs_the_textbook_loop():
    x, y = _data(R=1)
    res = fit_em(x, y, 2, gate="activation", gate_options={"activation": lambda t: torch.tanh(t)}, n_init=2,
                 init="kmeans", max_iter=20, random_state=0, warn=False)
    assert not res.settings["compiled"] and torch.isfinite(res.loglik).all()


def test_unregistered_pass_family_gets_a_clear_compile_error():
    from moelab.gates import SoftmaxGate, register_gate, unregister_gate

    cls = type("PlainGate", (SoftmaxGate,), {"name": "plain-test", "em_pass": None})
    register_gate(cls)
    try:
        x, y = _data(R=1)
        with pytest.raises(ValueError, match="needs a softmax or temperature or activation or topk gate"):
            fit_em(x, y, 2, gate="plain-test", compile=True, n_init=2)
        res = fit_em(x, y, 2, gate="plain-test", n_init=2, init="kmeans", max_iter=20, random_state=0, warn=False)
        assert not res.settings["compiled"]
    finally:
        unregister_gate("plain-test")


@pytest.mark.parametrize("spec", [("activation", "tanh", True, True), ("activation", "sigmoid", False, True), ("activation", "sigmoid", False, False)], ids=str)
def test_line_search_from_the_pass_responsibilities_equals_recomputing_them(spec):
    # newton_sums_resp writes r once; newton_q_resp evaluates candidates from it (no second E-step)
    gate, eth, var, x, y = _problem(spec, R=3, n=700, seed=7)
    args = newton.gate_args(gate) + (eth, var, x, y, spec)
    gen = torch.Generator().manual_seed(2)
    check = torch.softmax(torch.randn(3, 3, 700, generator=gen, dtype=D), 1)  # a previous pass's responsibilities
    rargs = args[:-1] + (check, spec)
    sums, resp = newton.newton_sums_resp(*rargs)
    torch.testing.assert_close(sums[:, :-1], newton.newton_sums(*args), rtol=0, atol=0)
    ref_resp, _ = _textbook(gate, eth, var, x, y)
    torch.testing.assert_close(resp, ref_resp.transpose(1, 2), rtol=1e-12, atol=1e-14)
    # the last column: Q_gate of this gate under the check responsibilities (the deferred step check)
    q_here = newton.newton_q_resp(*(t.unsqueeze(0) for t in newton.gate_args(gate)), check, x, spec)[0]
    torch.testing.assert_close(sums[:, -1], q_here, rtol=1e-13, atol=1e-10)
    layout = GateParameters(gate)
    th = layout.flatten()
    cand = torch.stack([th + 0.05 * torch.randn(th.shape, generator=gen, dtype=D) for _ in range(2)])
    ps = layout.unflatten(cand)
    tau = newton.gate_args(gate)[2]
    ctau = ps.get("temperature", tau.expand(2, -1))
    want = newton.newton_q(ps["slope"], ps["intercept"], ctau, *args)
    torch.testing.assert_close(newton.newton_q_resp(ps["slope"], ps["intercept"], ctau, resp, x, spec), want,
                               rtol=1e-12, atol=1e-10)
    # blocked over samples: sums add up, responsibilities are concatenated in sample order
    bs, br = fcache.run_blocked(newton.newton_sums_resp, rargs, block_elements=256)
    torch.testing.assert_close(bs, sums, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(br, resp, rtol=0, atol=0)
    got = fcache.run_blocked(newton.newton_q_resp, (ps["slope"], ps["intercept"], ctau, resp, x, spec), block_elements=256)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("accelerate", [None, "squarem"])
def test_gate_step_checked_by_the_next_pass_equals_checking_it_at_once(accelerate, monkeypatch):
    """Activation gates: the proposed Newton step is checked by the next pass (Q_gate column from the previous
    responsibilities), failed steps searched and their pass redone; the fit equals checking every step at once
    by a pass of its own (newton.m_step, as top-K does), with SQUAREM's extrapolated passes in between too."""
    verify, fixed = newton.verify, []

    def spy(*a, **k):
        out = verify(*a, **k)
        fixed.append(0 if out is None else len(out[0]))
        return out

    monkeypatch.setattr(newton, "verify", spy)
    deferred = _fit("activation-tanh-learned", compile=False, accelerate=accelerate)
    assert sum(fixed) > 0 and len(fixed) > 10  # some proposals failed and were searched and redone
    monkeypatch.setattr(newton, "verify", verify)
    init = fsteppers.NewtonStepper.__init__

    def at_once(self, *a, **k):
        init(self, *a, **k)
        self.keep_resp = False

    monkeypatch.setattr(fsteppers.NewtonStepper, "__init__", at_once)
    immediate = _fit("activation-tanh-learned", compile=False, accelerate=accelerate)
    _assert_equal_fits(deferred, immediate, rtol=1e-11)
    assert _monotone(deferred)
