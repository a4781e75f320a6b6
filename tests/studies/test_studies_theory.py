"""Theory beside every slope (issue 9, parts 2-3): identified, theory_slope/source, verdict, aggregate."""

import copy
import math

import pandas as pd
import pytest

from moelab.studies import StudyError, load_preset, parse_study, run_study
from moelab.studies.report import RATE_COLUMNS, rate_table
from moelab.studies.simulate import true_model, x_points
from moelab.studies.theory import identified_quantities, log_rate_slope, verdict

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib


def base():
    from conftest import TINY

    return tomllib.loads(TINY)


def activation_study(act, learn=True):
    d = base()
    d["truth"]["gate"] = {"family": "activation", "activation": act, "slope": [[3.0], [0.0]], "intercept": [-2.5, 0.0],
                          "temperature": 0.5}
    d["fit"] = [{"name": "K2", "n_experts": 2, "gate_options": {"activation": act, "learn_temperature": learn},
                 "max_iter": 5, "tol": 1e-6}]
    return parse_study(d)


def _ident(study):
    truth = true_model(study.truth)
    xpts = x_points(study.truth.x, study.x_points, truth.n_features, seed=study.seed)
    f = study.fits[0]
    return identified_quantities(truth, bool(f.gate_options.get("learn_temperature")), xpts)


@pytest.mark.parametrize("act, ok", [("relu", False), ("identity", False), ("tanh", True), ("sigmoid", True),
                                     ("gelu", True), ("softplus", True)])
def test_identified_from_the_gate(act, ok):
    ident = _ident(activation_study(act))
    assert ident == {"err_gate_slope": ok, "err_temperature": ok}
    assert _ident(activation_study(act, learn=False)) == {"err_gate_slope": True, "err_temperature": True}


def test_presets_identification():
    for st in load_preset("temperature-2024"):
        ok = not st.name.endswith(("temperature", "identity"))
        for f in st.fits:
            truth = true_model(st.truth)
            xpts = x_points(st.truth.x, st.x_points, 1, seed=st.seed)
            assert identified_quantities(truth, True, xpts) == {"err_gate_slope": ok, "err_temperature": ok}, st.name


def test_log_rate_slope():
    # d log(1/log n) / d log n = -1/log n: between -1/log(1e3) and -1/log(1e5) on that range
    s = log_rate_slope([1e3, 1e4, 1e5])
    assert -1 / math.log(1e3) < s < -1 / math.log(1e5)
    with pytest.raises(ValueError, match="two distinct"):
        log_rate_slope([100, 100])


@pytest.mark.parametrize("slope, lo, hi, claim, expect", [
    (-0.5, -0.6, -0.4, {"slope": -0.5, "source": "s"}, "consistent"),
    (-0.3, -0.35, -0.25, {"slope": -0.5, "source": "s"}, "inconsistent"),
    (-0.05, -0.2, 0.1, {"rate": "slower-than-polynomial", "source": "s"}, "consistent"),
    (-0.12, -0.2, -0.1, {"rate": "slower-than-polynomial", "source": "s"}, "consistent"),  # reaches 1/log n's slope
    (-0.5, -0.6, -0.4, {"rate": "slower-than-polynomial", "source": "s"}, "inconsistent"),
    (-0.5, -0.6, -0.4, {"rate": "polynomial", "source": "s"}, "consistent"),
    (-0.05, -0.2, 0.1, {"rate": "polynomial", "source": "s"}, "inconsistent"),
    (-0.5, -0.6, -0.4, None, "no theory"),
    (math.nan, math.nan, math.nan, {"slope": -0.5, "source": "s"}, "no estimate"),
])
def test_verdicts(slope, lo, hi, claim, expect):
    out = verdict(slope, lo, hi, identified=True, claim=claim, n_levels=[1e3, 1e4, 1e5])
    assert out["verdict"] == expect
    assert out["theory_source"] == (claim or {}).get("source", "none")
    assert verdict(slope, lo, hi, identified=False, claim=claim, n_levels=[1e3, 1e5])["verdict"] == "not identified"


def test_theory_slope_column():
    n = [1e3, 1e4]
    assert verdict(-1, -2, 0, identified=True, claim={"slope": -0.25, "source": "s"}, n_levels=n)["theory_slope"] == -0.25
    assert verdict(-1, -2, 0, identified=True, claim={"rate": "slower-than-polynomial", "source": "s"}, n_levels=n)["theory_slope"] == 0.0
    assert math.isnan(verdict(-1, -2, 0, identified=True, claim={"rate": "polynomial", "source": "s"}, n_levels=n)["theory_slope"])


def test_rate_table_from_results_has_every_column_and_both_aggregates():
    study = activation_study("relu")
    study.fits[0].theory = {"loss_D1": {"slope": -0.5, "source": "paper A"},
                            "err_temperature": {"rate": "slower-than-polynomial", "source": "paper B"}}
    # synthetic results: loss ∝ n^-1/2 with one far-off replicate per n
    rows = []
    for n in (100, 1000, 10000):
        for r in range(9):
            v = n**-0.5 * (1 + 0.05 * r) * (1e4 if r == 0 else 1.0)
            rows.append(dict(study="s", setting="K2", gate="g", n_experts=2, loss_name="D1", n=n, replicate=r, status="ok",
                             loss=v, err_temperature=0.3, err_gate_slope=0.2, err_gate_slope_over_tau=v))
    rates = rate_table(pd.DataFrame(rows), study, n_boot=200)
    assert list(rates.columns) == list(RATE_COLUMNS)
    assert set(rates["aggregate"]) == {"mean", "median"}
    t = rates.set_index(["quantity", "aggregate"])
    assert t.loc[("loss_D1", "median"), "verdict"] == "consistent"
    assert t.loc[("loss_D1", "median"), "theory_source"] == "paper A"
    assert not t.loc[("err_temperature", "mean"), "identified"] and t.loc[("err_temperature", "mean"), "verdict"] == "not identified"
    assert not t.loc[("err_gate_slope", "mean"), "identified"]
    assert t.loc[("err_gate_slope_over_tau", "mean"), "identified"]
    assert t.loc[("err_gate_slope_over_tau", "mean"), "verdict"] == "no theory"


def test_bad_theory_keys_name_key_and_fix():
    for theory, key, fix in [
        ({"loss_D2": {"slope": -0.5, "source": "s"}}, "fit[0].theory.loss_D2", "name the claim loss_D1"),
        ({"loss_D1": {"slope": 0.5, "source": "s"}}, "fit[0].theory.loss_D1.slope", "must be <= 0"),
        ({"loss_D1": {"rate": "fast", "source": "s"}}, "fit[0].theory.loss_D1.rate", "slower-than-polynomial"),
        ({"loss_D1": {"slope": -0.5}}, "fit[0].theory.loss_D1.source", "say where the claim comes from"),
        ({"loss_D1": {"slope": -0.5, "rate": "polynomial", "source": "s"}}, "fit[0].theory.loss_D1", "exactly one of"),
        ({"speed": {"slope": -0.5, "source": "s"}}, "fit[0].theory.speed", "allowed keys"),
        ({"tv": -0.5}, "fit[0].theory.tv", "must be a table"),
    ]:
        d = base()
        d["fit"][0]["theory"] = theory
        with pytest.raises(StudyError) as e:
            parse_study(d)
        assert str(e.value).startswith(key + ":") and fix in str(e.value), str(e.value)


def test_changing_a_claim_keeps_finished_fits(tmp_path):
    d = base()
    d["study"]["replicates"] = 1
    d["fit"] = d["fit"][:1]
    study = parse_study(d)
    res = run_study(study, tmp_path, progress=False)
    d2 = copy.deepcopy(d)
    d2["fit"][0]["theory"] = {"loss_D1": {"slope": -0.5, "source": "new claim"}}
    res2 = run_study(parse_study(d2), tmp_path, progress=False)  # resumes: nothing refitted
    pd.testing.assert_frame_equal(res.reset_index(drop=True), res2.reset_index(drop=True))
    rates = pd.read_csv(tmp_path / "rates.csv")
    assert (rates[rates["quantity"] == "loss_D1"]["theory_source"] == "new claim").all()
    d3 = copy.deepcopy(d)
    d3["fit"][0]["max_iter"] = 7
    with pytest.raises(StudyError, match="different study"):
        run_study(parse_study(d3), tmp_path, progress=False)
