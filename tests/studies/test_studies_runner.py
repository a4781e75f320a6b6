import pandas as pd
import pytest

from moelab.studies import StudyError, load_study, merge_results, run_study
from moelab.studies import runner as runner_mod
from moelab.studies.report import RATE_COLUMNS
from moelab.studies.runner import read_results

KEY = ["setting", "n", "replicate"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from conftest import TINY

    d = tmp_path_factory.mktemp("full")
    (d / "tiny.toml").write_text(TINY)
    study = load_study(d / "tiny.toml")
    res = run_study(study, d / "out", progress=False)
    return study, d / "out", res


def test_full_run_writes_everything(full_run):
    study, out, res = full_run
    assert len(res) == 2 * 2 * 3  # settings x n x replicates
    assert set(res["status"]) <= {"ok", "not_converged", "degenerate"}
    rates = pd.read_csv(out / "rates.csv")
    assert list(rates.columns) == list(RATE_COLUMNS)
    assert {"loss_D1", "loss_D2", "hellinger", "tv", "err_gate_slope", "err_variance"} <= set(rates["quantity"])
    assert (rates["replicates"] == 3).all() and (rates["n_min"] == 80).all() and (rates["n_max"] == 160).all()
    assert (out / "rates-exact.png").stat().st_size > 1000 and (out / "rates-over.png").exists()
    assert len(pd.read_parquet(out / "results.parquet")) == 12
    exact = res[res.setting == "exact"]
    assert (exact["loss_name"] == "D1").all() and (res[res.setting == "over"]["loss_name"] == "D2").all()
    assert (exact["loss"] < 5).all() and (exact["hellinger"] < 0.3).all()


def test_resume_after_interruption(full_run, tmp_path):
    study, out_full, res_full = full_run
    out = tmp_path / "out"
    part = run_study(study, out, progress=False, max_batches=2)  # "interrupted" after 2 batches
    assert len(part) == 6 and not (out / "rates.csv").exists()
    first = (out / "results.csv").read_text()
    with open(out / "results.csv", "a") as fh:  # a half-written line from a kill mid-write
        fh.write("tiny,exact,softmax,2,em,truth-perturbed,D1,160,0,o")
    res = run_study(study, out, progress=False)
    assert (out / "results.csv").read_text().startswith(first)  # finished fits kept, not redone
    assert len(res) == 12 and not res.duplicated(KEY).any()
    a = res.sort_values(KEY).reset_index(drop=True)
    b = res_full.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-6)


def test_out_dir_of_other_study_is_refused(full_run, tmp_path):
    study, out, _ = full_run
    study2 = load_study(out.parent / "tiny.toml", quick=False)
    study2.seed = 99
    with pytest.raises(StudyError, match="different study"):
        run_study(study2, out, progress=False)


def test_shards_merge_to_full_run(full_run, tmp_path):
    study, _, res_full = full_run
    for i in range(2):
        run_study(study, tmp_path / f"s{i}", shard=(i, 2), progress=False)
    assert (tmp_path / "s0" / "results-shard-0-of-2.csv").exists()
    merged = merge_results([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert len(merged) == 12
    a = merged.sort_values(KEY).reset_index(drop=True)
    b = res_full.sort_values(KEY).reset_index(drop=True)
    assert (a[KEY].to_numpy() == b[KEY].to_numpy()).all()
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-4)
    assert (tmp_path / "merged" / "rates.csv").exists()
    with pytest.raises(StudyError, match="--shard"):
        run_study(study, tmp_path / "bad", shard=(2, 2), progress=False)


def test_failed_fits_are_recorded_and_counted(full_run, tmp_path, monkeypatch):
    study, _, _ = full_run

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(runner_mod, "fit_em", boom)
    res = run_study(study, tmp_path / "out", progress=False)
    assert len(res) == 12 and (res["status"] == "failed").all()
    assert res["error"].str.contains("simulated failure").all()
    rates = pd.read_csv(tmp_path / "out" / "rates.csv")
    assert rates.empty or (rates["n_failed"] == 6).all()
    assert len(read_results(tmp_path / "out" / "results.csv")) == 12


def test_study_compiles_once_when_its_total_work_pays_for_it(tmp_path, monkeypatch):
    """The runner sums each setting's EM work; above fit_em's cold-compile threshold it compiles the fused
    kernels up front, so mid-size batches take the fused pass; losses equal the all-eager run (issue 11)."""
    import tomllib

    from conftest import TINY

    from moelab import _fused
    from moelab import autocompile
    from moelab.studies import parse_study

    d = tomllib.loads(TINY)
    d["study"]["n"] = [2000]
    d["fit"] = d["fit"][:1]
    monkeypatch.setattr(_fused, "kernels", _fused.KernelCache())
    eager = run_study(parse_study(d), tmp_path / "eager", progress=False)  # below the threshold: nothing compiled
    assert not _fused.kernels.is_ready(_fused.kernel_key(2, 1, "torch.float64", "cpu"))
    monkeypatch.setattr(autocompile, "compile_cost", lambda *a, **k: 0.0)
    warm = run_study(parse_study(d), tmp_path / "warm", progress=False)
    assert _fused.kernels.is_ready(_fused.kernel_key(2, 1, "torch.float64", "cpu"))
    for col in ("loglik", "loss_D1", "hellinger"):
        assert warm[col].to_numpy() == pytest.approx(eager[col].to_numpy(), rel=1e-9)
