import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from moelab import GaussianExperts, GaussianMoE, SoftmaxGate
from moelab.metrics import density_distances, fit_rate

D = torch.float64


def one_expert(b, var=0.25):
    return GaussianMoE(SoftmaxGate(torch.zeros(1, 1, dtype=D), torch.zeros(1, dtype=D)),
                       GaussianExperts(torch.tensor([[2.0]], dtype=D), torch.tensor([b], dtype=D), torch.tensor([var], dtype=D)))


def test_density_distances_hand_computed():
    x = torch.linspace(0, 1, 8).unsqueeze(-1)
    truth, delta, sd = one_expert(0.0), 0.3, 0.5
    assert float(density_distances(truth, truth, x)["hellinger"]) == 0.0
    d = density_distances(one_expert(delta), truth, x)
    assert float(d["hellinger"]) == pytest.approx(math.sqrt(1 - math.exp(-delta**2 / (8 * sd**2))), rel=1e-6)
    assert float(d["tv"]) == pytest.approx(2 * norm.cdf(delta / (2 * sd)) - 1, rel=1e-3)  # trapezoid rule on |p - q| (kink)


def test_rate_fit_recovers_known_slope():
    rng = np.random.default_rng(0)
    ns = np.repeat([100, 300, 1000, 3000, 10000], 30)
    loss = 3.0 * ns**-0.5 * rng.lognormal(0, 0.3, ns.size)
    r = fit_rate(ns, loss, n_boot=500)
    assert r.ci_low < -0.5 < r.ci_high
    assert abs(r.slope + 0.5) < 0.05
    assert (r.n_min, r.n_max, r.replicates, r.n_levels) == (100, 10000, 30, 5)
    exact = fit_rate([10, 100, 1000], [1.0, 0.1, 0.01], n_boot=0)
    assert exact.slope == pytest.approx(-1.0)


def test_rate_fit_ignores_failed_and_validates():
    r = fit_rate([100, 100, 1000, 1000], [1.0, np.nan, 0.5, 0.5], n_boot=10)
    assert r.slope == pytest.approx(math.log(0.5) / math.log(10))
    assert r.replicates == 1
    assert math.isnan(fit_rate([100, 100], [1.0, 2.0]).slope)
    with pytest.raises(ValueError, match="one n per loss"):
        fit_rate([1, 2], [1.0])


def test_median_rate_resists_rare_far_off_replicates():
    """A loss ∝ n^-1/2 with one replicate in 30 off by 1e6 at random n: the mean slope is wrecked, the median's is not."""
    rng = np.random.default_rng(1)
    ns = np.repeat([1000, 3000, 10000, 30000], 30)
    loss = ns**-0.5 * rng.lognormal(0, 0.2, ns.size)
    loss[[5, 70]] *= 1e6  # at n = 1000 and n = 10000
    mean = fit_rate(ns, loss, n_boot=200)
    med = fit_rate(ns, loss, n_boot=200, statistic="median")
    assert abs(mean.slope + 0.5) > 0.5
    assert med.ci_low < -0.5 < med.ci_high and abs(med.slope + 0.5) < 0.05
    with pytest.raises(ValueError, match="'median'"):
        fit_rate(ns, loss, statistic="mode")
