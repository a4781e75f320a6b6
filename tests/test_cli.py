"""The ``moelab`` command line: ``fit`` output, files, and every user error."""

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from moelab import cli, fit_em, load_dataset
from moelab.cli import main

FAST = ["--n-init", "2", "--n-candidates", "8", "--max-iter", "300"]
MCYCLE = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", *FAST]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _json(capsys, argv):
    rc = main(argv + ["--format", "json"])
    out = capsys.readouterr().out
    assert rc == 0
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


@pytest.fixture(scope="module")
def mcycle_json():
    """One JSON fit shared by the tests that only read it (module scope: capsys is per test)."""
    proc = subprocess.run([sys.executable, "-m", "moelab", *MCYCLE, "--format", "json"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ success
def test_json_via_python_m(mcycle_json):
    r = mcycle_json
    for key in ("loglik", "bic", "aic", "n_iter", "converged", "n_samples", "n_experts", "gate", "params"):
        assert key in r
    assert (r["n_samples"], r["n_experts"], r["gate"], r["x"], r["y"]) == (133, 3, "softmax", ["times"], "accel")
    p = r["n_free_parameters"]
    assert p == 13
    assert r["bic"] == pytest.approx(-2 * r["loglik"] + p * math.log(133))
    assert r["aic"] == pytest.approx(-2 * r["loglik"] + 2 * p)
    assert np.array(r["params"]["gate"]["slope"]).shape == (3, 1)
    assert np.array(r["params"]["experts"]["variance"]).shape == (3,)
    assert sum(r["params"]["expert_size"]) == pytest.approx(133)


def test_json_matches_library_fit(mcycle_json):
    df = load_dataset("mcycle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_em(df[["times"]].to_numpy(), df["accel"].to_numpy(), 3, n_init=2, n_candidates=8, max_iter=300,
                     random_state=0)  # the CLI's default --seed is 0
    assert mcycle_json["loglik"] == pytest.approx(float(res.loglik), rel=1e-10)
    np.testing.assert_allclose(mcycle_json["params"]["experts"]["intercept"], res.model.experts.intercept.numpy())


def test_text_summary(capsys):
    assert main(MCYCLE) == 0
    out = capsys.readouterr().out
    for text in ("data            mcycle  (133 samples)", "model           accel ~ times", "gate            softmax",
                 "log-likelihood", "BIC", "AIC", "iterations", "gate intercept", "gate times", "expert times",
                 "sigma", "size"):
        assert text in out
    assert "wrote" not in out  # no --out: nothing written


def test_out_writes_params_and_plot(tmp_path, capsys):
    out = tmp_path / "new" / "dir"
    assert main(MCYCLE + ["--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    params = json.loads((out / "params.json").read_text())
    assert params["moelab"] == "fit" and params["files"]["plot"] == str(out / "fit.png")
    assert (out / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerunning into the same directory replaces moelab's own outputs
    assert main(MCYCLE + ["--out", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["loglik"] == pytest.approx(params["loglik"])


def test_csv_parquet_multiple_columns_and_gates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"u": rng.normal(size=n), "v": rng.normal(size=n), "label": ["a"] * n})
    df["w"] = np.where(df.u > 0, 2 * df.u + df.v, -df.u) + 0.1 * rng.normal(size=n)
    csv, pq = tmp_path / "d.csv", tmp_path / "d.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(pq)
    before = _sha(csv), _sha(pq)
    r1 = _json(capsys, ["fit", str(csv), "--x", "u,v", "--y", "w", "--experts", "2", *FAST])
    r2 = _json(capsys, ["fit", str(pq), "--x", "u", "--x", "v", "--y", "w", "--experts", "2", *FAST])
    assert r1["x"] == r2["x"] == ["u", "v"] and r1["loglik"] == pytest.approx(r2["loglik"])
    assert np.array(r1["params"]["experts"]["slope"]).shape == (2, 2)
    r3 = _json(capsys, ["fit", str(csv), "--x", "u,v", "--y", "w", "--experts", "2", "--gate", "activation",
                        "--activation", "tanh", "--learn-temperature", "--out", str(tmp_path / "o"), *FAST])
    assert r3["gate"] == "activation" and r3["params"]["gate"]["temperature"] > 0
    assert r3["n_free_parameters"] == 3 + 2 * 4 + 1
    r4 = _json(capsys, ["fit", str(csv), "--x", "u", "--y", "w", "--experts", "2", "--gate", "temperature",
                        "--temperature", "2", *FAST])
    assert r4["params"]["gate"]["temperature"] == 2.0
    assert (_sha(csv), _sha(pq)) == before  # the user's files are untouched


def test_warnings_go_to_stderr(capsys):
    rc = main(["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", "--n-init", "1",
               "--n-candidates", "1", "--max-iter", "1", "--format", "json"])
    cap = capsys.readouterr()
    assert rc == 0
    r = json.loads(cap.out)
    assert r["converged"] is False and r["warnings"]
    assert "moelab fit: warning: EM did not converge" in cap.err


def test_tol_and_compile_flags(capsys):
    import json

    base = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "3", "--n-init", "4", "--format", "json"]
    assert main(base + ["--tol", "1e-3", "--compile", "off"]) == 0
    loose = json.loads(capsys.readouterr().out)
    assert main(base + ["--tol", "1e-10", "--compile", "on"]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert loose["n_iter"] < tight["n_iter"]
    assert tight["loglik"] >= loose["loglik"] - 1e-6


def test_subcommands_are_registered_from_other_modules(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "hello", f"{__name__}:_register_hello")
    assert main(["hello", "--name", "moe"]) == 0
    assert capsys.readouterr().out == "hello moe\n"
    assert main(["hello", "--name", "bad"]) == 2
    assert capsys.readouterr().err == "moelab hello: error: bad name\n"


def _register_hello(sub):
    p = sub.add_parser("hello")
    p.add_argument("--name", required=True)

    def run(args):
        if args.name == "bad":
            raise cli.CLIError("bad name")
        print(f"hello {args.name}")
        return 0

    p.set_defaults(handler=run)


# ------------------------------------------------------------------- errors
@pytest.fixture
def files(tmp_path):
    d = tmp_path
    (d / "nan.csv").write_text("a,b,c,s,k\n1,2,3,x,7\n2,,5,y,7\n3,4,inf,z,7\n4,5,6,w,7\n")
    (d / "ok.csv").write_text("a,b\n" + "".join(f"{i},{(i * 7) % 5}\n" for i in range(30)))
    (d / "empty.csv").write_text("a,b\n")
    (d / "zero.csv").write_text("")
    (d / "malformed.csv").write_text('a,b\n1,2\n2,"3\n')
    (d / "bad.parquet").write_bytes(b"\x00\x01 not parquet")
    (d / "data.json").write_text("{}")
    (d / "notadir").write_text("keep me")
    (d / "theirs").mkdir()
    (d / "theirs" / "params.json").write_text('{"mine": true}')
    return d


BASE = ["--x", "a", "--y", "b", "--experts", "2"]
ERRORS = [
    (["nope.csv", *BASE], "no such file 'nope.csv'"),
    (["{d}/nan.csv", *BASE], "column 'b' has 1 missing or infinite value(s) (first in data row 2); drop or impute"),
    (["{d}/nan.csv", "--x", "a", "--y", "c", "--experts", "1"], "column 'c' has 1 missing or infinite"),
    (["{d}/nan.csv", "--x", "a", "--y", "s", "--experts", "1"], "column 's' is not numeric"),
    (["{d}/nan.csv", "--x", "a,zz", "--y", "b", "--experts", "1"], "no column(s) 'zz' in the data; available columns: a, b, c, s, k"),
    (["{d}/nan.csv", "--x", "k", "--y", "a", "--experts", "1"], "column 'k' is constant"),
    (["{d}/ok.csv", "--x", "a", "--y", "b", "--experts", "8"], "30 samples are fewer than the 38 free parameters"),
    (["{d}/ok.csv", "--x", "a,a", "--y", "b", "--experts", "1"], "--x lists a more than once"),
    (["{d}/ok.csv", "--x", "a", "--y", "a", "--experts", "1"], "both an input (--x) and the response (--y)"),
    (["{d}/empty.csv", *BASE], "has no data rows"),
    (["{d}/zero.csv", *BASE], "is empty (0 bytes); give a file with a header row"),
    (["{d}/malformed.csv", *BASE], "could not read"),
    (["{d}/bad.parquet", *BASE], "bad.parquet"),
    (["{d}/data.json", *BASE], "unknown file type '.json'"),
    (["{d}", *BASE], "is a directory"),
    (["mcycle", "--x", "times", "--y", "accel", "--experts", "0"], "--experts must be >= 1, got 0"),
    (["mcycle", *BASE[:-2], "--experts", "2", "--gate", "temperature", "--temperature", "0"], "--temperature must be a number > 0"),
    (["mcycle", *BASE, "--gate", "temperature", "--temperature", "-1"], "--temperature must be a number > 0"),
    (["mcycle", *BASE, "--temperature", "2"], "--temperature needs --gate temperature or --gate activation"),
    (["mcycle", *BASE, "--learn-temperature"], "--learn-temperature needs --gate temperature"),
    (["mcycle", *BASE, "--gate", "temperature", "--temperature", "2", "--learn-temperature"], "not allowed with argument --temperature"),
    (["mcycle", *BASE, "--top-k", "1"], "--top-k needs --gate topk (got --gate softmax)"),
    (["mcycle", *BASE, "--gate", "topk"], "--gate topk needs --top-k"),
    (["mcycle", *BASE, "--gate", "topk", "--top-k", "3"], "--top-k must be between 1 and --experts (2)"),
    (["mcycle", *BASE, "--activation", "tanh"], "--activation needs --gate activation"),
    (["mcycle", *BASE, "--gate", "bogus"], "invalid choice: 'bogus'"),
    (["mcycle", *BASE, "--gate", "activation", "--activation", "bogus"], "invalid choice: 'bogus'"),
    (["mcycle", *BASE, "--out", "{d}/notadir"], "exists and is not a directory"),
    (["mcycle", *BASE, "--tol", "-1"], "--tol must be a number >= 0, got -1"),
    (["mcycle", *BASE, "--tol", "nan"], "--tol must be a number >= 0"),
    (["mcycle", *BASE, "--compile", "on", "--estimator", "mle"], "--compile applies to --estimator em only"),
    (["mcycle", *BASE, "--compile", "maybe"], "invalid choice: 'maybe'"),
    (["mcycle", *BASE, "--out", "{d}/theirs"], "params.json exists and was not written by moelab fit"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_user_errors(files, capsys, argv, message):
    argv = [a.replace("{d}", str(files)) for a in argv]
    before = {p: _sha(p) for p in files.rglob("*") if p.is_file()}
    rc = main(["fit", *argv])
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.out == ""
    assert message in cap.err
    assert "Traceback" not in cap.err
    if "usage:" not in cap.err:  # argparse's own errors print the usage first
        assert cap.err.count("\n") == 1 and cap.err.startswith("moelab fit: error: ")
    assert {p: _sha(p) for p in files.rglob("*") if p.is_file()} == before  # nothing written or changed


def test_error_via_python_m(files):
    proc = subprocess.run([sys.executable, "-m", "moelab", "fit", str(files / "nan.csv"), *BASE],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("moelab fit: error: column 'b' has 1 missing") and "Traceback" not in proc.stderr


def test_compile_on_needs_a_family_with_a_one_pass_iteration(files, capsys):
    """Every built-in family has one (issue 11); a registered family without one gets the CLI error."""
    from moelab.gates import SoftmaxGate, register_gate, unregister_gate

    register_gate(type("PlainGate", (SoftmaxGate,), {"name": "plain-cli", "em_pass": None}))
    try:
        rc = main(["fit", "mcycle", *BASE, "--compile", "on", "--gate", "plain-cli"])
    finally:
        unregister_gate("plain-cli")
    assert rc == 2
    assert "--compile on needs --gate softmax or temperature or activation or topk (got --gate plain-cli)" in capsys.readouterr().err
