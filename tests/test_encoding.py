"""Categorical inputs (issue 15 item 5): one-hot encoding shared by the CLI and the estimator, and the errors
for unseen levels, non-numbers (with their rows) and European (semicolon) CSV files."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from moelab import MixtureOfExpertsRegressor
from moelab.cli import main
from moelab.datasets import csv_dialect, read_table
from moelab.encoding import DesignEncoding, encoding_for

FAST = ["--n-init", "10", "--n-candidates", "20", "--max-iter", "300"]
EST = dict(n_init=10, n_candidates=20, max_iter=300, random_state=0)


@pytest.fixture(scope="module")
def table():
    """300 rows: age (numeric), occupation (text, 3 levels), smoker (bool); y piecewise in age, shifted by level."""
    rng = np.random.default_rng(0)
    n = 300
    occ = rng.choice(["tech", "clerk", "sales"], size=n)
    smoker = rng.uniform(size=n) < 0.4
    age = rng.uniform(20, 60, size=n)
    shift = pd.Series(occ).map({"clerk": 0.0, "sales": 3.0, "tech": -2.0}).to_numpy()
    y = np.where(age > 40, 0.2 * age, 10 - 0.1 * age) + shift + 1.5 * smoker + rng.normal(size=n)
    return pd.DataFrame({"age": age, "occupation": occ, "smoker": smoker, "income": y})


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def test_encoding_names_levels_and_dummies(table):
    enc = DesignEncoding.from_frame(table[["age", "occupation", "smoker"]])
    assert enc.feature_names == ["age", "occupation[sales]", "occupation[tech]", "smoker[True]"]
    assert [c.reference for c in enc.columns] == [None, "clerk", False]  # sorted levels, first dropped
    D = enc.transform(table[["age", "occupation", "smoker"]])
    np.testing.assert_array_equal(D["occupation[sales]"], (table.occupation == "sales").astype(float))
    np.testing.assert_array_equal(D["smoker[True]"], table.smoker.astype(float))
    np.testing.assert_array_equal(D["age"], table.age)
    # declared categorical order is kept (unused declared levels dropped)
    cat = table.occupation.astype(pd.CategoricalDtype(["tech", "sales", "clerk", "pilot"], ordered=True))
    enc2 = DesignEncoding.from_frame(pd.DataFrame({"occupation": cat}))
    assert enc2.feature_names == ["occupation[sales]", "occupation[clerk]"]
    # numeric frames need no encoding (the estimator then behaves as before)
    assert encoding_for(table[["age"]]) is None and encoding_for(table[["age"]].to_numpy()) is None


def test_encoding_round_trips_through_json(table):
    enc = DesignEncoding.from_frame(table[["age", "occupation", "smoker"]].assign(
        region=pd.Categorical(np.arange(300) % 3 + 1)))
    d = json.loads(json.dumps(enc.to_dict()))
    assert d["columns"][3] == {"name": "region", "kind": "categorical", "levels": [1, 2, 3]}
    assert DesignEncoding.from_dict(d) == enc
    for bad in ({}, {"columns": [{"name": "a"}]}, {"columns": [{"name": "a", "kind": "categorical", "levels": ["x"]}]}):
        with pytest.raises(ValueError, match="encoding"):
            DesignEncoding.from_dict(bad)


def test_cli_and_python_give_the_same_fit_to_every_digit(table, tmp_path, capsys):
    path = tmp_path / "people.csv"
    table.to_csv(path, index=False)
    assert main(["fit", str(path), "--x", "age,occupation,smoker", "--y", "income", "--experts", "2", *FAST,
                 "--format", "json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["x"] == ["age", "occupation[sales]", "occupation[tech]", "smoker[True]"]
    df = pd.read_csv(path)
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(df[["age", "occupation", "smoker"]], df["income"]))
    assert r["loglik"] == est.loglik_
    assert r["params"]["experts"]["slope"] == est.expert_slope_.tolist()
    assert r["params"]["gate"]["slope"] == est.gate_slope_.tolist()
    assert list(est.feature_names_in_) == r["x"]
    # the categorical fit matches a fit on the dummies computed by hand
    D = pd.DataFrame({"age": df.age, "occupation[sales]": (df.occupation == "sales") * 1.0,
                      "occupation[tech]": (df.occupation == "tech") * 1.0, "smoker[True]": df.smoker * 1.0})
    ref = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(D, df["income"]))
    assert ref.loglik_ == est.loglik_
    np.testing.assert_array_equal(est.predict(df[["age", "occupation", "smoker"]]), ref.predict(D))


def test_unseen_level_at_predict_time_is_an_error(table):
    X = table[["age", "occupation"]]
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(X, table["income"]))
    new = X.head(4).copy()
    new.loc[2, "occupation"] = "pilot"
    with pytest.raises(ValueError, match=r"column 'occupation' has level\(s\) the model was not fitted on: index 2: "
                                         r"'pilot'; the model knows 'clerk', 'sales', 'tech'"):
        est.predict(new)
    with pytest.raises(ValueError, match="must be a pandas DataFrame with columns age, occupation"):
        est.predict(X.to_numpy())
    with pytest.raises(ValueError, match="missing: occupation"):
        est.predict(X[["age"]])
    assert est.predict(X.head(4)[["occupation", "age"]]).shape == (4,)  # column order does not matter


def test_non_numbers_are_reported_with_row_and_value(table, tmp_path, capsys):
    df = table.copy()
    df["age"] = df["age"].map("{:.3f}".format)
    df.loc[16, "age"] = "abc"  # data row 17 of the file (line 18, the header being line 1)
    path = tmp_path / "typo.csv"
    df.to_csv(path, index=False)
    assert path.read_text().splitlines()[17].startswith("abc,")
    assert main(["fit", str(path), "--x", "age,occupation", "--y", "income", "--experts", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab fit: error: column 'age' is numeric but 1 value is not a number: row 17: 'abc' "
                          "(data rows counted from 1 after the header)") and err.count("\n") == 1
    assert "--categorical age" in err
    # Python names the DataFrame's index label
    with pytest.raises(ValueError, match=r"column 'age' is numeric but 1 value is not a number: index 16: 'abc'"):
        MixtureOfExpertsRegressor(2, **EST).fit(df[["age", "occupation"]], df["income"])
    # the response too
    df2 = table.copy().astype({"income": object})
    df2.loc[3, "income"] = "n/a?"
    with pytest.raises(ValueError, match=r"column 'income' is numeric but 1 value is not a number: index 3: 'n/a\?'"):
        MixtureOfExpertsRegressor(2, **EST).fit(df2[["age"]], df2["income"])


def test_semicolon_csv_with_decimal_commas_is_read(table, tmp_path, capsys):
    comma, semi = tmp_path / "c.csv", tmp_path / "eu.csv"
    table.to_csv(comma, index=False)
    table.to_csv(semi, index=False, sep=";", decimal=",")
    assert "," in semi.read_text().splitlines()[1]  # e.g. 41,3...;tech;False;5,1...
    assert csv_dialect(semi) == {"sep": ";", "decimal": ","} and csv_dialect(comma) == {}
    pd.testing.assert_frame_equal(read_table(str(semi)), read_table(str(comma)))
    fits = []
    for p in (comma, semi):
        assert main(["fit", str(p), "--x", "age,occupation", "--y", "income", "--experts", "2", *FAST, "--format", "json"]) == 0
        fits.append(json.loads(capsys.readouterr().out))
    assert fits[0]["loglik"] == fits[1]["loglik"] and fits[0]["params"] == fits[1]["params"]
    # a comma CSV holding quoted decimal commas: the error says so
    bad = tmp_path / "quoted.csv"
    bad.write_text("x,y\n" + "".join(f'"{i},5",{i}\n' for i in range(30)))
    assert main(["fit", str(bad), "--x", "x", "--y", "y", "--experts", "1"]) == 2
    assert "decimal comma" in capsys.readouterr().err


def test_categorical_errors_and_forcing(table, tmp_path, capsys):
    path = tmp_path / "t.csv"
    df = table.assign(const="a", region=np.arange(300) % 3 + 1)
    df.loc[[5, 9], "occupation"] = np.nan
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--x", "age,const", "--y", "income", "--experts", "1"]) == 2
    assert "categorical column 'const' has a single level 'a'; drop it" in capsys.readouterr().err
    assert main(["fit", str(path), "--x", "age,occupation", "--y", "income", "--experts", "1"]) == 2
    assert "categorical column 'occupation' has 2 missing value(s) (row 6, row 10" in capsys.readouterr().err
    assert main(["fit", str(path), "--x", "age", "--categorical", "region", "--y", "income", "--experts", "1"]) == 2
    assert "--categorical region must be among the --x columns (age)" in capsys.readouterr().err
    assert main(["fit", str(path), "--x", "age,region", "--categorical", "region", "--y", "income", "--experts", "1",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["x"] == ["age", "region[2]", "region[3]"]
