"""Expert parallelism: 2 processes (gloo, loopback) give the outputs and gradients of 1 process.

One launch of two ranks (``ep_worker.py``) runs every scenario: an even split with padding, uneven
local batches with empty ranks (issue 14: (10, 0), (0, 0), (1, 12)), and auxiliary-loss-free
balancing over four steps. The launch is bounded by a timeout, so a hang (a rank missing a
collective) fails the tests instead of blocking them.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("ep_worker.py")
ROOT = Path(__file__).resolve().parents[2]
WORLD = 2  # conftest.launch_ranks starts two ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def load_worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("moelab_ep_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workers_import_this_checkout(tmp_path, launch):
    """The ranks must run the moelab under test (an installed copy elsewhere would make these tests vacuous)."""
    script = tmp_path / "where.py"
    script.write_text("import moelab, sys; print(moelab.__file__)\n")
    logs = launch(script, tmp_path)
    assert all(Path(log.strip().splitlines()[-1]).resolve().is_relative_to(ROOT) for log in logs), logs


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory, launch):
    """One launch of every scenario: (output folder, the two ranks' logs)."""
    out_dir = tmp_path_factory.mktemp("ep")
    logs = launch(WORKER, out_dir, extra_args=("{rank}", "{world}", "{port}", "{out}"))
    return out_dir, logs


def test_ranks_warn_nothing(ep_run):
    """No warning from the collectives (torch 2.13 deprecates torch.distributed.nn.functional's)."""
    for log in ep_run[1]:
        assert "Warning" not in log and "deprecated" not in log.lower(), log


@pytest.fixture(scope="module")
def ranks(ep_run):
    """Results of every scenario, per rank: {scenario: [rank 0, rank 1]}."""
    out_dir = ep_run[0]
    worker = load_worker_module()
    names = ["padded", "bias", "dp_bias", "mixed_grad", "bad_input", *worker.UNEVEN]
    return {n: [torch.load(out_dir / f"{n}.rank{r}.pt") for r in range(WORLD)] for n in names}


@pytest.fixture(scope="module")
def worker():
    return load_worker_module()


def assert_matches_single_process(ranks, layer, out, x_grad):
    """Per-rank results (concatenated / summed) equal the single-process ones."""
    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), out.output.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x_grad)
    for name, p in layer.named_parameters():
        if name.startswith("experts."):  # each rank holds a slice of the experts
            got = torch.cat([r["grads"][name] for r in ranks])
        else:  # replicated parameters: gradients add up over ranks (what DDP's all-reduce does)
            got = sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(got, p.grad, msg=name)
    # each rank counts its own tokens per (global) expert; summed over ranks: the single-process counts
    torch.testing.assert_close(torch.stack([r["tokens_per_expert"] for r in ranks]).sum(0), out.tokens_per_expert)


def test_two_process_expert_parallel_matches_single_process(ranks, worker):
    layer, x, mask, dy = worker.problem()
    x = x.clone().requires_grad_(True)
    out = layer(x, mask)
    (out.output * dy).sum().backward()
    assert_matches_single_process(ranks["padded"], layer, out, x.grad)
    assert layer.experts.w_in.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["uneven_10_0", "uneven_0_0", "uneven_1_12"])
def test_empty_and_uneven_local_batches_match_single_process(ranks, worker, name):
    """Issue 14: a rank with no tokens takes part in both all-to-alls and returns an empty output."""
    sizes = worker.UNEVEN[name]
    layer, x, dy, _ = worker.uneven_problem(sizes)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.output * dy).sum().backward()
    got = ranks[name]
    for r, size in enumerate(sizes):
        assert got[r]["output"].shape == (size, 6) and got[r]["x_grad"].shape == (size, 6)
        for loss in ("load_balancing_loss", "z_loss"):
            assert torch.isfinite(got[r][loss]), (r, loss)
            if size == 0:
                assert got[r][loss].item() == 0.0  # zero contribution from an empty rank
        if size == 0:
            assert got[r]["tokens_per_expert"].tolist() == [0, 0, 0, 0]
    assert_matches_single_process(got, layer, out, x.grad)
    if sum(sizes):  # the experts an empty rank holds still got their tokens' gradients
        empty = [r for r, s in enumerate(sizes) if s == 0]
        for r in empty:
            assert got[r]["grads"]["experts.w_in"].abs().sum() > 0


def test_rank_whose_input_needs_no_gradient_still_joins_the_backward(ranks, worker):
    """Rank 1 (empty, a plain tensor) must still run the backward all-to-all that rank 0 waits for."""
    layer, x, dy, _ = worker.uneven_problem((10, 0))
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.output * dy).sum().backward()
    got = ranks["mixed_grad"]
    assert got[1]["x_grad"] is None
    torch.testing.assert_close(got[0]["x_grad"], x.grad)
    got = [got[0], {**got[1], "x_grad": x.grad[:0]}]
    assert_matches_single_process(got, layer, out, x.grad)


def test_expert_bias_under_expert_parallelism(ranks, worker):
    """Loads are all-reduced: every rank holds the same bias, equal to one process on the whole batch."""
    layer, steps = worker.bias_problem()
    layer.train()
    got = ranks["bias"]
    biases = []
    for i, (x, dy, rows) in enumerate(steps):
        xs = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(xs)
        (out.output * dy).sum().backward()
        load = layer.update_expert_bias()
        per_rank = [got[r][i] for r in range(WORLD)]
        assert_matches_single_process(per_rank, layer, out, xs.grad)
        for r in range(WORLD):
            assert torch.equal(per_rank[r]["load"], load)  # the global load, on every rank
            assert torch.equal(per_rank[r]["bias"], layer.expert_bias)
        biases.append(layer.expert_bias.clone())
    assert biases[-1].abs().sum() > 0 and abs(float(biases[-1].sum())) < 1e-6
    # the bias moved the routing: the later steps' selections differ from those of a bias-free layer
    plain, _ = worker.bias_problem()
    plain.load_state_dict({**layer.state_dict(), "router.expert_bias": torch.zeros(4)})
    x = steps[-1][0]
    assert not torch.equal(plain(x).tokens_per_expert, layer(x).tokens_per_expert)


def test_expert_bias_under_data_parallelism(ranks, worker):
    """Replicated layers with update_expert_bias(group=...) keep one bias, that of one process on all tokens."""
    layer, steps = worker.bias_problem()
    layer.train()
    got = ranks["dp_bias"]
    for i, (x, dy, rows) in enumerate(steps):
        out = layer(x).output.detach()  # routed with the bias of the previous steps
        torch.testing.assert_close(torch.cat([got[r][i]["output"] for r in range(WORLD)]), out)
        load = layer.update_expert_bias()
        for r in range(WORLD):
            assert torch.equal(got[r][i]["load"], load)
            assert torch.equal(got[r][i]["bias"], layer.expert_bias)
    assert layer.expert_bias.abs().sum() > 0


def test_bad_input_on_one_rank_stops_the_group_with_errors_not_a_hang(ranks, worker):
    """Rank 1's wrong-shaped input: rank 1 raises ValueError, rank 0 RuntimeError naming rank 1; both go on."""
    got = ranks["bad_input"]
    assert got[1]["error"][0] == "ValueError" and "d_model=6" in got[1]["error"][1]
    assert got[0]["error"][0] == "RuntimeError" and "rank(s) [1]" in got[0]["error"][1]
    layer, x, dy, _ = worker.uneven_problem((10, 12))
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.output * dy).sum().backward()
    assert_matches_single_process([g["after"] for g in got], layer, out, x.grad)
