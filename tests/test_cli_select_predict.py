"""``moelab select``, ``moelab fit --out`` model.json and ``moelab predict`` (issue 15 items 3, 4)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moelab import MixtureOfExpertsRegressor, load_dataset
from moelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--n-init", "2", "--n-candidates", "8", "--max-iter", "300"]
SELECT = ["select", "mcycle", "--x", "times", "--y", "accel", "--experts", "1-3", *FAST]
FIT = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", *FAST]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """moelab fit --out DIR once; the tests read DIR/model.json."""
    out = tmp_path_factory.mktemp("fit")
    assert main(FIT + ["--out", str(out), "--format", "json"]) == 0
    return out


def _err(capsys, argv, command):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moelab {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------ select
def test_select_json(capsys):
    rc = main(SELECT + ["--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["criterion"] == "bic" and [r["n_experts"] for r in doc["table"]] == [1, 2, 3]
    keys = {"n_experts", "loglik", "n_params", "bic", "aic", "icl", "min_expert_size", "converged"}
    assert all(keys <= set(r) for r in doc["table"])
    assert doc["chosen"] == min(doc["table"], key=lambda r: r["bic"])["n_experts"]
    # the row for K = 3 is `moelab fit --experts 3` with the same flags and seed
    assert main(FIT + ["--format", "json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    row = doc["table"][2]
    assert row["loglik"] == pytest.approx(fit["loglik"], rel=1e-12)
    assert row["bic"] == pytest.approx(fit["bic"], rel=1e-12) and row["n_params"] == fit["n_free_parameters"]


def test_select_text_and_out(tmp_path, capsys):
    out = tmp_path / "sel"
    assert main(SELECT + ["--experts", "1,3", "--criterion", "icl", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for s in ("criterion  ICL", "log-likelihood", "parameters", "smallest expert", "converged", "chosen: ",
              f"wrote {out / 'selection.json'} and {out / 'criteria.png'}"):
        assert s in text
    assert "<-" in text  # the chosen row is marked
    doc = json.loads((out / "selection.json").read_text())
    assert doc["moelab"] == "select" and doc["criterion"] == "icl"
    assert [r["n_experts"] for r in doc["table"]] == [1, 3]
    assert (out / "criteria.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(SELECT + ["--out", str(out)]) == 0  # moelab's own outputs are replaced


SELECT_ERRORS = [
    (["--experts", "1-x"], "--experts: cannot read '1-x'"),
    (["--experts", "3-1"], "is empty; write it as 1-3"),
    (["--experts", "2-3", "--gate", "topk", "--top-k", "3"], "--top-k must be between 1 and --experts (2), got 3"),
    (["--experts", "2", "--temperature", "2"], "--temperature needs --gate temperature or --gate activation"),
    (["--experts", "1-60"], "cannot fit: n_experts=28: 133 samples are fewer than the 138 free parameters"),
]


@pytest.mark.parametrize("extra,message", SELECT_ERRORS)
def test_select_errors(capsys, extra, message):
    argv = ["select", "mcycle", "--x", "times", "--y", "accel", "--n-init", "1", "--max-iter", "5", *extra]
    if "--experts" not in extra:
        argv += ["--experts", "1-2"]
    assert message in _err(capsys, argv, "select")


def test_select_refuses_foreign_files(tmp_path, capsys):
    (tmp_path / "selection.json").write_text('{"mine": 1}')
    line = _err(capsys, SELECT + ["--out", str(tmp_path)], "select")
    assert "was not written by moelab select" in line
    assert (tmp_path / "selection.json").read_text() == '{"mine": 1}'


# ------------------------------------------------------------- fit + predict
def test_fit_out_writes_model_json(fitted):
    doc = json.loads((fitted / "model.json").read_text())
    assert doc["format"] == "moelab-model" and doc["response"] == "accel" and doc["inputs"]["features"] == ["times"]
    df = load_dataset("mcycle")
    assert doc["inputs"]["training"]["min"] == [df["times"].min()]
    params = json.loads((fitted / "params.json").read_text())
    assert params["files"]["model"] == str(fitted / "model.json")


def test_predict_matches_the_estimator(fitted, tmp_path, capsys):
    df = load_dataset("mcycle")
    new = pd.DataFrame({"times": np.linspace(3, 57, 25), "other": "x"})
    csv = tmp_path / "new.csv"
    new.to_csv(csv, index=False)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(fitted / "model.json"), str(csv), "--out", str(out), "--level", "0.8"]) == 0
    assert "wrote" in capsys.readouterr().err
    pred = pd.read_csv(out)
    assert list(pred.columns) == ["mean", "sd", "lower", "upper", "expert", "gate_1", "gate_2", "gate_3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = MixtureOfExpertsRegressor(3, n_init=2, n_candidates=8, max_iter=300, random_state=0).fit(
            df[["times"]], df["accel"])
    X = new[["times"]]
    np.testing.assert_allclose(pred["mean"], est.predict(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pred["sd"], np.sqrt(est.predict_variance(X)), rtol=1e-12)
    lo, hi = est.predict_interval(X, 0.8)
    np.testing.assert_allclose(pred["lower"], lo, rtol=1e-12)
    np.testing.assert_allclose(pred["upper"], hi, rtol=1e-12)
    np.testing.assert_allclose(pred[["gate_1", "gate_2", "gate_3"]], est.predict_proba(X), atol=1e-15)
    assert (pred["expert"] == est.predict_expert(X) + 1).all()
    # stdout without --out; rerunning into moelab's own file is allowed
    assert main(["predict", str(fitted / "model.json"), str(csv)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "mean,sd,lower,upper,expert,gate_1,gate_2,gate_3"
    assert main(["predict", str(fitted / "model.json"), str(csv), "--out", str(out)]) == 0


def test_predict_warns_outside_training_range(fitted, tmp_path, capsys):
    csv = tmp_path / "far.csv"
    pd.DataFrame({"times": [10.0, 100.0]}).to_csv(csv, index=False)
    assert main(["predict", str(fitted / "model.json"), str(csv)]) == 0
    assert ("moelab predict: warning: 1 of 2 row(s) (first: row 2) lie outside the training range of times"
            in capsys.readouterr().err)


@pytest.fixture
def bad_files(tmp_path, fitted):
    d = tmp_path
    (d / "noinput.csv").write_text("t\n1\n")
    (d / "text.csv").write_text("times\n1\nabc\n")
    (d / "mine.csv").write_text("keep me\n")
    doc = json.loads((fitted / "model.json").read_text())
    doc["format_version"] = 99
    (d / "v99.json").write_text(json.dumps(doc))
    del doc["params"]
    doc["format_version"] = 2
    (d / "noparams.json").write_text(json.dumps(doc))
    return d


PREDICT_ERRORS = [
    (["{m}", "{d}/noinput.csv"], "no column(s) 'times' that the model was fitted on; available columns: t"),
    (["{m}", "{d}/text.csv"], "column 'times' is numeric but 1 value is not a number: row 2: 'abc' (data rows "
                              "counted from 1 after the header); fix or remove those rows."),
    (["{m}", "mcycle", "--level", "1.5"], "--level must be a probability strictly between 0 and 1"),
    (["{m}", "mcycle", "--out", "{d}/mine.csv"], "mine.csv exists and was not written by moelab predict"),
    (["{m}", "mcycle", "--out", "{d}"], "is a directory; give a file name"),
    (["{d}/v99.json", "mcycle"], "has model format version 99"),
    (["{d}/noparams.json", "mcycle"], "missing key 'params'"),
    (["{d}/absent.json", "mcycle"], "no such model file"),
    (["{f}/params.json", "mcycle"], "that is moelab fit's params.json; load DIR/model.json instead"),
]


@pytest.mark.parametrize("argv,message", PREDICT_ERRORS)
def test_predict_errors(bad_files, fitted, capsys, argv, message):
    argv = [a.format(d=bad_files, m=fitted / "model.json", f=fitted) for a in argv]
    assert message in _err(capsys, ["predict", *argv], "predict")
    assert (bad_files / "mine.csv").read_text() == "keep me\n"


def test_fit_refuses_to_overwrite_a_foreign_model_json(tmp_path, capsys):
    (tmp_path / "model.json").write_text("mine")
    assert "model.json exists and is not a moelab model file" in _err(capsys, FIT + ["--out", str(tmp_path)], "fit")
    assert (tmp_path / "model.json").read_text() == "mine"


def test_predict_via_python_m(fitted, tmp_path):
    """``python -m moelab predict`` in a fresh process (the README's last step) writes the CSV."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moelab", "predict", str(fitted / "model.json"), "mcycle",
                           "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    pred = pd.read_csv(tmp_path / "p.csv")
    assert len(pred) == 133 and pred["sd"].gt(0).all()
