"""Least-squares studies (estimator = "lse") and the sigmoid-2024 preset (issue 12)."""

import csv
import math
import tomllib

import pandas as pd
import pytest
import torch

from moelab.studies import StudyError, load_preset, parse_study, run_study
from moelab.studies.lse import compare_gates, truth_perturbed
from moelab.studies.runner import RESULT_COLUMNS, read_results
from moelab.studies.simulate import simulate_cells, true_model

LSE = """
[study]
name = "tiny-lse"
seed = 3
replicates = 2
n = [300, 600]
x_points = 32

[truth]
x = { distribution = "uniform", low = -1.0, high = 1.0 }
[truth.gate]
family = "sigmoid"
slope = [[4.0], [-4.0]]
intercept = [0.5, -0.5]
[truth.experts]
kind = "gelu"
slope = [[3.0], [-2.0]]
intercept = [1.0, 1.0]
noise_sd = 0.1

[[fit]]
name = "exact"
n_experts = 2
estimator = "lse"
max_iter = 30

[[fit]]
name = "over"
n_experts = 3
estimator = "lse"
max_iter = 30
tries = 2
"""


def lse_study(**edits):
    data = tomllib.loads(LSE)
    for path, value in edits.items():
        *keys, last = path.split(".")
        t = data
        for k in keys:
            t = t[int(k)] if isinstance(t, list) else t[k]
        if value is None:
            del t[last]
        else:
            t[last] = value
    return parse_study(data)


def test_preset_has_six_studies_on_the_same_data():
    full, quick = load_preset("sigmoid-2024"), load_preset("sigmoid-2024", quick=True)
    assert len(full) == len(quick) == 6
    assert {(s.truth.gate, s.truth.expert_kind) for s in full} == {(g, e) for g in ("sigmoid", "softmax")
                                                                   for e in ("linear", "relu", "gelu")}
    assert all(f.estimator == "lse" for s in full for f in s.fits)
    assert quick[0].all_n()[-1] == 20000 and quick[0].replicates == 6
    assert all(len(f.n) == 10 and f.n[0] == 500 and f.n[-1] == 100000 and f.replicates == 20 for f in full)
    by = {(s.truth.gate, s.truth.expert_kind): s for s in quick}
    for kind in ("linear", "relu", "gelu"):
        a, b = by["sigmoid", kind], by["softmax", kind]
        xa, ya = simulate_cells(a, true_model(a.truth), 500, [0, 1])
        xb, yb = simulate_cells(b, true_model(b.truth), 500, [0, 1])
        assert torch.equal(xa, xb)
        torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)  # the same f*, up to rounding


@pytest.mark.parametrize("edits, key", [
    ({"truth.experts.noise_sd": None}, "truth.experts.noise_sd: missing"),
    ({"truth.experts.sd": [0.1, 0.1]}, "truth.experts.sd: regression experts have one additive noise"),
    ({"truth.experts.kind": "cubic"}, "truth.experts.kind: must be one of"),
    ({"truth.experts.kind": "polynomial"}, "truth.experts.degree: expert='polynomial' needs degree"),
    ({"truth.experts.kind": "relu", "truth.experts.degree": 2}, "truth.experts.degree: degree applies to"),
    ({"truth.experts.noise_sd": -1.0}, "truth.experts.noise_sd: must be > 0"),
    ({"fit.0.estimator": "em"}, "fit[0].estimator: least squares"),
    ({"truth.gate.family": "temperature"}, "truth.gate.family: regression (least-squares) truths take a sigmoid or softmax gate"),
    ({"fit.1.start": {"gate": {"sd": 0.1}, "experts": {"sd": 0.1}, "variance": {"sd": 0.1}}}, "fit[1].start"),
])
def test_bad_lse_studies_name_the_key(edits, key):
    with pytest.raises(StudyError, match=key.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[").replace("]", "\\]")):
        lse_study(**edits)


def test_sigmoid_gate_needs_regression_experts_and_gaussian_truths_need_likelihood():
    with pytest.raises(StudyError, match="truth.gate.family: the sigmoid gate is not normalised"):
        lse_study(**{"truth.experts.kind": None, "truth.experts.noise_sd": None, "truth.experts.sd": [0.1, 0.1]})
    with pytest.raises(StudyError, match="fit\\[0\\].estimator: least squares"):
        lse_study(**{"truth.gate.family": "softmax", "truth.gate.slope": [[4.0], [0.0]], "truth.experts.kind": None,
                     "truth.experts.noise_sd": None, "truth.experts.sd": [0.1, 0.1]})


def test_polynomial_truth_and_parameter_count():
    st = lse_study(**{"truth.experts.kind": "polynomial", "truth.experts.degree": 2,
                      "truth.experts.slope": [[3.0, 1.0], [-2.0, 0.5]]})
    assert true_model(st.truth).experts.degree == 2
    with pytest.raises(StudyError, match="truth.experts.slope: rows have 1 entries"):
        lse_study(**{"truth.experts.kind": "polynomial", "truth.experts.degree": 2})
    with pytest.raises(StudyError, match="n = 5 is fewer than the 8 free parameters of setting 'exact'"):
        lse_study(**{"study.n": [5, 600]})


def test_study_json_of_gaussian_studies_is_unchanged():
    st = lse_study()
    assert st.to_dict()["truth"]["expert_kind"] == "gelu"
    g = load_preset("softmax-2023")[0]
    assert not {"expert_kind", "degree", "noise_sd"} & set(g.to_dict()["truth"])


def test_sigmoid_starts_split_the_weight_at_zero():
    st = lse_study(**{"fit.1.perturbation": 0.0})
    truth = true_model(st.truth)
    start = truth_perturbed(truth, st.fits[1], [1, 2, 3])
    assert start.batch_shape == (3,) and start.gate.name == "sigmoid"
    for b in range(3):
        # the copies of a true expert share its weight at x = 0, and its expert exactly
        w = torch.sigmoid(start.gate.intercept[b])
        total = torch.zeros(2, dtype=w.dtype)
        for k in range(3):
            j = 0 if float(start.experts.slope[b, k, 0]) == 3.0 else 1
            total[j] += w[k]
        torch.testing.assert_close(total, torch.sigmoid(truth.gate.intercept))


def test_a_tiny_lse_study_runs_resumes_and_reports(tmp_path):
    st = lse_study()
    res = run_study(st, tmp_path, progress=False)
    assert len(res) == 2 * 2 * 2 and set(res["status"]) <= {"ok", "not_converged"}
    assert res["regression_l2"].notna().all() and res["loglik"].isna().all() and res["hellinger"].isna().all()
    assert (res.loc[res.setting == "over", "loss_name"] == "D2").all()
    rates = pd.read_csv(tmp_path / "rates.csv")
    assert {"loss_D1", "loss_D2", "regression_l2", "err_expert_slope"} <= set(rates["quantity"])
    assert (tmp_path / "rates-over.png").exists()
    again = run_study(st, tmp_path, progress=False, report=False)  # resumed: nothing refitted
    pd.testing.assert_frame_equal(again.reset_index(drop=True), read_results(tmp_path / "results.csv").reset_index(drop=True))


def test_resuming_a_file_with_the_old_columns_keeps_rows_aligned(tmp_path):
    """Appending to a results file written before regression_l2 existed uses that file's header."""
    from moelab.studies.runner import _append_rows

    path = tmp_path / "results.csv"
    old = [c for c in RESULT_COLUMNS if c != "regression_l2"]
    with open(path, "w") as fh:
        csv.writer(fh).writerow(old)
    _append_rows(path, [dict(study="s", setting="a", n=10, replicate=0, status="ok", loss=0.5, regression_l2=0.1)])
    df = pd.read_csv(path)
    assert list(df.columns) == old and float(df["loss"].iloc[0]) == 0.5


def test_compare_gates_rule():
    rows = []
    for gate, scale in (("sigmoid", 1.0), ("softmax", 4.0)):
        for n in (100, 1000, 10000):
            for r in range(2):
                rows.append(dict(setting=f"{gate}-relu-over-K3", gate=gate, n=n, replicate=r, loss_name="D2",
                                 loss=scale * n ** -0.5, err_expert_slope=scale * n ** -0.25))
    res = pd.DataFrame(rows)
    rates = pd.DataFrame([dict(setting=f"{g}-relu-over-K3", quantity=q, aggregate="mean", slope=s, ci_low=s - 0.1,
                               ci_high=s + 0.1) for g in ("sigmoid", "softmax") for q, s in (("loss_D2", -0.5), ("err_expert_slope", -0.25))])
    cmp = compare_gates(res, rates).set_index("quantity")
    assert cmp.loc["loss_D2", "verdict"] == "consistent" and math.isclose(cmp.loc["loss_D2", "ratio"], 4.0)
    assert cmp.loc["loss_D2", "n_sigmoid_to_match"] == 1000  # sigmoid's error at n=1000 ≤ softmax's at 10⁴
    flipped = compare_gates(res.assign(gate=res["gate"].map({"sigmoid": "softmax", "softmax": "sigmoid"}),
                                       setting=res["setting"].str.replace("sigmoid", "X").str.replace("softmax", "sigmoid").str.replace("X", "softmax")),
                            rates)
    assert set(flipped["verdict"]) == {"inconsistent"}
