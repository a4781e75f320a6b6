"""JSON model files: save / load round trips and clear errors for edited files (issue 15 item 4)."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import moelab
from moelab import MixtureOfExpertsRegressor, ModelFileError, load_dataset
from moelab.persistence import FORMAT_VERSION, encode_inputs, read_model_file

FAST = dict(n_init=2, n_candidates=8, max_iter=200, random_state=0)


@pytest.fixture(scope="module")
def mcycle():
    df = load_dataset("mcycle")
    return df[["times"]], df["accel"]


def _fit(X, y, K=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MixtureOfExpertsRegressor(K, **{**FAST, **kw}).fit(X, y)


@pytest.fixture(scope="module")
def saved(mcycle, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.json"
    est = _fit(*mcycle)
    est.save(path, response_name="accel")
    return est, path, json.loads(path.read_text())


GATES = [dict(), dict(gate="temperature", temperature=0.5), dict(gate="temperature", learn_temperature=True),
         dict(gate="activation", activation="tanh", learn_temperature=True), dict(gate="activation", activation="sigmoid"),
         dict(gate="topk", top_k=1)]


@pytest.mark.parametrize("kw", GATES, ids=lambda kw: "-".join(map(str, kw.values())) or "softmax")
def test_round_trip_predicts_identically(mcycle, tmp_path, kw):
    X, y = mcycle
    est = _fit(X, y, **kw)
    path = est.save(tmp_path / "m.json")
    back = MixtureOfExpertsRegressor.load(path)
    Xnew = pd.DataFrame({"times": np.linspace(0, 70, 57)})  # beyond the training range too
    for method in ("predict", "predict_variance", "predict_proba"):
        np.testing.assert_allclose(getattr(back, method)(Xnew), getattr(est, method)(Xnew), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back.predict_interval(Xnew, 0.8), est.predict_interval(Xnew, 0.8), rtol=1e-12)
    np.testing.assert_allclose(back.score_samples(X, y), est.score_samples(X, y), rtol=1e-12)
    assert back.get_params() == est.get_params()
    assert back.loglik_ == est.loglik_ and back.converged_ == est.converged_ and back.n_iter_ == est.n_iter_
    np.testing.assert_array_equal(back.expert_size_, est.expert_size_)
    assert back.n_free_parameters() == est.n_free_parameters()
    assert back.model_.gate.describe() == est.model_.gate.describe()


def test_numpy_fit_round_trip_has_no_feature_names(tmp_path, mcycle):
    X, y = mcycle
    est = _fit(X.to_numpy(), y.to_numpy(), K=2)
    back = MixtureOfExpertsRegressor.load(est.save(tmp_path / "m.json"))
    assert not hasattr(back, "feature_names_in_")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "X does not have valid feature names" warning
        np.testing.assert_array_equal(back.predict(X.to_numpy()), est.predict(X.to_numpy()))


def test_file_contents(saved):
    est, _, doc = saved
    assert doc["format"] == "moelab-model" and doc["format_version"] == FORMAT_VERSION
    assert doc["moelab_version"] == moelab.__version__
    assert doc["gate"]["family"] == "softmax" and doc["response"] == "accel"
    assert doc["inputs"]["features"] == doc["inputs"]["columns"] == ["times"] and doc["inputs"]["encoding"] is None
    assert np.array(doc["params"]["gate"]["slope"]).shape == (3, 1)
    np.testing.assert_array_equal(doc["params"]["experts"]["variance"], est.expert_variance_)  # exact floats


def test_loaded_estimator_can_be_refit(saved, mcycle):
    back = MixtureOfExpertsRegressor.load(saved[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back.fit(*mcycle)
    assert back.loglik_ == pytest.approx(saved[0].loglik_, rel=1e-10)  # same settings and seed


def _edit(tmp_path, doc, fn):
    doc = json.loads(json.dumps(doc))
    fn(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def _del(keys):
    def fn(doc):
        d = doc
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return fn


def _set(keys, value):
    def fn(doc):
        d = doc
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return fn


EDITS = [
    (_set(["format_version"], 3), r"model format version 3 .*reads format versions 1, 2"),
    (_set(["format_version"], True), r"model format version True"),
    (_set(["format"], "something"), r"is not a moelab model file \(format 'something'"),
    (_del(["params", "experts", "slope"]), r"missing key 'params.experts.slope'"),
    (_del(["gate"]), r"missing key 'gate'"),
    (_set(["params", "gate", "slope"], [[1.0], [2.0]]), r"params.gate.slope has shape \(2, 1\), expected \(3, 1\)"),
    (_set(["params", "experts", "intercept"], [1.0, [2.0], 3.0]), r"params.experts.intercept holds \[2.0\] at position \(1,\)"),
    (_set(["params", "experts", "slope"], [[1.0], [2.0, 3.0], [4.0]]), r"params.experts.slope has shape \(3,\), expected \(3, 1\)"),
    (_set(["params", "experts", "intercept"], [1.0, None, 3.0]), r"holds null at position \(1,\)"),
    (_set(["params", "experts", "intercept"], [1.0, "2", 3.0]), r'holds "2" at position'),
    (_set(["params", "experts", "intercept"], [1.0, True, 3.0]), r"holds true at position"),
    (_set(["params", "experts", "variance"], [1.0, -2.0, 3.0]), r"variance must be > 0"),
    (_set(["n_experts"], "3"), r'n_experts must be an integer, got "3"'),
    (_set(["gate", "family"], "nope"), r"gate family 'nope' is not registered"),
    (_set(["gate", "options"], {"top_k": 2}), r"gate.options: gate 'softmax' does not take top_k"),
    (_set(["inputs", "features"], ["a", "b"]), r"inputs.features has 2 names but n_features is 1"),
    (_set(["params", "gate", "temperature"], "hot"), r"params.gate.temperature must be a finite number"),
    (_set(["estimator", "colour"], 1), r"estimator has unknown setting\(s\) colour"),
    (_set(["inputs", "encoding"], {"columns": [{"name": "times", "kind": "categorical"}]}),
     r"inputs.encoding: encoding column 'times' needs 'levels'"),
    (_set(["inputs", "columns"], ["t"]), r"inputs.features \['times'\] must equal inputs.columns \['t'\]"),
]


@pytest.mark.parametrize("edit,message", EDITS, ids=[m[:30] for _, m in EDITS])
def test_edited_file_gives_a_clear_error(saved, tmp_path, edit, message):
    path = _edit(tmp_path, saved[2], edit)
    with pytest.raises(ModelFileError, match=message) as info:
        MixtureOfExpertsRegressor.load(path)
    assert str(path) in str(info.value)  # the message names the file
    assert isinstance(info.value, ValueError)


def test_nan_literal_is_refused(saved, tmp_path):
    text = saved[1].read_text().replace(str(saved[2]["params"]["experts"]["intercept"][0]), "NaN", 1)
    path = tmp_path / "nan.json"
    path.write_text(text)
    with pytest.raises(ModelFileError, match="NaN is not valid JSON"):
        read_model_file(path)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelFileError, match="is not a valid JSON model file"):
        read_model_file(bad)
    with pytest.raises(ModelFileError, match="no such model file"):
        read_model_file(tmp_path / "absent.json")
    arr = tmp_path / "list.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="expected an object"):
        read_model_file(arr)


def test_params_json_points_to_model_json(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"moelab": "fit", "loglik": 1.0}))
    with pytest.raises(ModelFileError, match="that is moelab fit's params.json; load DIR/model.json"):
        read_model_file(p)


def test_save_errors(tmp_path, mcycle):
    with pytest.raises(ValueError, match="not fitted"):
        MixtureOfExpertsRegressor(2).save(tmp_path / "m.json")
    import torch

    def my_act(t):
        return torch.tanh(t)

    est = _fit(*mcycle, K=2, gate="activation", activation=my_act)
    with pytest.raises(ValueError, match="a callable activation cannot be saved"):
        est.save(tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_encode_inputs_errors(saved):
    mf = read_model_file(saved[1])
    with pytest.raises(ValueError, match=r"no column\(s\) 'times' that the model was fitted on; available columns: t"):
        encode_inputs(pd.DataFrame({"t": [1.0]}), mf)
    with pytest.raises(ValueError, match=r"column 'times' is numeric but 1 value is not a number: row 2: 'abc' "
                                         r"\(data rows counted from 1 after the header\); fix or remove those rows\.$"):
        encode_inputs(pd.DataFrame({"times": ["1.5", "abc"]}), mf, rows="file")
    with pytest.raises(ValueError, match=r"1 missing or infinite value\(s\) \(first in data row 3\)"):
        encode_inputs(pd.DataFrame({"times": [1.0, 2.0, np.nan]}), mf, rows="file")
    with pytest.raises(ValueError, match=r"1 missing or infinite value\(s\) \(first in index 'c'\)"):
        encode_inputs(pd.DataFrame({"times": [1.0, 2.0, np.inf]}, index=["a", "b", "c"]), mf)
    df = pd.DataFrame({"other": ["x", "y"], "times": [1.0, 2.0]})  # other columns are ignored
    np.testing.assert_array_equal(encode_inputs(df, mf), [[1.0], [2.0]])
