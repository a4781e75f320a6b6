"""Expert parallelism: 2 processes (gloo, loopback) give the outputs and gradients of 1 process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("ep_worker.py")
WORLD = 2
TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moelab_ep_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_process_expert_parallel_matches_single_process(tmp_path):
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1"}
    files = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(port), str(files[r])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ranks = [torch.load(f) for f in files]

    worker = load_worker_module()
    layer, x, mask, dy = worker.problem()
    x = x.clone().requires_grad_(True)
    out = layer(x, mask)
    (out.output * dy).sum().backward()

    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), out.output.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad)
    for name, p in layer.named_parameters():
        if name.startswith("experts."):  # each rank holds a slice of the experts
            got = torch.cat([r["grads"][name] for r in ranks])
        else:  # replicated parameters: gradients add up over ranks (what DDP's all-reduce does)
            got = sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(got, p.grad, msg=name)
    assert p.grad.abs().sum() > 0
    # each rank counts its own tokens per (global) expert; summed over ranks: the single-process counts
    torch.testing.assert_close(torch.stack([r["tokens_per_expert"] for r in ranks]).sum(0), out.tokens_per_expert)
