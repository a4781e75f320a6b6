"""--scheduler values and the optional extra (issue 13); no cluster is started here."""

import sys

import pytest

from moelab.studies import StudyError
from moelab.studies.cli import main
from moelab.studies.cluster import MISSING_EXTRA, dask_client, parse_scheduler


def test_parse_scheduler_forms(tmp_path):
    assert parse_scheduler("local:4") == ("local", 4)
    assert parse_scheduler("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    f = tmp_path / "sched.json"
    f.write_text("{}")
    assert parse_scheduler(str(f)) == ("file", f)
    for bad, msg in [("local:0", "N >= 1"), ("local:two", "N >= 1"), ("tcp://host", "tcp://HOST:PORT"),
                     ("dask", "expected auto, serial, local:N"), (str(tmp_path / "none.json"), "no such scheduler file")]:
        with pytest.raises(StudyError, match=msg):
            parse_scheduler(bad)


def test_missing_extra_is_named(tiny_toml, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(StudyError) as exc:
        with dask_client("local:2"):
            pass
    assert str(exc.value) == MISSING_EXTRA and 'pip install "moelab[dask]"' in MISSING_EXTRA
    assert main(["run", str(tiny_toml), "--out", str(tmp_path / "o"), "--scheduler", "local:2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moelab run: error: {MISSING_EXTRA}"
    assert not (tmp_path / "o" / "results.csv").exists()


def test_bad_scheduler_and_threads_on_the_command_line(tiny_toml, tmp_path, capsys):
    assert main(["run", str(tiny_toml), "--out", str(tmp_path / "o"), "--scheduler", "local:0"]) == 2
    assert "expected local:N with N >= 1" in capsys.readouterr().err
    assert main(["run", str(tiny_toml), "--out", str(tmp_path / "o"), "--scheduler", "dask"]) == 2
    assert "expected auto, serial, local:N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(tiny_toml), "--out", str(tmp_path / "o"), "--scheduler", "local:1", "--torch-threads", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_no_scheduler_at_the_address_is_a_clear_error(tmp_path):
    pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(StudyError, match="no Dask scheduler answered"):
            with dask_client("tcp://127.0.0.1:9"):  # the discard port: nobody listens
                pass


def test_auto_scheduler_uses_the_cores_only_for_long_runs(monkeypatch):
    from moelab.studies import cluster

    monkeypatch.setattr(cluster, "usable_cores", lambda: 4)
    assert cluster.resolve_scheduler("serial", 1e6) is None
    assert cluster.resolve_scheduler("local:3", 0.0) == "local:3"  # explicit: as given
    assert cluster.resolve_scheduler("auto", cluster.AUTO_MIN_S / 2) is None  # short: serial
    if cluster.resolve_scheduler("auto", 1e6) is not None:  # dask installed
        assert cluster.resolve_scheduler(None, 1e6) == "local:4"
    monkeypatch.setattr(cluster, "usable_cores", lambda: 1)
    assert cluster.resolve_scheduler("auto", 1e6) is None  # one core: nothing to gain
    monkeypatch.setattr(cluster, "usable_cores", lambda: 4)
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed: serial, no error
    assert cluster.resolve_scheduler("auto", 1e6) is None


def test_predicted_work_scales_with_the_batches(tiny_toml, tmp_path):
    from moelab.studies import load_study
    from moelab.studies.runner import batch_work, plan_work

    study = load_study(tiny_toml)
    w = plan_work([(study, tmp_path / "o")])
    fits = study.fits
    assert w == pytest.approx(sum(batch_work(f, n, study.replicates) for f in fits for n in study.grid(f)))
    assert batch_work(fits[1], 1000, 4) == pytest.approx(2 * batch_work(fits[1], 500, 4))
    assert batch_work(fits[1], 1000, 4) > batch_work(fits[0], 1000, 4)  # K = 3 against K = 2
