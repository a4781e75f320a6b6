"""The topk-2024 preset and what a top-1 gate identifies (issue 12, part 3)."""

import tomllib
from importlib import resources

import pandas as pd
import pytest
import torch

from moelab import GaussianMoE, fit_em
from moelab.experts import GaussianExperts
from moelab.gates import SoftmaxGate, TopKGate
from moelab.gates.identifiability import gate_invariances, routing_only
from moelab.metrics import d1_loss, d2_loss, parameter_errors
from moelab.studies import load_preset, parse_study, run_study
from moelab.studies.config import StudyError
from moelab.studies.simulate import ROUTING_X_POINTS, loss_x_points, study_x_points, true_model
from moelab.studies.theory import identified_quantities

D = torch.float64
X = ((torch.arange(1 << 16, dtype=D) + 0.5) / (1 << 16)).unsqueeze(-1)  # midpoints of U(0, 1)
EXPERTS = GaussianExperts(torch.tensor([[-20.0], [20.0]], dtype=D), torch.tensor([15.0, -5.0], dtype=D),
                          torch.tensor([0.09, 0.16], dtype=D))


def _top1(slope1, icpt1, experts=EXPERTS):
    return GaussianMoE(TopKGate(torch.tensor([[slope1], [0.0]], dtype=D), torch.tensor([icpt1, 0.0], dtype=D), top_k=1), experts)


TRUTH = _top1(25.0, -8.0)  # switch at x = 0.32


def _preset_toml():
    return tomllib.loads((resources.files("moelab") / "presets" / "topk-2024.toml").read_text())


def test_preset_loads_and_states_its_design():
    full, quick = load_preset("topk-2024")[0], load_preset("topk-2024", quick=True)[0]
    assert full.truth.gate == "topk" and full.truth.gate_options == {"top_k": 1}
    assert full.truth.gate_slope == [[25.0], [0.0]] and full.truth.expert_intercept == [15.0, -5.0]
    assert [(f.name, f.n_experts, f.gate_options["top_k"], f.routing_start) for f in full.fits] == [
        ("exact-K2", 2, 1, "dense-fit"), ("over-K3", 3, 2, "dense-fit"), ("over-K3-top1", 3, 1, "dense-fit")]
    assert full.fits[0].theory["err_gate_mass"]["slope"] == -1.0 and "moelab's reading" in full.fits[0].theory["err_gate_mass"]["source"]
    assert full.fits[1].theory["err_expert_intercept"]["slope"] == -0.125
    assert full.fits[2].theory == {}  # below the paper's condition on the selected experts: no claim
    assert quick.n == [200, 632, 2000, 6325, 20000] and quick.replicates == 10 and quick.fits[1].max_iter == 300
    # the density quadrature keeps away from the true switch (docs/studies/topk-2024.md)
    xp = study_x_points(full, true_model(full.truth))
    assert float((xp - 0.32).abs().min()) >= 0.01 - 1e-12


def test_routing_only_is_decided_from_the_gate():
    assert routing_only(TRUTH.gate, X[::64])
    inv = gate_invariances(TRUTH.gate, X[::64])
    assert bool(inv.routing_only) and float(inv.routing_derivative) == 0.0
    top2 = TopKGate(torch.tensor([[25.0], [3.0], [0.0]], dtype=D), torch.tensor([-8.0, 0.5, 0.0], dtype=D), top_k=2)
    assert not routing_only(top2, X[::64]) and not routing_only(SoftmaxGate(TRUTH.gate.slope, TRUTH.gate.intercept), X[::64])
    assert torch.isnan(gate_invariances(top2, X[::64], routing=False).routing_derivative)
    # which rates.csv quantities are identified: the gate slope not under top-1, but under a dense gate
    assert identified_quantities(TRUTH, False, X[::64])["err_gate_slope"] is False
    dense = GaussianMoE(SoftmaxGate(TRUTH.gate.slope, TRUTH.gate.intercept), EXPERTS)
    assert identified_quantities(dense, False, X[::64])["err_gate_slope"] is True


def test_top1_losses_see_the_partition_not_the_scale():
    scaled = _top1(2500.0, -800.0)  # the same partition, logits 100x
    assert float(d1_loss(scaled, TRUTH, X)) == 0.0 and float(d2_loss(scaled, TRUTH, X)) == 0.0
    errs = parameter_errors(scaled, TRUTH, X)
    assert float(errs["gate_mass"]) == 0.0 and float(errs["gate_slope"]) > 100  # reported, not in the losses
    # the switch moved by δ: mass error = 2δ (U(0, 1)); the loss is that alone
    delta = 0.01
    moved = _top1(25.0, -8.0 - 25.0 * delta)
    assert float(parameter_errors(moved, TRUTH, X)["gate_mass"]) == pytest.approx(2 * delta, abs=2 / X.shape[0])
    assert float(d1_loss(moved, TRUTH, X)) == pytest.approx(2 * delta, abs=2 / X.shape[0])
    # an expert parameter moved by ε: its term weighted by the routing mass of its region (0.68 for expert 1)
    eps = 0.05
    off = _top1(25.0, -8.0, GaussianExperts(EXPERTS.slope, EXPERTS.intercept + torch.tensor([eps, 0.0], dtype=D), EXPERTS.variance))
    assert float(d1_loss(off, TRUTH, X)) == pytest.approx(0.68 * eps, rel=1e-3)


def test_over_specified_top2_split_has_near_zero_loss():
    # expert 2 split into two copies sharing its region; expert 1 a steep switch at 0.32 (the hard switch's limit)
    c = 1e4
    gate = TopKGate(torch.tensor([[25.0 * c], [0.0], [0.0]], dtype=D), torch.tensor([-8.0 * c, 0.3, 0.0], dtype=D), top_k=2)
    idx = torch.tensor([0, 1, 1])
    fit = GaussianMoE(gate, GaussianExperts(EXPERTS.slope[idx], EXPERTS.intercept[idx], EXPERTS.variance[idx]))
    assert float(d2_loss(fit, TRUTH, X)) < 1e-3
    # moving one copy's intercept by δ costs ~ mass · δ^r̄ with r̄(2) = 4 in D2, mass · δ in D1
    delta = 0.1
    moved = GaussianMoE(gate, GaussianExperts(EXPERTS.slope[idx], EXPERTS.intercept[idx] + torch.tensor([0.0, delta, 0.0], dtype=D),
                                              EXPERTS.variance[idx]))
    m = float(torch.sigmoid(torch.tensor(0.3)) * 0.32)
    assert float(d2_loss(moved, TRUTH, X)) == pytest.approx(m * delta ** 4, abs=1e-3)
    assert float(d1_loss(moved, TRUTH, X)) == pytest.approx(m * delta, abs=1e-3)


def test_loss_points_are_fine_only_for_a_routing_only_truth():
    st = load_preset("topk-2024", quick=True)[0]
    truth = true_model(st.truth)
    xp = study_x_points(st, truth)
    assert loss_x_points(st, truth, xp).shape == (ROUTING_X_POINTS, 1)
    soft = load_preset("softmax-2023", quick=True)[0]
    ts = true_model(soft.truth)
    xs = study_x_points(soft, ts)
    assert loss_x_points(soft, ts, xs) is xs


def test_fit_em_from_a_softmax_start_fits_dense_then_top1():
    n = 4000
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(n, 1, generator=gen, dtype=D)
    y = TRUTH.sample(x, gen)
    start = GaussianMoE(SoftmaxGate(torch.tensor([[24.0], [0.0]], dtype=D), torch.tensor([-7.5, 0.0], dtype=D)),
                        GaussianExperts(EXPERTS.slope + 0.1, EXPERTS.intercept - 0.1, EXPERTS.variance * 1.1))
    res = fit_em(x, y, 2, gate="topk", gate_options={"top_k": 1}, init_model=start, max_iter=300, tol=1e-9, warn=False)
    g = res.model.gate
    assert isinstance(g, TopKGate) and g.top_k == 1
    switch = float(-g.intercept[0] / g.slope[0, 0])
    assert abs(switch - 0.32) < 20 / n  # a change point: O(1/n); the start's own switch is 0.3125
    dense = fit_em(x, y, 2, gate="softmax", init_model=start, max_iter=300, tol=1e-9, warn=False)
    sparse = fit_em(x, y, 2, gate="topk", gate_options={"top_k": 1}, warn=False, max_iter=300, tol=1e-9,
                    init_model=GaussianMoE(TopKGate.from_dense(dense.model.gate, top_k=1), dense.model.experts))
    assert float(res.loglik) == pytest.approx(float(sparse.loglik), rel=1e-12)
    # kept routing from a top-1 start: the switch stays where the start put it
    frozen = fit_em(x, y, 2, gate="topk", gate_options={"top_k": 1}, warn=False,
                    init_model=GaussianMoE(TopKGate.from_dense(start.gate, top_k=1), start.experts))
    assert float(-frozen.model.gate.intercept[0] / frozen.model.gate.slope[0, 0]) == pytest.approx(0.3125, abs=1e-9)


@pytest.mark.parametrize("change, key, fix", [
    (lambda d: d["fit"][0].update(routing_start="soon"), "fit[0].routing_start", "must be one of"),
    (lambda d: d["fit"][0].update(init="kmeans"), "fit[0].routing_start", "truth-perturbed"),
])
def test_routing_start_errors(change, key, fix):
    d = _preset_toml()
    change(d)
    with pytest.raises(StudyError) as info:
        parse_study(d)
    assert str(info.value).startswith(key + ":") and fix in str(info.value)


def test_routing_start_needs_a_sparse_gate():
    d = tomllib.loads((resources.files("moelab") / "presets" / "softmax-2023.toml").read_text())
    d["fit"][0]["routing_start"] = "dense-fit"
    with pytest.raises(StudyError, match=r"fit\[0\].routing_start: only gates that route"):
        parse_study(d)


def test_tiny_end_to_end_run(tmp_path):
    d = _preset_toml()
    d["quick"] = {"n": [300, 900], "replicates": 2, "max_iter": 40, "tol": 1e-6}
    st = parse_study(d, quick=True)
    res = run_study(st, tmp_path / "run", progress=False)
    assert len(res) == 2 * 2 * 3 and set(res["status"]) <= {"ok", "not_converged", "degenerate"}
    assert res[["loss", "loss_D1", "loss_D2", "hellinger", "err_gate_mass", "err_expert_slope"]].notna().all().all()
    exact = res[res.setting == "exact-K2"]
    assert (exact["err_gate_mass"] < 0.02).all()  # the switch found from the data, to O(1/n)
    assert set(res["gate"]) == {"topk (top-1)", "topk (top-2)"}
    rates = pd.read_csv(tmp_path / "run" / "rates.csv")
    slope_rows = rates[rates.quantity == "err_gate_slope"]
    assert (~slope_rows["identified"]).all() and (slope_rows["verdict"] == "not identified").all()
    assert rates[rates.quantity == "loss_D1"]["identified"].all()


def test_routing_start_start_keeps_the_starts_switch(tmp_path):
    from moelab.studies.runner import start_seeds
    from moelab.studies.simulate import truth_perturbed

    d = _preset_toml()
    d["fit"] = [dict(d["fit"][0], routing_start="start")]
    d["quick"] = {"n": [400], "replicates": 2, "max_iter": 20, "tol": 1e-6}
    st = parse_study(d, quick=True)
    res = run_study(st, tmp_path / "run", progress=False)
    truth = true_model(st.truth)
    xl = loss_x_points(st, truth, study_x_points(st, truth))
    for r in range(2):
        start = truth_perturbed(truth, st.fits[0], start_seeds(st, 0, 400, r, 1), 400)
        expected = float(parameter_errors(start, truth, xl)["gate_mass"][0])
        got = float(res[res.replicate == r]["err_gate_mass"].iloc[0])
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)  # the start's switch, not the data's
