"""Model files with categorical inputs (issue 15 items 4 + 5): model.json stores the estimator's
DesignEncoding, and ``load`` / ``moelab predict`` code raw new columns with it."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from moelab import MixtureOfExpertsRegressor, ModelFileError, load_dataset
from moelab.cli import main
from moelab.encoding import DesignEncoding
from moelab.persistence import encode_inputs, read_model_file

FAST = ["--n-init", "4", "--n-candidates", "20", "--max-iter", "300"]
EST = dict(n_init=4, n_candidates=20, max_iter=300, random_state=0)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 rows of the bundled diamonds (carat, cut, price) plus a bool and a small-integer column, as a CSV."""
    rng = np.random.default_rng(1)
    df = load_dataset("diamonds").sample(300, random_state=0)[["carat", "cut", "price"]].reset_index(drop=True)
    df["heavy"] = df["carat"] > 0.7
    df["batch"] = rng.integers(1, 4, size=len(df))
    path = tmp_path_factory.mktemp("data") / "diamonds300.csv"
    df.to_csv(path, index=False)
    return path, pd.read_csv(path)


@pytest.fixture(scope="module")
def cli_fit(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    assert main(["fit", str(data[0]), "--x", "carat,cut", "--y", "price", "--experts", "2", *FAST,
                 "--out", str(out), "--format", "json"]) == 0
    return out / "model.json"


def test_model_json_stores_the_estimators_encoding(cli_fit, data):
    df = data[1]
    doc = json.loads(cli_fit.read_text())
    assert doc["format_version"] == 2
    inputs = doc["inputs"]
    assert inputs["columns"] == ["carat", "cut"]
    assert inputs["features"] == ["carat", "cut[Good]", "cut[Ideal]", "cut[Premium]", "cut[Very Good]"]
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(df[["carat", "cut"]], df["price"]))
    assert inputs["encoding"] == est.encoding_.to_dict()
    assert inputs["encoding"]["columns"][1] == {"name": "cut", "kind": "categorical",
                                                "levels": ["Fair", "Good", "Ideal", "Premium", "Very Good"]}
    assert np.array(doc["params"]["experts"]["slope"]).shape == (2, 5)


def test_cli_predict_equals_the_python_estimator(cli_fit, data, tmp_path, capsys):
    path, df = data
    out = tmp_path / "preds.csv"
    assert main(["predict", str(cli_fit), str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    pred = pd.read_csv(out)
    X = df[["carat", "cut"]]
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(X, df["price"]))
    np.testing.assert_allclose(pred["mean"], est.predict(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pred["sd"], np.sqrt(est.predict_variance(X)), rtol=1e-12)
    np.testing.assert_allclose(pred[["gate_1", "gate_2"]], est.predict_proba(X), rtol=1e-12, atol=1e-15)
    back = MixtureOfExpertsRegressor.load(cli_fit)
    np.testing.assert_allclose(back.predict(X), est.predict(X), rtol=1e-12, atol=1e-12)
    # the raw columns in any order, with others, in a table without the response
    mf = read_model_file(cli_fit)
    np.testing.assert_array_equal(encode_inputs(df[["price", "cut", "carat"]], mf),
                                  est.encoding_.transform(X).to_numpy())


def test_cli_predict_unseen_level_names_the_file_row(cli_fit, data, tmp_path, capsys):
    df = data[1].copy()
    df.loc[3, "cut"] = "Superb"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    assert main(["predict", str(cli_fit), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("moelab predict: error: " + str(bad) + ": column 'cut' has level(s) the model was not fitted on: "
            "row 4: 'Superb' (data rows counted from 1 after the header); the model knows 'Fair', 'Good', 'Ideal', "
            "'Premium', 'Very Good'") == err
    (tmp_path / "nocut.csv").write_text("carat\n0.5\n")
    assert main(["predict", str(cli_fit), str(tmp_path / "nocut.csv")]) == 2
    assert "no column(s) 'cut' that the model was fitted on; available columns: carat" in capsys.readouterr().err


def test_bool_and_declared_categorical_numeric_columns_round_trip(data, tmp_path, capsys):
    path, df = data
    out = tmp_path / "fit"
    assert main(["fit", str(path), "--x", "carat,heavy,batch", "--categorical", "batch", "--y", "price",
                 "--experts", "2", *FAST, "--out", str(out), "--format", "json"]) == 0
    capsys.readouterr()
    doc = json.loads((out / "model.json").read_text())
    assert doc["inputs"]["encoding"]["columns"][1:] == [
        {"name": "heavy", "kind": "categorical", "levels": [False, True]},
        {"name": "batch", "kind": "categorical", "levels": [1, 2, 3]}]
    assert doc["inputs"]["features"] == ["carat", "heavy[True]", "batch[2]", "batch[3]"]
    X = df[["carat", "heavy", "batch"]].astype({"batch": "category"})
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(X, df["price"]))
    assert main(["predict", str(out / "model.json"), str(path), "--out", str(tmp_path / "p.csv")]) == 0
    capsys.readouterr()
    pred = pd.read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose(pred["mean"], est.predict(X), rtol=1e-12, atol=1e-12)
    # new data read from a file: plain int64 / bool columns, coded by the saved levels
    back = MixtureOfExpertsRegressor.load(out / "model.json")
    np.testing.assert_allclose(back.predict(df[["carat", "heavy", "batch"]]), est.predict(X), rtol=1e-12, atol=1e-12)
    new = df.head(3).assign(batch=[1, 4, 2])
    new.to_csv(tmp_path / "b4.csv", index=False)
    assert main(["predict", str(out / "model.json"), str(tmp_path / "b4.csv")]) == 2
    assert "column 'batch' has level(s) the model was not fitted on: row 2: 4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_categorical(data, tmp_path_factory):
    df = data[1]
    X = pd.DataFrame({"carat": df["carat"], "cut": pd.Categorical(df["cut"], ["Fair", "Good", "Very Good", "Premium",
                                                                           "Ideal"], ordered=True),
                      "heavy": df["heavy"]})
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(X, df["price"]))
    path = est.save(tmp_path_factory.mktemp("model") / "model.json", response_name="price")
    return est, X, df["price"], path, json.loads(path.read_text())


def test_estimator_save_load_round_trip_with_a_categorical_column(saved_categorical):
    est, X, y, path, doc = saved_categorical
    assert doc["inputs"]["columns"] == ["carat", "cut", "heavy"]
    assert doc["inputs"]["encoding"]["columns"][1]["levels"] == ["Fair", "Good", "Very Good", "Premium", "Ideal"]
    back = MixtureOfExpertsRegressor.load(path)
    assert back.encoding_ == est.encoding_
    assert list(back.feature_names_in_) == list(est.feature_names_in_) == [
        "carat", "cut[Good]", "cut[Very Good]", "cut[Premium]", "cut[Ideal]", "heavy[True]"]
    new = X.sample(40, random_state=0)
    for method in ("predict", "predict_variance", "predict_proba"):
        np.testing.assert_allclose(getattr(back, method)(new), getattr(est, method)(new), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(back.predict_interval(new, 0.8), est.predict_interval(new, 0.8), rtol=1e-12)
    np.testing.assert_allclose(back.score_samples(X, y), est.score_samples(X, y), rtol=1e-12)
    # plain text and bool columns (as read from a file) code the same as the declared categories
    plain = new.astype({"cut": str})
    np.testing.assert_array_equal(back.predict(plain), est.predict(new))
    plain.loc[plain.index[2], "cut"] = "Superb"
    with pytest.raises(ValueError, match=rf"column 'cut' has level\(s\) the model was not fitted on: index "
                                         rf"{plain.index[2]}: 'Superb'; the model knows 'Fair', 'Good', 'Very Good'"):
        back.predict(plain)
    with pytest.raises(ValueError, match="feature_names .* differ from the design columns of the estimator's encoding"):
        est.save(path.parent / "renamed.json", feature_names=[f"f{j}" for j in range(6)])


def _edited(tmp_path, doc, fn):
    doc = json.loads(json.dumps(doc))
    fn(doc["inputs"])
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def _levels(inputs, levels):
    inputs["encoding"]["columns"][1]["levels"] = levels


ENCODING_EDITS = [
    (lambda i: i.pop("encoding"), r"missing key 'inputs.encoding'"),
    (lambda i: i.update(encoding=[1, 2]), r"inputs.encoding: an encoding must be a dict with a non-empty 'columns'"),
    (lambda i: i.update(encoding={"columns": []}), r"inputs.encoding: an encoding must be a dict"),
    (lambda i: _levels(i, ["Fair"]), r"inputs.encoding: encoding column 'cut' needs 'levels': a list of at least 2"),
    (lambda i: _levels(i, ["Fair", "Good", "Good", "Premium", "Ideal"]), r"inputs.encoding: encoding column 'cut'"),
    (lambda i: _levels(i, ["Fair", "Good", "Very Good", "Premium", None]), r"inputs.encoding: encoding column 'cut'"),
    (lambda i: i["encoding"]["columns"][0].update(kind="ordinal"), r"inputs.encoding: encoding column 0 must be"),
    (lambda i: i["encoding"]["columns"][2].update(name="cut"), r"inputs.encoding: encoding names column\(s\) 'cut' more than once"),
    (lambda i: _levels(i, ["Good", "Fair", "Very Good", "Premium", "Ideal"]),
     r"inputs.features .* do not follow from inputs.encoding \(expected \['carat', 'cut\[Fair\]'"),
    (lambda i: i.update(columns=["carat", "colour", "heavy"]), r"inputs.columns .* disagree with the columns of "
                                                              r"inputs.encoding \['carat', 'cut', 'heavy'\]"),
    (lambda i: i.update(encoding=None), r"inputs.features .* must equal inputs.columns .* when inputs.encoding is null"),
    (lambda i: i.update(feature_names_in=False), r"inputs.feature_names_in must be true when inputs.encoding"),
]


@pytest.mark.parametrize("edit,message", ENCODING_EDITS, ids=[m[:40] for _, m in ENCODING_EDITS])
def test_edited_encoding_gives_a_model_file_error(saved_categorical, tmp_path, edit, message):
    path = _edited(tmp_path, saved_categorical[4], edit)
    with pytest.raises(ModelFileError, match=message) as info:
        MixtureOfExpertsRegressor.load(path)
    assert str(path) in str(info.value)


def test_format_version_1_numeric_files_are_still_read(tmp_path):
    df = load_dataset("mcycle")
    est = _quiet(lambda: MixtureOfExpertsRegressor(2, **EST).fit(df[["times"]], df["accel"]))
    doc = json.loads(est.save(tmp_path / "m.json").read_text())
    assert doc["inputs"]["encoding"] is None and doc["inputs"]["columns"] == doc["inputs"]["features"] == ["times"]
    inputs = doc["inputs"]
    del inputs["encoding"]
    doc.update(format_version=1, inputs={**inputs, "encodings": {}})
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(doc))
    back = MixtureOfExpertsRegressor.load(v1)
    assert back.encoding_ is None
    np.testing.assert_array_equal(back.predict(df[["times"]]), est.predict(df[["times"]]))
    doc["inputs"]["encodings"] = {"times": {"kind": "one-hot", "levels": ["a", "b"], "dropped": "a"}}
    v1.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="inputs.encodings of format version 1 must be empty"):
        read_model_file(v1)
    assert DesignEncoding.from_dict({"columns": [{"name": "times", "kind": "numeric"}]}).feature_names == ["times"]
