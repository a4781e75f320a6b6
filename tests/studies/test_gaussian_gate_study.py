"""The gaussian-gate-2024 preset and the Gaussian-gate study pieces (issue 12, part 2)."""

import numpy as np
import pytest
import torch

from moelab.metrics import gaussian_voronoi_loss, gaussian_parameter_errors
from moelab.studies import load_preset, parse_study
from moelab.studies.config import StudyError
from moelab.studies.simulate import simulate_cells, true_model, truth_perturbed


def test_preset_is_the_authors_design():
    studies = load_preset("gaussian-gate-2024")
    assert [s.name for s in studies] == ["gaussian-gate-2024-typeI-d1", "gaussian-gate-2024-typeII-d1",
                                         "gaussian-gate-2024-typeI-d2", "gaussian-gate-2024-typeII-d2"]
    ns = np.unique(np.rint(np.concatenate([np.linspace(100, 500, 5), np.linspace(500, 1e5, 95)])))
    for st in studies:
        assert st.n == ns.astype(int).tolist() and st.replicates == 20
        assert [(f.n_experts, f.max_iter) for f in st.fits] == [(4, 2000), (5, 2000), (5, 1)]
        assert st.truth.gate_params["proportions"] == [0.3, 0.4, 0.3]
        assert [m[0] for m in st.truth.gate_params["covariances"]][2][0] == 0.01
    t1, t2 = true_model(studies[0].truth), true_model(studies[1].truth)
    assert t1.gate.means[:, 0].tolist() == [-0.1, 0.1, 0.5] and t2.gate.means[0, 0] == 0
    # their numbers (models.py): A = .017324/.042824, nu1 (Type I) = .0081759 + .1*A*.017324, (Type II) = .0081759 - A*.017324
    assert float(t1.experts.slope[0, 0]) == pytest.approx(0.40453951, rel=1e-7)
    assert float(t1.experts.variance[0]) == pytest.approx(0.00887672, rel=1e-6)
    assert float(t2.experts.variance[0]) == pytest.approx(0.00116766, rel=1e-5)
    assert float(t1.experts.intercept[1]) == pytest.approx(-0.32857143, rel=1e-7)


def test_loss_zero_at_truth_and_at_split_and_authors_exponents():
    st = load_preset("gaussian-gate-2024")[1]  # Type II: c*_1 = 0
    truth = true_model(st.truth)
    assert float(gaussian_voronoi_loss(_batch(truth), truth)) == 0.0
    # split expert 1 (c* = 0) into two copies, move one copy's A by δ: the A term has exponent r̃/2 = 2 (cell of 2)
    g, e = truth.gate, truth.experts
    idx = torch.tensor([0, 0, 1, 2])
    pi = g.proportions[idx] / torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    slope = e.slope[idx].clone()
    slope[1] += 0.01
    from moelab import GaussianExperts, GaussianGate, GaussianMoE

    m = GaussianMoE(GaussianGate(pi, g.means[idx], g.covariances[idx]), GaussianExperts(slope, e.intercept[idx], e.variance[idx]))
    got = float(gaussian_voronoi_loss(_batch(m), truth))
    assert got == pytest.approx(0.15 * 0.01 ** 2, rel=1e-9)
    # c* ≠ 0 (Type I): A has exponent 2 as well; b has exponent r̄ = 4
    inter = e.intercept[idx].clone()
    inter[1] += 0.1
    m2 = GaussianMoE(GaussianGate(pi, g.means[idx], g.covariances[idx]), GaussianExperts(e.slope[idx], inter, e.variance[idx]))
    assert float(gaussian_voronoi_loss(_batch(m2), truth)) == pytest.approx(0.15 * 0.1 ** 4, rel=1e-9)
    assert float(gaussian_voronoi_loss(_batch(m2), truth, "exact")) == pytest.approx(0.15 * 0.1, rel=1e-9)
    err = gaussian_parameter_errors(_batch(m2), truth)
    assert float(err["expert_intercept"]) == pytest.approx(0.015, rel=1e-9) and float(err["gate_mass"]) == 0.0


def _batch(model):
    from moelab import GaussianMoE

    return GaussianMoE(model.gate.map_tensors(lambda t: t[None]), model.experts.map_tensors(lambda t: t[None]))


def test_x_drawn_from_gate_and_authors_start():
    st = load_preset("gaussian-gate-2024", quick=True)[2]  # d = 2
    truth = true_model(st.truth)
    x, y = simulate_cells(st, truth, 4000, [0, 1])
    assert x.shape == (2, 4000, 2) and y.shape == (2, 4000)
    # x ~ Σ π N(c, Γ): the mean of x is Σ π c = 0.3*(-0.1) + 0.4*0.1 + 0.3*0.5 = 0.16 (sd of the mean ≈ 0.004)
    assert float(x.mean()) == pytest.approx(0.16, abs=0.015)
    start = truth_perturbed(truth, st.fits[1], [1, 2, 3], n=1000)
    assert start.gate.proportions.shape == (3, 5)
    assert torch.allclose(start.gate.proportions.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (start.gate.covariances.diagonal(dim1=-2, dim2=-1) >= 0.01).all()  # Γ + |noise| on the diagonal
    assert (start.gate.means - 0.5).abs().max() < 0.7


def test_gaussian_truth_errors():
    base = {"study": {"name": "g", "n": [500]},
            "truth": {"gate": {"family": "gaussian", "proportions": [0.5, 0.5], "means": [[0.0], [1.0]],
                               "covariances": [[[1.0]], [[1.0]]]},
                      "experts": {"slope": [[1.0], [-1.0]], "intercept": [0.0, 0.0], "sd": [0.1, 0.1]}},
            "fit": [{"n_experts": 2, "init": "kmeans"}]}
    assert parse_study(base).truth.n_experts == 2
    bad = {**base, "truth": {**base["truth"], "x": {"distribution": "uniform"}}}
    with pytest.raises(StudyError, match="x is drawn from it"):
        parse_study(bad)
    g = dict(base["truth"]["gate"], proportions=[0.5, 0.6])
    with pytest.raises(StudyError, match="sum to 1"):
        parse_study({**base, "truth": {**base["truth"], "gate": g}})
    g = dict(base["truth"]["gate"], covariances=[[[1.0]], [[-1.0]]])
    with pytest.raises(StudyError, match="positive definite"):
        parse_study({**base, "truth": {**base["truth"], "gate": g}})
    fit = [{"n_experts": 2, "start": {"gate": {"sd": 0.1}, "experts": {"sd": 0.1}, "variance": {"sd": 0.1}}}]
    with pytest.raises(StudyError, match="covariance: missing"):
        parse_study({**base, "fit": fit})
