"""The compiled element-wise kernels (moelab.nn.elementwise): same results as the eager path and the
naive loop, no recompilation for new token counts, a logged fallback when compiling fails (issue 14)."""

import dataclasses
import logging
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from moelab.nn import MoEConfig, MoELayer, fused_moe_ffn, reference_forward
from moelab.nn import elementwise
from moelab.nn.elementwise import KERNELS, kernels

# big enough that every expert gets at least 2 tokens (smaller blocks run the eager twins)
CFG = MoEConfig(d_model=10, d_ff=12, n_experts=4, top_k=2, normalize_weights=True, fused_elementwise=True)


def _layers(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, **overrides)
    fused = MoELayer(cfg, dtype=dtype)
    eager = MoELayer(dataclasses.replace(cfg, fused_elementwise=False), dtype=dtype)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def _fwd_bwd(layer, x, fn=None):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = (fn or (lambda m, t: m(t).output))(layer, x)
    torch.manual_seed(99)
    (y * torch.randn(y.shape, dtype=y.dtype)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.fixture
def calls(monkeypatch):
    """Names of the compiled kernels called (a spy on ElementwiseKernels.compiled_fn)."""
    seen = []
    real = kernels.compiled_fn

    def spy(name):
        fn = real(name)
        return lambda *args: (seen.append(name), fn(*args))[1]

    monkeypatch.setattr(kernels, "compiled_fn", spy)
    return seen


@pytest.fixture
def fresh_kernels():
    """A forgetful kernel registry before and after (tests that break compilation on purpose)."""
    kernels.clear()
    yield kernels
    kernels.clear()


def test_fused_layer_equals_eager_layer_and_naive_loop(calls):
    fused, eager = _layers()
    x = torch.randn(3, 17, 10, generator=torch.Generator().manual_seed(1))
    got = _fwd_bwd(fused, x)
    assert {"swiglu_forward", "sum_rows", "gather_sum"} <= set(calls)  # the compiled kernels ran
    want = _fwd_bwd(eager, x)
    naive = _fwd_bwd(eager, x, lambda m, t: reference_forward(m, t).output)
    for g, w, n in zip(got, want, naive):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # fp32 rounding
        torch.testing.assert_close(g, n, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the forward without a graph: kernel "swiglu"
        calls.clear()
        torch.testing.assert_close(fused(x).output, eager(x).output, rtol=1e-5, atol=1e-6)
        assert "swiglu" in calls


def test_bfloat16_fused_matches_eager_to_bfloat16_rounding(calls):
    fused, eager = _layers(torch.bfloat16)
    x = torch.randn(40, 10, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = _fwd_bwd(fused, x)
    assert {"swiglu_forward", "sum_rows", "gather_sum"} <= set(calls)
    for g, w in zip(got, _fwd_bwd(eager, x)):  # bfloat16 keeps 8 bits: 2^-8 relative per rounding
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0.05 * float(w.float().abs().max()))


def test_float64_gradcheck_through_the_compiled_kernels(calls):
    gen = torch.Generator().manual_seed(3)
    n_tokens, d_model, d_ff, counts = 5, 3, 4, [4, 0, 6]  # k = 2, every used block has >= 2 rows
    token_idx = torch.cat([torch.randperm(n_tokens, generator=gen), torch.randperm(n_tokens, generator=gen)])
    inputs = [torch.randn(n_tokens, d_model, generator=gen, dtype=torch.float64),
              torch.rand(10, generator=gen, dtype=torch.float64),
              torch.randn(3, 2 * d_ff, d_model, generator=gen, dtype=torch.float64),
              torch.randn(3, d_model, d_ff, generator=gen, dtype=torch.float64)]
    inputs = [t.requires_grad_(True) for t in inputs]

    def fn(x, weight, w_in, w_out):
        return fused_moe_ffn(x, token_idx, weight, w_in, w_out, counts, "swiglu", torch.nn.functional.silu,
                             fused_elementwise=True)

    assert torch.autograd.gradcheck(fn, inputs)
    assert {"swiglu_forward", "sum_rows", "gather_sum"} <= set(calls)


def test_a_new_number_of_tokens_per_expert_does_not_recompile(fresh_kernels):
    torch._dynamo.reset()  # forget every compiled graph: the check below compiles the kernels afresh
    fused, _ = _layers()
    gen = torch.Generator().manual_seed(4)
    graphs = counters["stats"]["unique_graphs"]
    _fwd_bwd(fused, torch.randn(50, 10, generator=gen))
    # one graph per kernel, all made by the start-up check: the layer's own calls reuse them
    assert counters["stats"]["unique_graphs"] - graphs == len(KERNELS)
    for n_tokens in (23, 61, 97):  # other token counts, hence other rows per expert (and reused buffers)
        out = _fwd_bwd(fused, torch.randn(n_tokens, 10, generator=gen))
        assert out[0].shape == (n_tokens, 10)
        with torch.no_grad():
            fused(torch.randn(n_tokens + 1, 10, generator=gen))
    assert counters["stats"]["unique_graphs"] - graphs == len(KERNELS), "a new number of tokens recompiled a kernel"


def test_auto_compiles_only_large_cpu_float32_or_bfloat16_calls():
    def never(_):
        raise AssertionError("auto must not compile here")

    cpu = torch.device("cpu")
    big = elementwise.AUTO_MIN_ELEMENTS
    assert kernels.select("auto", torch.float32, cpu, big - 1, never) is None  # too small to pay
    assert kernels.select("auto", torch.float64, cpu, big, never) is None  # float64: eager
    assert kernels.select("auto", torch.float32, torch.device("meta"), big, never) is None  # not CPU
    assert kernels.select(False, torch.float32, cpu, big, never) is None


def test_small_layers_under_auto_stay_eager(calls):
    layer = MoELayer(dataclasses.replace(CFG, fused_elementwise="auto"))
    _fwd_bwd(layer, torch.randn(30, 10))
    assert calls == []


@pytest.mark.parametrize("bad", ["yes", 1, None, "on"])
def test_bad_setting_is_a_clear_type_error(bad):
    with pytest.raises(TypeError, match="fused_elementwise must be 'auto', True or False"):
        MoEConfig(d_model=4, d_ff=4, n_experts=2, fused_elementwise=bad)


def _broken_compile(monkeypatch):
    def compiled_fn(name):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.setattr(kernels, "compiled_fn", compiled_fn)


def test_compile_failure_falls_back_to_eager_with_one_warning(fresh_kernels, monkeypatch):
    _broken_compile(monkeypatch)
    fused, eager = _layers()
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match="torch.compile of the fused element-wise kernels failed.*C\\+\\+ compiler"):
        got = _fwd_bwd(fused, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: the second call is silent
        again = _fwd_bwd(fused, x)
    for g, a, w in zip(got, again, _fwd_bwd(eager, x)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the eager path itself
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    assert "InvalidCxxCompiler" in kernels.status(torch.float32, torch.device("cpu"))


def test_compile_failure_under_auto_is_logged_once(fresh_kernels, monkeypatch, caplog):
    _broken_compile(monkeypatch)
    monkeypatch.setattr(elementwise, "AUTO_MIN_ELEMENTS", 0)
    layer, eager = _layers(fused_elementwise="auto")
    x = torch.randn(30, 10)
    with caplog.at_level(logging.WARNING, logger="moelab.nn"), warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" does not warn
        out = layer(x).output
        layer(x)
    records = [r for r in caplog.records if r.name == "moelab.nn" and "failed" in r.getMessage()]
    assert len(records) == 1
    torch.testing.assert_close(out, eager(x).output, rtol=0, atol=0)


def test_a_compiled_call_failing_later_runs_its_eager_twin(fresh_kernels, monkeypatch):
    fused, eager = _layers()
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(6))
    _fwd_bwd(fused, x)  # compiled and checked
    real = kernels.compiled_fn

    def flaky(name):
        if name == "sum_rows":
            def fail(*args):
                raise RuntimeError("recompilation failed")
            return fail
        return real(name)

    monkeypatch.setattr(kernels, "compiled_fn", flaky)
    with pytest.warns(RuntimeWarning, match="kernel sum_rows failed.*eagerly from now on"):
        got = _fwd_bwd(fused, x)
    assert kernels.failed("sum_rows") and not kernels.failed("gather_sum")
    for g, w in zip(got, _fwd_bwd(eager, x)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_eager_twin_equals_its_kernel_run_eagerly(name):
    """The twins (the fallback) compute what the traced kernels compute (both run eagerly here)."""
    gen = torch.Generator().manual_seed(7)
    n_tokens, k, d = 6, 3, 5
    order = torch.randperm(n_tokens * k, generator=gen)
    rows, weight = torch.randn(n_tokens * k, d, generator=gen), torch.rand(n_tokens * k, generator=gen)
    h = torch.randn(4, 2 * d, generator=gen)
    args = {
        "swiglu_forward": lambda: (h[:, :d], h[:, d:], *(torch.empty(4, d) for _ in range(3))),
        "swiglu": lambda: (h[:, :d], h[:, d:], torch.empty(4, d)),
        "sum_rows": lambda: (rows, order, weight, torch.empty(n_tokens, d)),
        "gather_sum": lambda: (rows, order, torch.empty(n_tokens, d)),
    }[name]
    kernel, twin = KERNELS[name]
    a, b = args(), args()
    kernel(*a)
    twin(*b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
