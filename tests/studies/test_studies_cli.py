import pandas as pd

from moelab.studies.cli import main


def test_cli_run_and_bad_study(tiny_toml, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_toml.read_text().replace("replicates = 3", "replicates = 0"))
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "study.replicates: must be >= 1" in err
    assert not (tmp_path / "o").exists()  # rejected before anything is written
    small = tmp_path / "small.toml"
    small.write_text(tiny_toml.read_text().replace("replicates = 3", "replicates = 2").replace("n = [80, 160]", "n = [60, 120]"))
    assert main(["run", str(small), "--out", str(tmp_path / "o"), "--no-progress", "--shard", "0/1"]) == 0
    assert "loss_D1" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "o" / "results.csv")) == 8


def test_run_missing_or_directory_study_is_a_user_error(tmp_path, capsys):
    from moelab.cli import main

    assert main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o1")]) == 2
    assert "no such study file" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "is a directory" in capsys.readouterr().err
