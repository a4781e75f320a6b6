"""Shared helpers for the moelab.nn tests (fixed seeds, small sizes)."""

import pytest
import torch

from moelab.nn import MoEConfig, MoELayer

def make_layer(seed: int = 0, dtype=torch.float64, **overrides) -> MoELayer:
    kwargs = dict(d_model=6, d_ff=10, n_experts=4, top_k=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**kwargs), dtype=dtype)
    if layer.router.bias is not None:
        with torch.no_grad():
            layer.router.bias.normal_(std=0.3)
    return layer


def grads(module, x):
    """Gradients of (input, every named parameter), as a dict of clones."""
    out = {"input": x.grad.clone()}
    for name, p in module.named_parameters():
        out[name] = None if p.grad is None else p.grad.clone()
    return out


@pytest.fixture(name="make_layer")
def make_layer_fixture():
    """Factory of small float64 layers with a fixed seed."""
    return make_layer


@pytest.fixture(name="grads")
def grads_fixture():
    return grads


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP spin-waits on busy CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
