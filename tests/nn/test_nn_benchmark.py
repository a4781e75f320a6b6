"""Benchmark helpers: the naive loop and the floor are what they claim; HF is optional."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from moelab.nn import MoEConfig, MoELayer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "nn_layer.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("moelab_nn_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in dict(D_MODEL=6, D_FF=5, N_EXPERTS=4, TOP_K=2, N_TOKENS=12).items():
        monkeypatch.setattr(module, name, value)
    return module


def small_layer():
    torch.manual_seed(0)
    return MoELayer(MoEConfig(d_model=6, d_ff=5, n_experts=4, top_k=2, normalize_weights=True))


def test_naive_loop_matches_layer(bench):
    layer = small_layer()
    x = torch.randn(12, 6)
    torch.testing.assert_close(bench.naive_loop(layer, x), layer(x).output)


def test_floor_runs_six_matmuls_per_expert(bench, monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(bench.torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    bench.make_floor([3, 0, 5, 4])()
    assert len(calls) == 6 * 4


def test_hf_is_skipped_with_a_clear_message_when_missing(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    block, reason = bench.make_hf_block(small_layer())
    assert block is None and "transformers not installed" in reason and "pip install" in reason


def test_hf_block_gets_the_same_weights_and_output(bench):
    pytest.importorskip("transformers")
    layer = small_layer()
    block, reason = bench.make_hf_block(layer)
    assert reason is None
    x = torch.randn(12, 6)
    with torch.no_grad():
        torch.testing.assert_close(bench.hf_forward(block, x), layer(x).output)
