"""Issue 11 item 4: the progress display, racing of starts (early stop of hopeless starts) and the
compile="auto" cost rule."""

import json
import math
import warnings

import pytest
import torch

import moelab
from moelab import _fused, autocompile, progress, racing
from moelab.options import FitOptions
from moelab.cli import main


def _mcycle():
    df = moelab.load_dataset("mcycle")
    return df[["times"]].to_numpy(), df["accel"].to_numpy()


# ------------------------------------------------------------------ forecasts on exact geometric EM traces
def _geometric(L=-100.0, c=5.0, a=0.9, T=30):
    t = torch.arange(T, dtype=torch.float64)
    return L - c * a**t  # increments c·a^t·(1 − a), shrinking at rate a


def test_aitken_gain_is_exact_on_a_geometric_trace():
    h = _geometric()
    gain = racing.aitken_gain(h[None, -7:])
    assert float(gain) == pytest.approx(float(-100.0 - h[-1]), rel=1e-9)


def test_aitken_gain_is_infinite_when_increments_do_not_shrink():
    h = torch.arange(10, dtype=torch.float64)[None]  # constant increments: a = 1
    assert math.isinf(float(racing.aitken_gain(h)))
    flat = torch.full((1, 7), -3.0, dtype=torch.float64)
    assert float(racing.aitken_gain(flat)) == 0.0


def test_remaining_iterations_on_a_geometric_trace():
    a, c = 0.9, 5.0
    h = _geometric(c=c, a=a, T=12)
    eps = 1e-6
    # increment at t is c a^(t-1) (1-a); first t with increment < eps
    t_stop = next(t for t in range(1, 10_000) if c * a ** (t - 1) * (1 - a) < eps)
    left = progress.remaining_iterations(h[None, -3:], eps, 10_000)
    assert abs(left - (t_stop - 11)) <= 2
    assert progress.remaining_iterations(h[None, -3:], eps, 5) == 5  # capped at max_iter
    assert progress.remaining_iterations(torch.arange(3.0, dtype=torch.float64)[None], eps, 77) == 77  # a = 1


def test_race_stops_only_starts_below_the_best_converged_valid_start():
    race = racing.StartRace(n_problems=2, n_keep=2, min_size=1.0, min_sd=0.01)
    active = torch.tensor([0, 1, 2, 3])
    ll = torch.tensor([-10.0, -50.0, -10.0, -50.0], dtype=torch.float64)
    sizes = torch.full((4, 2), 50.0, dtype=torch.float64)
    sizes[2, 0] = 0.5  # problem 1's converged start collapsed: no reference there
    var = torch.ones(4, 2, dtype=torch.float64)
    race.record(active, ll, torch.tensor([True, False, True, False]), sizes, var)
    assert race.best.tolist() == [-10.0, -math.inf]
    T = racing.MIN_ITER + 1
    hist = torch.zeros(4, T + 5, dtype=torch.float64)
    hist[:, :T] = torch.stack([_geometric(L=v, c=1.0, a=0.9, T=T) for v in (-10.0, -49.0, -10.0, -49.0)])
    run = torch.tensor([1, 3])
    assert race.stop(run, hist[run, T - 2], hist, T - 2, eps=1e-6).tolist() == [False, False]  # before MIN_ITER
    stop = race.stop(run, hist[run, T - 1], hist, T - 1, eps=1e-6)
    assert stop.tolist() == [True, False]  # start 1 forecasts −49 < −10; problem 1 has no valid converged start
    slow = torch.tensor([-50.0 + 0.1 * t for t in range(T)], dtype=torch.float64)  # increments do not shrink
    hist[1, :T] = slow
    assert race.stop(torch.tensor([1]), hist[[1], T - 1], hist, T - 1, eps=1e-6).tolist() == [False]


def test_racing_returns_the_same_fit_as_running_every_start():
    x, y = _mcycle()
    # plain EM: the race forecasts from EM's own increments (SQUAREM's starts converge before it stops any)
    full = moelab.fit_em(x, y, 3, random_state=0, accelerate=None)  # default: every start to convergence
    raced = moelab.fit_em(x, y, 3, random_state=0, prune_starts=True, accelerate=None)
    assert raced.settings["starts_stopped_early"] > 0
    assert full.settings["starts_stopped_early"] == 0
    assert float(raced.loglik) == pytest.approx(float(full.loglik), rel=1e-12)
    assert bool(raced.converged) and int(raced.n_iter) == int(full.n_iter)


# ------------------------------------------------------------------ progress display
def test_progress_forced_on_writes_stages_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    x, y = _mcycle()
    moelab.fit_em(x, y, 2, n_init=8, random_state=0, progress=True, compile=False)
    err = capsys.readouterr().err
    assert "screening starts" in err and "EM: " in err and "8 starts" in err


def test_progress_auto_is_off_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    x, y = _mcycle()
    moelab.fit_em(x, y, 2, n_init=8, random_state=0, progress="auto", compile=False)
    assert capsys.readouterr().err == ""
    assert progress.progress_enabled("auto") is False  # capsys's stderr is no terminal

    class Tty:
        def isatty(self):
            return True

    assert progress.progress_enabled("auto", Tty()) is True


def test_progress_option_is_validated():
    x, y = _mcycle()
    with pytest.raises(ValueError, match="progress must be 'auto'"):
        moelab.fit_em(x, y, 2, progress="yes")
    with pytest.raises(ValueError, match="prune_starts must be True or False"):
        moelab.fit_em(x, y, 2, prune_starts="no")


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_shows_no_progress_off_a_terminal_or_with_quiet(monkeypatch, capsys, quiet):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    argv = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", "--n-init", "10", "--format", "json"]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert json.loads(out.out)["converged"]


def test_cli_quiet_turns_forced_progress_off(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "progress_enabled", lambda p, stream=None: p is True or p == "auto")  # a terminal
    argv = ["fit", "mcycle", "--x", "times", "--y", "accel", "--experts", "2", "--n-init", "10", "--format", "json"]
    assert main(argv) == 0
    assert "EM" in capsys.readouterr().err
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ compile="auto" cost rule
def test_compile_cost_cold_without_marker_and_warm_with_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    assert autocompile.compile_cost(3, 3) == autocompile.COLD_COMPILE_S
    path = autocompile.marker_path(3, 3)
    assert str(path).startswith(str(tmp_path)) and torch.__version__ in str(path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"warm_seconds": 6.5}))
    monkeypatch.setattr(autocompile, "_inductor_cache_present", lambda: True)
    assert autocompile.compile_cost(3, 3) == 6.5
    monkeypatch.setattr(autocompile, "_inductor_cache_present", lambda: False)  # Inductor's cache was wiped
    assert autocompile.compile_cost(3, 3) == autocompile.COLD_COMPILE_S


def test_a_compile_is_recorded_cold_or_warm_by_what_the_fx_graph_cache_did(monkeypatch, tmp_path):
    """Predicted warm (a marker and an Inductor cache present) but the FX-graph cache missed: the seconds
    go to cold_seconds, the warm figure stays; with no miss they go to warm_seconds. The warm figure read
    back never exceeds the cold one."""
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    monkeypatch.setattr(autocompile, "_inductor_cache_present", lambda: True)
    path = autocompile.marker_path(3, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"warm_seconds": 6.5}))
    misses = iter([10, 13, 13, 13])  # first compile: 3 misses; second: none
    monkeypatch.setattr(autocompile, "_fx_graph_cache_misses", lambda: next(misses))
    monkeypatch.setattr(_fused, "available", lambda *a, **k: True)
    assert autocompile._compile(3, 1, torch.float64, "cpu")
    rec = json.loads(path.read_text())
    assert rec["warm_seconds"] == 6.5 and "cold_seconds" in rec
    assert autocompile.compile_cost(3, 1) == min(6.5, rec["cold_seconds"])
    assert autocompile._compile(3, 1, torch.float64, "cpu")
    rec = json.loads(path.read_text())
    assert rec["warm_seconds"] < 6.5  # the fake compile took no time, recorded as warm
    path.write_text(json.dumps({"warm_seconds": 52.0, "cold_seconds": 20.4}))  # a cold compile once recorded as warm
    assert autocompile.compile_cost(3, 1) == 20.4


def test_predicted_saving_and_the_auto_decision(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    per = (autocompile.EAGER_NS - autocompile.FUSED_NS) * 1e-9
    assert autocompile.predicted_saving(10, 1000, 3, 50) == pytest.approx(per * 10 * 1000 * 3 * 50)
    assert autocompile.predicted_saving(10, 1000, 3, 10**6) == pytest.approx(per * 10 * 1000 * 3 * autocompile.TYPICAL_ITERS)
    calls = []
    monkeypatch.setattr(autocompile, "_compile", lambda *a, **k: calls.append(a) or True)
    opts = FitOptions(3)
    gate = moelab.SoftmaxGate(torch.zeros(4, 3, 1, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))
    assert not autocompile.use_fused(opts, gate, 4, 1000, "cpu") and not calls  # saves ~0.2 s < 40 s cold compile
    assert autocompile.use_fused(opts, gate, 160, 50_000, "cpu") and calls  # saves ~360 s


def test_the_rule_counts_squarem_iterations_and_the_textbook_alternative(monkeypatch, tmp_path):
    """Measured (autocompile's module doc): diamonds 6k x 3, K = 3, SQUAREM: a fresh CLI process 24.8 s
    uncompiled (textbook loop) vs 31.1 s compiled with a 7.4 s warm compile -> leave it uncompiled. Since the
    textbook loop keeps one data set for all starts, linear logits with d > 1 are never compiled by "auto"
    (11.1 s vs 15.2 s warm); with d = 1 and plain EM the predicted saving still pays for the compile."""
    base = autocompile.predicted_saving(160, 6000, 3, 2000)
    acc = autocompile.predicted_saving(160, 6000, 3, 2000, accelerated=True)
    assert acc == pytest.approx(base * autocompile.TYPICAL_ITERS_ACCELERATED / autocompile.TYPICAL_ITERS)
    tb = autocompile.predicted_saving(160, 6000, 3, 2000, accelerated=True, textbook=True)
    assert tb < 7.4 < autocompile.predicted_saving(160, 53940, 3, 2000, accelerated=True, textbook=True)
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    monkeypatch.setattr(autocompile, "compile_cost", lambda *a, **k: 7.4)
    calls = []
    monkeypatch.setattr(autocompile, "_compile", lambda *a, **k: calls.append(a) or True)
    gate = moelab.SoftmaxGate(torch.zeros(160, 3, 3, dtype=torch.float64), torch.zeros(160, 3, dtype=torch.float64))
    assert autocompile.pass_mode(FitOptions(3), gate, 160, 6000, "cpu") == (False, False) and not calls
    assert autocompile.pass_mode(FitOptions(3, accelerate=None), gate, 160, 6000, "cpu") == (False, False) and not calls
    assert autocompile.pass_mode(FitOptions(3, accelerate=None), gate, 160, 53940, "cpu") == (False, False) and not calls
    one = moelab.SoftmaxGate(torch.zeros(160, 3, 1, dtype=torch.float64), torch.zeros(160, 3, dtype=torch.float64))
    assert autocompile.pass_mode(FitOptions(3, accelerate=None), one, 160, 6000, "cpu") == (True, True) and calls


def test_successful_compile_writes_the_marker(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    monkeypatch.setattr(_fused, "available", lambda *a, **k: True)
    misses = iter([0, 4])  # the (fake) compile missed Inductor's FX-graph cache: a cold compile
    monkeypatch.setattr(autocompile, "_fx_graph_cache_misses", lambda: next(misses))
    assert autocompile.prepare_compiled(2, 1)
    rec = json.loads(autocompile.marker_path(2, 1).read_text())
    assert rec["K"] == 2 and rec["d"] == 1 and "cold_seconds" in rec
