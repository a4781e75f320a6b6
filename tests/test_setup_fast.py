"""The fit's set-up: the finite check, the standardisation and the lazily built design matrix.

Their fast forms (one reduction for the finite check, two passes for the standard deviation, no
[x, 1] copy for the one-pass EM) must decide and compute exactly what the plain forms do.
"""

import math

import numpy as np
import pytest
import torch

from moelab import fit_em
from moelab._scaling import Scaling
from moelab._validation import check_finite
from moelab.fitcore import design, make_starts, setup_problem
from moelab.options import FitOptions


@pytest.mark.parametrize("bad, n_nan, n_inf", [(float("nan"), 1, 0), (float("inf"), 0, 1), (-float("inf"), 0, 1)])
def test_check_finite_finds_every_non_finite_value(bad, n_nan, n_inf):
    t = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t[2, 17] = bad
    with pytest.raises(ValueError, match=f"x contains {n_nan} NaN and {n_inf} infinite value\\(s\\) \\(first at index \\(2, 17\\)\\)"):
        check_finite(t, "x")


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    t = torch.full((10,), 1e308, dtype=torch.float64)  # sum is inf: the full check must run, and pass
    assert not math.isfinite(float(t.sum()))
    check_finite(t, "x")
    t[3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        check_finite(t, "x")


def test_inf_and_minus_inf_cancelling_in_the_sum_are_still_found():
    t = torch.zeros(6, dtype=torch.float64)
    t[1], t[4] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="0 NaN and 2 infinite"):
        check_finite(t, "y")


@pytest.mark.parametrize("center_x", [True, False])
def test_fit_transform_matches_the_textbook_standardisation(center_x):
    gen = torch.Generator().manual_seed(1)
    x = 1e3 + 5.0 * torch.randn(3, 2000, 2, dtype=torch.float64, generator=gen)  # large mean: cancellation test
    y = -7.0 + 0.01 * torch.randn(3, 2000, dtype=torch.float64, generator=gen)
    x0, y0 = x.clone(), y.clone()
    sc, xs, ys = Scaling.fit_transform(x, y, center_x)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the caller's data is not changed
    # the sample sd against an extended-precision two-pass reference (torch.std is off by up to 2e-14 here)
    for t, dim, got in ((x, -2, sc.x_scale), (y, -1, sc.y_scale)):
        tl = t.numpy().astype(np.longdouble)
        ref = np.sqrt(((tl - tl.mean(dim, keepdims=True)) ** 2).sum(dim) / (tl.shape[dim] - 1))
        assert float(np.abs((got.numpy() - ref) / ref).max()) < 1e-15
        torch.testing.assert_close(got, t.std(dim), rtol=1e-13, atol=0)
    torch.testing.assert_close(sc.y_loc, y.mean(-1), rtol=1e-15, atol=0)
    loc = x.mean(-2) if center_x else torch.zeros(3, 2)
    torch.testing.assert_close(sc.x_loc, loc.to(x.dtype), rtol=1e-15, atol=0)
    torch.testing.assert_close(xs, (x - sc.x_loc.unsqueeze(-2)) / sc.x_scale.unsqueeze(-2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ys, (y - sc.y_loc.unsqueeze(-1)) / sc.y_scale.unsqueeze(-1), rtol=1e-12, atol=1e-12)
    # transform() gives the same standardised data as fit_transform
    xt, yt = sc.transform(x, y)
    assert torch.equal(xt, xs) and torch.equal(yt, ys)
    assert Scaling.fit(x, y, center_x).x_scale.equal(sc.x_scale)


def test_fit_transform_still_refuses_constant_columns():
    x = torch.ones(1, 30, 2, dtype=torch.float64)
    x[0, :, 1] = torch.arange(30.0)
    with pytest.raises(ValueError, match=r"x column\(s\) \[0\] are constant"):
        Scaling.fit_transform(x, torch.arange(30.0).unsqueeze(0).double(), True)
    with pytest.raises(ValueError, match="y is constant"):
        Scaling.fit_transform(x[..., 1:], torch.full((1, 30), 2.0, dtype=torch.float64), True)


def test_make_starts_builds_the_design_matrix_only_when_asked():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 300, 1, dtype=torch.float64, generator=gen)
    y = torch.randn(2, 300, dtype=torch.float64, generator=gen)
    opts = FitOptions(n_experts=2, n_init=4)
    prob = setup_problem(x, y, opts, 0)
    state, xr, x1r, yr = make_starts(prob, 4, design_matrix=True)
    state2, xr2, none, yr2 = make_starts(setup_problem(x, y, opts, 0), 4, design_matrix=False)
    assert none is None and torch.equal(x1r, design(xr)) and torch.equal(xr, xr2) and torch.equal(yr, yr2)
    assert torch.equal(state.theta, state2.theta)


def test_the_textbook_loop_builds_its_own_design_matrix():
    """Two features, eager: fit_em runs the textbook loop, which reads [x, 1] (made after the starts)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 400, 2, dtype=torch.float64, generator=gen)
    y = torch.where(x[..., 0] > 0.5, 2 * x[..., 1], -x[..., 1]) + 0.1 * torch.randn(2, 400, dtype=torch.float64, generator=gen)
    res = fit_em(x, y, 2, n_init=3, random_state=0, compile=False, warn=False)
    assert res.settings["compiled"] is False and torch.isfinite(res.loglik).all()
    # the returned log-likelihood is the model's own at its parameters
    torch.testing.assert_close(res.model.log_prob(x, y).sum(-1), res.loglik, rtol=1e-10, atol=0)


def test_the_recompile_limit_is_raised_only_inside_the_compiled_calls():
    from moelab._fused.cache import _RECOMPILE_LIMIT, _recompile_limit_raised

    cfg = torch._dynamo.config
    before = cfg.recompile_limit
    with _recompile_limit_raised():
        assert cfg.recompile_limit == max(before, _RECOMPILE_LIMIT)
    assert cfg.recompile_limit == before
    with pytest.raises(RuntimeError, match="inside"):
        with _recompile_limit_raised():
            raise RuntimeError("inside")
    assert cfg.recompile_limit == before
