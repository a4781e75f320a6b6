"""FitOptions (issue 10): one frozen, validated options object per fit, read where each setting is used."""

import dataclasses

import numpy as np
import pytest
import torch

from moelab import fit_em, fit_mle
from moelab.em import fit_em_with
from moelab.options import FitOptions


def _line(n=200, seed=0, noise=1e-6):
    g = np.random.default_rng(seed)
    x = np.sort(g.uniform(-1, 1, n))
    return x, 2.0 * x + noise * g.standard_normal(n)


@pytest.mark.parametrize("r", [1e-3, 1e-2])
def test_reg_variance_is_the_variance_floor_times_var_y(r):
    # one expert on an almost exact line: its residual variance (~1e-12) is below any floor,
    # so the fitted variance is the floor itself, r·var(y); it would not be if reg_variance were ignored
    x, y = _line()
    floor = r * float(np.var(y, ddof=1))
    em = fit_em(x, y, 1, n_init=2, init="kmeans", reg_variance=r, random_state=0, warn=False)
    assert float(em.model.experts.variance) == pytest.approx(floor, rel=1e-10)
    mle = fit_mle(x, y, 1, n_init=1, init="kmeans", reg_variance=r, random_state=0, warn=False)
    assert float(mle.model.experts.variance) == pytest.approx(floor, rel=1e-3)
    assert float(mle.model.experts.variance) >= floor * (1 - 1e-12)


def test_fit_em_equals_fit_with_the_options_object():
    x, y = _line(noise=0.3, seed=1)
    kw = dict(n_init=6, init="kmeans", reg_variance=0.05, max_iter=80, tol=1e-7, min_expert_sd=0.001)
    a = fit_em(x, y, 2, random_state=3, warn=False, **kw)
    opts = FitOptions(2, "softmax", **kw, warn=False)
    b = fit_em_with(x, y, opts, random_state=3)
    torch.testing.assert_close(a.loglik, b.loglik, rtol=0, atol=0)
    torch.testing.assert_close(a.model.experts.variance, b.model.experts.variance, rtol=0, atol=0)
    # a different floor is a different fit: the option reaches the M-step
    c = fit_em_with(x, y, dataclasses.replace(opts, reg_variance=0.5), random_state=3)
    assert float(c.model.experts.variance.min()) >= 0.5 * float(np.var(y, ddof=1)) * (1 - 1e-12)
    assert not torch.equal(a.loglik, c.loglik)


def test_options_are_frozen_and_validated_once():
    opts = FitOptions(3, "topk", {"top_k": 2})
    assert opts.gate.name == "topk" and dict(opts.gate.options) == {"top_k": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.reg_variance = 1.0
    with pytest.raises(ValueError, match="reg_variance must be > 0, got 0"):
        dataclasses.replace(opts, reg_variance=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        FitOptions(2, estimator="mle", tol=0)
    FitOptions(2, tol=0)  # EM: tol=0 runs exactly max_iter iterations
    with pytest.raises(ValueError, match="min_expert_size must be a number >= 0 or 'auto'"):
        FitOptions(2, min_expert_size="big")
    with pytest.raises(ValueError, match="n_candidates must be a positive integer"):
        FitOptions(2, n_candidates=0)
    assert FitOptions(4).min_size(40) == 2.5 and FitOptions(4, min_expert_size=3).min_size(40) == 3.0


def test_settings_fail_before_the_data_are_read():
    # fit_mle validates init (and every other setting) before the data, as fit_em does
    with pytest.raises(ValueError, match="unknown init 'magic'"):
        fit_mle(np.arange(5.0), np.ones(3), 2, init="magic")
    with pytest.raises(ValueError, match="min_expert_size must be >= 0"):
        fit_em(np.arange(5.0), np.ones(3), 2, min_expert_size=-1)
    with pytest.raises(ValueError, match="estimator='em'"):
        fit_em_with(np.arange(30.0), np.arange(30.0), FitOptions(2, estimator="mle"))
