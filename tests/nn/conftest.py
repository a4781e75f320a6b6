"""Shared helpers for the moelab.nn tests (fixed seeds, small sizes)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parents[2]  # the checkout under test, not whichever moelab is installed
WORLD = 2
LAUNCH_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script, out_dir, extra_args=(), timeout=LAUNCH_TIMEOUT_S):
    """Run ``script`` as WORLD=2 ranks on 127.0.0.1 with torchrun's environment variables.

    ``extra_args`` may contain ``{rank}``, ``{world}``, ``{port}``, ``{out}``. Fails the test (never
    hangs) if a rank exits non-zero or is still running after ``timeout`` seconds; returns the logs.
    """
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(WORLD),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script),
             *[a.format(rank=r, world=WORLD, port=port, out=out_dir) for a in extra_args]],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=str(out_dir),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a rank of {Path(script).name} still runs after {timeout} s (a hang in a collective?)")
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs


@pytest.fixture(name="launch", scope="session")
def launch_fixture():
    """:func:`launch_ranks`: two gloo ranks on the loopback, bounded by a timeout."""
    return launch_ranks
