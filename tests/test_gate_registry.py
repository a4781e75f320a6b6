"""The gate registry: a family declared only here is usable by every entry point (issue 10).

What adding a gate costs: the class below and one ``register_gate`` call; no
moelab module changes.
"""

import math
import textwrap
import tomllib
import warnings

import numpy as np
import pytest
import torch

from moelab import GaussianMoE, MixtureOfExpertsRegressor, fit_em, fit_mle
from moelab.experts import GaussianExperts
from moelab.gates import (GATES, ActivationGate, Gate, GateOption, SoftmaxGate, TemperatureGate, gate_spec,
                          make_gate, register_gate, unregister_gate)
from moelab.gates.registry import positive_real

D = torch.float64


class ArctanGate(Gate):
    """Toy family: logits scale·arctan(β_{1k}ᵀx) + β_{0k}; ``scale`` > 0 a fixed option."""

    name = "arctan-toy"
    description = "softmax(scale*arctan(b1'x) + b0)"
    affine_invariant = False
    options = (GateOption("scale", positive_real, 2.0, "factor on arctan(b1'x)"),)

    def __init__(self, slope, intercept, scale=2.0):
        super().__init__(slope, intercept)
        self.scale = float(scale)

    def hyperparams(self):
        return {"scale": self.scale}

    def logits(self, x):
        return self.scale * torch.atan(self._linear(x)) + self.intercept.unsqueeze(-2)


@pytest.fixture
def toy():
    register_gate(ArctanGate)
    yield ArctanGate
    unregister_gate(ArctanGate.name)


def _data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = GaussianMoE(ArctanGate(torch.tensor([[4.0], [0.0]], dtype=D), torch.tensor([0.2, 0.0], dtype=D), scale=3.0),
                        GaussianExperts(torch.tensor([[-2.0], [2.0]], dtype=D), torch.tensor([1.0, -1.0], dtype=D),
                                        torch.tensor([0.05, 0.08], dtype=D)))
    x = torch.rand(n, 1, generator=g, dtype=D) * 2 - 1
    return x, truth.sample(x, g), truth


def test_toy_family_fits_through_fit_em_fit_mle_and_the_estimator(toy):
    x, y, truth = _data()
    ll_true = float(truth.log_prob(x, y).sum())
    em = fit_em(x, y, 2, gate="arctan-toy", gate_options={"scale": 3.0}, n_init=8, n_candidates=40, max_iter=200,
                random_state=0, warn=False)
    assert isinstance(em.model.gate, ArctanGate) and em.model.gate.scale == 3.0
    assert float(em.loglik) >= ll_true - 5.0  # the fit is at least about as good as the truth
    mle = fit_mle(x, y, 2, gate="arctan-toy", gate_options={"scale": 3.0}, init_model=em.model, max_iter=50, warn=False)
    assert float(mle.loglik) >= float(em.loglik) - 1e-6
    reg = MixtureOfExpertsRegressor(2, gate="arctan-toy", gate_options={"scale": 3.0}, n_init=8, n_candidates=40,
                                    max_iter=200, random_state=0).fit(x.numpy(), y.numpy())
    assert reg.loglik_ == pytest.approx(float(em.loglik))
    assert reg.n_free_parameters() == 1 * 2 + 2 * 3
    assert reg.bic(x.numpy(), y.numpy()) == pytest.approx(-2 * reg.loglik_ + 8 * math.log(300))


def test_toy_family_options_are_validated_by_the_registry(toy):
    x, y, _ = _data(60)
    with pytest.raises(ValueError, match="scale must be > 0"):
        fit_em(x, y, 2, gate="arctan-toy", gate_options={"scale": -1.0})
    with pytest.raises(ValueError, match="does not take top_k; it takes scale"):
        fit_mle(x, y, 2, gate="arctan-toy", gate_options={"top_k": 1})
    with pytest.raises(ValueError, match="scale must be > 0"):
        MixtureOfExpertsRegressor(2, gate="arctan-toy", gate_options={"scale": 0}).fit(x.numpy(), y.numpy())
    assert make_gate("arctan-toy", 3, 2).scale == 2.0


def test_toy_family_runs_a_study(toy, tmp_path):
    from moelab.studies import parse_study, run_study

    toml = textwrap.dedent("""
        [study]
        name = "toy"
        seed = 1
        replicates = 2
        n = [120]
        x_points = 16
        [truth]
        x = { distribution = "uniform", low = -1.0, high = 1.0 }
        [truth.gate]
        family = "arctan-toy"
        slope = [[4.0], [0.0]]
        intercept = [0.2, 0.0]
        scale = 3.0
        [truth.experts]
        slope = [[-2.0], [2.0]]
        intercept = [1.0, -1.0]
        sd = [0.2, 0.3]
        [[fit]]
        name = "exact"
        n_experts = 2
        max_iter = 50
        tol = 1e-6
        """)
    study = parse_study(tomllib.loads(toml))
    assert study.truth.gate_options == {"scale": 3.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_study(study, tmp_path / "out", progress=False, report=False)
    assert len(res) == 2 and np.isfinite(res["loglik"]).all() and np.isfinite(res["loss"]).all()
    bad = tomllib.loads(toml.replace("scale = 3.0", "scale = -3.0"))
    with pytest.raises(ValueError, match=r"^truth\.gate\.scale: scale must be > 0"):
        parse_study(bad)


def test_registry_declares_every_builtin_family():
    assert list(GATES)[:4] == ["softmax", "temperature", "activation", "topk"]
    # every built-in family declares how EM's one-pass iteration covers it (issue 11)
    assert {n: GATES[n].em_pass for n in ("softmax", "temperature", "activation", "topk")} == {
        "softmax": "linear", "temperature": "linear", "activation": "newton", "topk": "newton"}
    assert gate_spec("temperature").supports("fused") and gate_spec("activation").supports("fused")
    assert gate_spec("topk", {"top_k": 2}).supports("fused", 3)
    assert not gate_spec("activation", {"activation": lambda t: t.tanh()}).supports("fused")
    with pytest.raises(ValueError, match="already registered"):
        register_gate(type("Other", (SoftmaxGate,), {"name": "softmax"}))


def test_topk_without_or_with_too_large_top_k_fails_before_any_fit():
    x = torch.linspace(0, 1, 50, dtype=D)
    y = torch.sin(6 * x)
    for opts, msg in (({}, "needs top_k"), ({"top_k": 3}, r"top_k=3 is outside \[1, n_experts=2\]")):
        with pytest.raises(ValueError, match=msg):
            fit_em(x, y, 2, gate="topk", gate_options=opts, n_init=10 ** 6)  # a dense fit this size would not end


@pytest.mark.parametrize("activation, counted", [("tanh", 1), ("sigmoid", 1), ("identity", 0), ("relu", 0)])
def test_estimated_temperature_counts_only_where_identified(activation, counted):
    slope, intercept = torch.randn(3, 2, dtype=D), torch.randn(3, dtype=D)
    base = SoftmaxGate(slope, intercept).n_free_parameters()
    gate = ActivationGate(slope, intercept, activation=activation, learn_temperature=True)
    assert gate.n_free_parameters() == base + counted
    assert gate_spec("activation", {"activation": activation, "learn_temperature": True}).n_free_parameters(3, 2) \
        == base + counted
    assert TemperatureGate(slope, intercept, learn_temperature=True).n_free_parameters() == base
    assert ActivationGate(slope, intercept, activation=activation).n_free_parameters() == base


def test_convergence_warning_is_sklearns():
    """Issue 10: filtering scikit-learn's ConvergenceWarning also filters moelab's."""
    import sklearn.exceptions

    import moelab

    assert issubclass(moelab.ConvergenceWarning, sklearn.exceptions.ConvergenceWarning)
    x = torch.linspace(0, 1, 60, dtype=D)
    y = torch.sin(6 * x) + 0.1 * torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=sklearn.exceptions.ConvergenceWarning)
        fit_em(x, y, 2, n_init=2, n_candidates=4, max_iter=2, random_state=0)
    assert not [w for w in caught if issubclass(w.category, sklearn.exceptions.ConvergenceWarning)]
    with pytest.warns(sklearn.exceptions.ConvergenceWarning, match="did not converge in 2 iterations"):
        fit_em(x, y, 2, n_init=2, n_candidates=4, max_iter=2, random_state=0)
