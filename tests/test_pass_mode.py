"""Which EM iteration runs uncompiled (issue 11): the one-pass kernels eager where they are the faster.

Measured (src/moelab/autocompile.py, pass_mode): the linear-logit pass with d > 1 is slower eager than
the textbook loop, so it runs the loop; with d = 1, and for the Newton pass (activation, top-K) at any d,
the eager one-pass iteration is the faster and runs, except for the linear-logit pass below
SMALL_N samples (mcycle, n = 133: the loop is 8-15% faster).
"""

import pytest
import torch

from moelab.autocompile import pass_mode
from moelab.gates import gate_spec
from moelab.options import FitOptions


@pytest.mark.parametrize("gate, options, d, one_pass", [
    ("softmax", None, 1, True),
    ("softmax", None, 3, False),
    ("temperature", {"temperature": 0.5}, 2, False),
    ("activation", {"activation": "tanh"}, 1, True),
    ("activation", {"activation": "tanh"}, 3, True),
])
def test_uncompiled_iteration(gate, options, d, one_pass):
    opts = FitOptions(3, gate, options, estimator="em", compile=False)
    template = gate_spec(gate, options, n_experts=3).template(3, d, (1,), dtype=torch.float64)
    assert pass_mode(opts, template, 4, 500, "cpu") == (one_pass, False)


@pytest.mark.parametrize("gate, options, n, one_pass", [
    ("softmax", None, 133, False),
    ("softmax", None, 300, True),
    ("activation", {"activation": "tanh"}, 133, True),
])
def test_small_samples_run_the_loop_for_linear_logits(gate, options, n, one_pass):
    opts = FitOptions(3, gate, options, estimator="em", compile=False)
    template = gate_spec(gate, options, n_experts=3).template(3, 1, (1,), dtype=torch.float64)
    assert pass_mode(opts, template, 160, n, "cpu") == (one_pass, False)


def test_auto_never_compiles_multi_input_linear_logits(monkeypatch):
    """d > 1 with linear logits runs the textbook loop under compile="auto" even when the fused kernels are already
    compiled in this process (the loop is the faster: 11.1 s vs 15.2 s on diamonds 6k × 3, autocompile.py);
    compile=True still runs the fused pass."""
    from moelab import _fused

    monkeypatch.setattr(_fused.kernels, "is_ready", lambda key: True)  # as if compiled earlier in the process
    template = gate_spec("softmax", None, n_experts=3).template(3, 3, (1,), dtype=torch.float64)
    auto = FitOptions(3, "softmax", None, estimator="em", compile="auto")
    assert pass_mode(auto, template, 160, 53940, "cpu") == (False, False)
    one = gate_spec("softmax", None, n_experts=3).template(3, 1, (1,), dtype=torch.float64)
    assert pass_mode(auto, one, 160, 53940, "cpu") == (True, True)  # d = 1: the warm fused pass
    monkeypatch.setattr("moelab.autocompile._compile", lambda *a, **k: True)
    forced = FitOptions(3, "softmax", None, estimator="em", compile=True)
    assert pass_mode(forced, template, 160, 53940, "cpu") == (True, True)
