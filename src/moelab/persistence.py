"""Saved models: a fitted mixture of experts as a JSON file (``model.json``), and back.

JSON, never pickle: a model file is plain text a user can read, diff and
keep; loading it runs no code. Every number is written with Python's
shortest round-trip repr, so a loaded model predicts bit for bit what the
saved one did.

Format (``format_version`` 2)::

    {
      "format": "moelab-model", "format_version": 2, "moelab_version": "0.1.0",
      "n_experts": K, "n_features": d,
      "gate": {"family": "softmax", "options": {...}},        # options as gate_spec validates them
      "inputs": {
        "columns": [...],        # data columns read, in order (before encoding), e.g. "carat", "cut"
        "features": [...],       # the model's d inputs (after encoding), e.g. "carat", "cut[Good]"
        "feature_names_in": true,  # the estimator was fitted on named columns
        "encoding": {"columns": [...]} or null,  # the estimator's encoding_.to_dict() (see below)
        "training": {"mean": [...], "sd": [...], "min": [...], "max": [...]} or null
      },
      "response": "accel",
      "params": {
        "gate": {"slope": [[...]] (K, d), "intercept": [...] (K,), "temperature": τ (if the gate has one)}
                or, for the Gaussian gate, {"proportions" (K,), "means" (K, d), "covariances" (K, d, d)},
        "experts": {"slope": [[...]] (K, d), "intercept": [...] (K,), "variance": [...] (K,)}
      },
      "estimator": {...},        # MixtureOfExpertsRegressor hyper-parameters (get_params)
      "fit": {"loglik", "n_samples", "n_iter", "converged", "expert_size", "n_free_parameters"}
    }

Parameters are stored in the original units of x and y (the standardisation
used while fitting is already undone), so prediction applies no scaling;
``inputs.training`` (when known) records the training inputs' location,
scale and range, for reference and extrapolation checks.

Categorical inputs: ``inputs.encoding`` is the fitted estimator's
:class:`~moelab.encoding.DesignEncoding` (``est.encoding_.to_dict()``), one
entry per data column: ``{"name": "carat", "kind": "numeric"}`` or
``{"name": "cut", "kind": "categorical", "levels": [l_1, ..., l_m]}``, the
latter becoming the m−1 indicator features ``cut[l_j]`` (j ≥ 2; l_1 is the
reference, treatment contrasts). ``inputs.columns`` and ``inputs.features``
are its ``column_names`` and ``feature_names``; the reader checks that they
agree. ``null`` means the inputs were numeric (arrays, or a DataFrame of
numeric columns) and ``columns == features``. :func:`encode_inputs`, the
loaded estimator and ``moelab predict`` apply the encoding to new data with
:meth:`DesignEncoding.transform`, so a level the model was not fitted on is
an error naming its rows and values.

Format version 1 (the first files, numeric inputs only) had an empty
``inputs.encodings`` object in place of ``inputs.encoding``; it is still read.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._version import __version__
from .encoding import ColumnEncoding, DesignEncoding
from .experts import GaussianExperts
from .gates import GATES, gate_spec
from .model import GaussianMoE

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelFileError", "ModelFile", "model_to_dict", "save_model",
           "read_model_file", "load_estimator", "fitted_estimator", "encode_inputs"]

FORMAT = "moelab-model"
FORMAT_VERSION = 2
#: format versions this moelab reads (1: numeric inputs only, ``inputs.encodings`` empty)
READS_VERSIONS = (1, 2)
_HYPERPARAMS = ("n_experts", "gate", "activation", "temperature", "learn_temperature", "top_k", "gate_options",
                "estimator", "n_init", "n_candidates", "init", "max_iter", "tol", "random_state", "compile", "accelerate")


class ModelFileError(ValueError):
    """A model file that cannot be read: not JSON, another format version, or edited into an invalid state."""


@dataclass
class ModelFile:
    """A validated model file (:func:`read_model_file`).

    Attributes
    ----------
    model : GaussianMoE
        Batch shape (), original units.
    columns, features : list of str
        Data columns read (before encoding) and the model's inputs (after, n_features of them).
    encoding : DesignEncoding or None
        How the columns become the features (None: numeric inputs, ``columns == features``).
    response : str
    feature_names_in : bool
    estimator_params : dict
        ``MixtureOfExpertsRegressor`` hyper-parameters.
    fit : dict
        Training log-likelihood, n_samples, n_iter, converged, expert_size (K,).
    training : dict or None
        mean, sd, min, max of the training inputs (n_features,).
    raw : dict
        The parsed JSON.
    """

    model: GaussianMoE
    columns: list
    features: list
    encoding: Optional[DesignEncoding]
    response: str
    feature_names_in: bool
    estimator_params: dict
    fit: dict
    training: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def design_encoding(self) -> DesignEncoding:
        """:attr:`encoding`, or for numeric inputs the encoding that reads each column as a number."""
        if self.encoding is not None:
            return self.encoding
        return DesignEncoding(tuple(ColumnEncoding(c, "numeric") for c in self.columns))


# ------------------------------------------------------------------ writing
def _json_scalar(value, what: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    raise ValueError(f"cannot save {what}={value!r} ({type(value).__name__}) to JSON; "
                     "give it as a number, string or bool (a callable activation cannot be saved: use a named one)")


def _floats(t) -> list:
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("the model has non-finite parameters and cannot be saved")
    return a.tolist()


def model_to_dict(est, *, feature_names=None, response_name: Optional[str] = None, x_train=None) -> dict:
    """A fitted :class:`~moelab.MixtureOfExpertsRegressor` as a JSON-ready dict (the model file).

    Parameters
    ----------
    est : MixtureOfExpertsRegressor
        Fitted (``model_`` set).
    feature_names : sequence of str of length n_features_in_, optional
        Default: ``feature_names_in_`` when fitted on a DataFrame, else x0, x1, ...
        With an encoding (``est.encoding_``, categorical inputs) the names are the
        encoding's design columns and may only be given equal to them.
    response_name : str, optional
        Name of y; default "y".
    x_train : array-like of shape (n_samples, n_features), optional
        Training inputs, to record their mean, sd, min and max.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        Not fitted, names of the wrong length (or other than the encoding's),
        or settings that JSON cannot hold (a callable activation, a RandomState).
    """
    model = getattr(est, "model_", None)
    if model is None:
        raise ValueError("this MixtureOfExpertsRegressor is not fitted yet; call fit(X, y) before save")
    d, K = model.n_features, model.n_experts
    named = hasattr(est, "feature_names_in_")
    encoding = getattr(est, "encoding_", None)
    if feature_names is None:
        feature_names = list(est.feature_names_in_) if named else [f"x{j}" for j in range(d)]
    feature_names = [str(c) for c in feature_names]
    if len(feature_names) != d:
        raise ValueError(f"feature_names has {len(feature_names)} names for {d} input features")
    if encoding is not None and feature_names != encoding.feature_names:
        raise ValueError(f"feature_names {feature_names} differ from the design columns of the estimator's "
                         f"encoding {encoding.feature_names}; leave feature_names unset (the encoding names them)")
    columns = feature_names if encoding is None else encoding.column_names
    from .estimator import gate_options_from

    params = est.get_params()
    options = gate_options_from(est.gate, activation=est.activation, temperature=est.temperature,
                                learn_temperature=est.learn_temperature, top_k=est.top_k,
                                gate_options=est.gate_options, n_experts=int(est.n_experts))
    options = {k: _json_scalar(v, k) for k, v in options.items()}
    hyper = {}
    for k in _HYPERPARAMS:
        v = params.get(k)
        if k == "random_state" and not (isinstance(v, numbers.Integral) and not isinstance(v, bool)):
            v = None  # a RandomState / Generator has no JSON form; the fit is stored, not its seed
        if k == "gate_options":
            v = None if v is None else {kk: _json_scalar(vv, kk) for kk, vv in v.items()}
        else:
            v = _json_scalar(v, k)
        hyper[k] = v
    gate = model.gate
    gate_params = {k: _floats(v) for k, v in gate.params().items()}
    if hasattr(gate, "temperature"):
        gate_params["temperature"] = float(gate.temperature)
    training = None
    if x_train is not None:
        xt = np.asarray(x_train, dtype=np.float64)
        training = {"mean": xt.mean(0).tolist(), "sd": xt.std(0, ddof=1).tolist() if len(xt) > 1 else None,
                    "min": xt.min(0).tolist(), "max": xt.max(0).tolist()}
    fit = {
        "loglik": float(est.loglik_) if hasattr(est, "loglik_") else None,
        "n_samples": int(est.result_.n_samples) if hasattr(est, "result_") else getattr(est, "n_samples_", None),
        "n_iter": int(getattr(est, "n_iter_", 0)),
        "converged": bool(getattr(est, "converged_", False)),
        "expert_size": _floats(est.expert_size_) if hasattr(est, "expert_size_") else None,
        "n_free_parameters": int(model.n_free_parameters()),
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "moelab_version": __version__,
        "n_experts": int(K),
        "n_features": int(d),
        "gate": {"family": gate.name, "description": gate.describe(), "options": options},
        "inputs": {"columns": columns, "features": feature_names, "feature_names_in": bool(named),
                   "encoding": None if encoding is None else encoding.to_dict(), "training": training},
        "response": "y" if response_name is None else str(response_name),
        "params": {
            "gate": gate_params,
            "experts": {"slope": _floats(model.experts.slope), "intercept": _floats(model.experts.intercept),
                        "variance": _floats(model.experts.variance)},
        },
        "estimator": hyper,
        "fit": fit,
    }


def save_model(est, path, **kwargs) -> Path:
    """Write :func:`model_to_dict` of ``est`` to ``path`` as indented JSON; returns the path.

    Parameters
    ----------
    est : MixtureOfExpertsRegressor
    path : str or Path
        File to write (its directory must exist); overwritten if present.
    **kwargs
        ``feature_names``, ``response_name``, ``x_train`` (see :func:`model_to_dict`).

    Raises
    ------
    ValueError
        As :func:`model_to_dict`.
    OSError
        If the file cannot be written.
    """
    doc = model_to_dict(est, **kwargs)
    path = Path(path)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ reading
class _Reader:
    """Typed look-ups in the parsed file, each error naming the file and the key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, msg: str):
        raise ModelFileError(f"{self.source}: {msg}")

    def get(self, obj, key: str, where: str, kind, *, optional: bool = False):
        if not isinstance(obj, dict):
            self.fail(f"{where or 'the file'} must be a JSON object, got {type(obj).__name__}")
        path = f"{where}.{key}" if where else key
        if key not in obj:
            if optional:
                return None
            self.fail(f"missing key {path!r}; the file is incomplete (re-save it with moelab fit --out)")
        v = obj[key]
        if optional and v is None:
            return None
        ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
        if not ok:
            names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "an integer",
                     (int, float): "a number"}
            self.fail(f"{path} must be {names.get(kind, kind)}, got {json.dumps(v)[:60]}")
        return v

    def array(self, obj, key: str, where: str, shape: tuple) -> np.ndarray:
        path = f"{where}.{key}"
        v = self.get(obj, key, where, list if shape else (int, float))
        try:
            a = np.array(v, dtype=object)
        except ValueError:
            a = None
        if a is None or a.shape != shape:
            got = "ragged" if a is None else a.shape
            self.fail(f"{path} has shape {got}, expected {shape} (n_experts={shape[0]}"
                      + (f", n_features={shape[1]})" if len(shape) > 1 else ")"))
        flat = a.reshape(-1)
        pos = lambda i: tuple(int(j) for j in np.unravel_index(i, shape))  # noqa: E731
        for i, e in enumerate(flat):
            if isinstance(e, bool) or not isinstance(e, (int, float)):
                self.fail(f"{path} holds {json.dumps(e)[:30]} at position {pos(i)}; "
                          "every entry must be a number")
            if not math.isfinite(e):
                self.fail(f"{path} holds a non-finite value ({e}) at position {pos(i)}")
        return a.astype(np.float64)


def _read_json(path) -> tuple:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"no such model file {source!r}; give the model.json written by moelab fit --out") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read model file {source!r}: {exc}") from None

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        doc = json.loads(text, parse_constant=no_constants)
    except ValueError as exc:
        raise ModelFileError(f"{source} is not a valid JSON model file ({exc})") from None
    return source, doc


def read_model_file(path) -> ModelFile:
    """Read and validate a model file written by :func:`save_model` (``moelab fit --out``).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ModelFile

    Raises
    ------
    ModelFileError (a ValueError)
        The file is missing or not JSON; another format or format version; a
        key missing or of the wrong type; parameters of the wrong shape,
        non-finite or out of range (variance ≤ 0); an unknown gate family or
        invalid options; an ``inputs.encoding`` that is malformed or disagrees
        with ``inputs.columns`` / ``inputs.features``. The message names the
        file and the key.
    """
    source, doc = _read_json(path)
    r = _Reader(source)
    if not isinstance(doc, dict):
        r.fail(f"is not a moelab model file (a JSON {type(doc).__name__}, expected an object)")
    fmt = doc.get("format")
    if fmt != FORMAT:
        hint = " (that is moelab fit's params.json; load DIR/model.json instead)" if doc.get("moelab") == "fit" else ""
        r.fail(f"is not a moelab model file (format {fmt!r}, expected {FORMAT!r}){hint}")
    version = doc.get("format_version")
    if isinstance(version, bool) or version not in READS_VERSIONS:
        r.fail(f"has model format version {version!r} (written by moelab {doc.get('moelab_version', '?')}); "
               f"this moelab {__version__} reads format versions {', '.join(map(str, READS_VERSIONS))}: refit the "
               "model with this version, or load it with the version that wrote it")
    K = r.get(doc, "n_experts", "", int)
    d = r.get(doc, "n_features", "", int)
    if K < 1 or d < 1:
        r.fail(f"n_experts and n_features must be >= 1, got {K} and {d}")
    gate_doc = r.get(doc, "gate", "", dict)
    family = r.get(gate_doc, "family", "gate", str)
    options = r.get(gate_doc, "options", "gate", dict)
    if family not in GATES:
        r.fail(f"gate family {family!r} is not registered in this process (registered: {', '.join(GATES)}); "
               "register it with moelab.gates.register_gate before loading")
    try:
        spec = gate_spec(family, options, n_experts=K)
    except ValueError as exc:
        r.fail(f"gate.options: {exc}")
    inputs = r.get(doc, "inputs", "", dict)
    columns = r.get(inputs, "columns", "inputs", list)
    features = r.get(inputs, "features", "inputs", list)
    for name, lst in (("columns", columns), ("features", features)):
        if not lst or not all(isinstance(c, str) for c in lst):
            r.fail(f"inputs.{name} must be a non-empty list of strings")
    if len(features) != d:
        r.fail(f"inputs.features has {len(features)} names but n_features is {d}")
    named = r.get(inputs, "feature_names_in", "inputs", bool)
    encoding = _read_encoding(r, inputs, version, columns, features, named)
    training = r.get(inputs, "training", "inputs", dict, optional=True)
    if training is not None:
        training = {k: (None if training.get(k) is None else r.array(training, k, "inputs.training", (d,)).tolist())
                    for k in ("mean", "sd", "min", "max")}
    response = r.get(doc, "response", "", str)
    params = r.get(doc, "params", "", dict)
    gp = r.get(params, "gate", "params", dict)
    ep = r.get(params, "experts", "params", dict)
    models_x = bool(getattr(spec.family, "models_x", False))  # Gaussian gate: π (K,), c (K, d), Γ (K, d, d)
    shapes = ({"proportions": (K,), "means": (K, d), "covariances": (K, d, d)} if models_x
              else {"slope": (K, d), "intercept": (K,)})
    g_arrays = {k: r.array(gp, k, "params.gate", shape) for k, shape in shapes.items()}
    extra = {}
    for k, v in gp.items():
        if k in shapes:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            r.fail(f"params.gate.{k} must be a finite number, got {json.dumps(v)[:40]}")
        extra[k] = float(v)
    e_slope = r.array(ep, "slope", "params.experts", (K, d))
    e_int = r.array(ep, "intercept", "params.experts", (K,))
    e_var = r.array(ep, "variance", "params.experts", (K,))
    if (e_var <= 0).any():
        r.fail(f"params.experts.variance must be > 0 (variances σ_k²), got {e_var.tolist()}")
    try:
        opts = dict(spec.options)
        opts.update(extra)
        gate = spec.family(*(torch.tensor(g_arrays[k]) for k in shapes), **opts)
        model = GaussianMoE(gate, GaussianExperts(torch.tensor(e_slope), torch.tensor(e_int), torch.tensor(e_var)))
    except (TypeError, ValueError) as exc:
        r.fail(f"params: {exc}")
    hyper = r.get(doc, "estimator", "", dict)
    unknown = sorted(set(hyper) - set(_HYPERPARAMS))
    if unknown:
        r.fail(f"estimator has unknown setting(s) {', '.join(unknown)}")
    if hyper.get("n_experts", K) != K or hyper.get("gate", family) != family:
        r.fail(f"estimator.n_experts/gate ({hyper.get('n_experts')}, {hyper.get('gate')!r}) disagree with "
               f"n_experts/gate.family ({K}, {family!r})")
    fit = r.get(doc, "fit", "", dict)
    fit_info = {
        "loglik": r.get(fit, "loglik", "fit", (int, float), optional=True),
        "n_samples": r.get(fit, "n_samples", "fit", int, optional=True),
        "n_iter": r.get(fit, "n_iter", "fit", int),
        "converged": r.get(fit, "converged", "fit", bool),
        "expert_size": (None if fit.get("expert_size") is None else r.array(fit, "expert_size", "fit", (K,))),
    }
    return ModelFile(model=model, columns=list(columns), features=list(features), encoding=encoding,
                     response=response, feature_names_in=named, estimator_params=dict(hyper), fit=fit_info,
                     training=training, raw=doc)


def _read_encoding(r: _Reader, inputs: dict, version: int, columns, features, named: bool):
    """``inputs.encoding`` as a DesignEncoding (None: numeric inputs), checked against columns and features."""
    for name, lst in (("columns", columns), ("features", features)):
        dup = sorted({c for c in lst if lst.count(c) > 1})
        if dup:
            r.fail(f"inputs.{name} names {', '.join(map(repr, dup))} more than once")
    if version == 1:
        if r.get(inputs, "encodings", "inputs", dict):
            r.fail("inputs.encodings of format version 1 must be empty (moelab never wrote categorical codings in "
                   "that version); refit the model with this moelab")
        doc = None
    else:
        if "encoding" not in inputs:
            r.fail("missing key 'inputs.encoding'; the file is incomplete (re-save it with moelab fit --out)")
        doc = inputs["encoding"]
    if doc is None:
        if list(columns) != list(features):
            r.fail(f"inputs.features {features} must equal inputs.columns {columns} when inputs.encoding is null "
                   "(numeric inputs)")
        return None
    try:
        encoding = DesignEncoding.from_dict(doc)
    except ValueError as exc:
        r.fail(f"inputs.encoding: {exc}")
    if encoding.column_names != list(columns):
        r.fail(f"inputs.columns {columns} disagree with the columns of inputs.encoding {encoding.column_names}")
    if encoding.feature_names != list(features):
        r.fail(f"inputs.features {features} do not follow from inputs.encoding (expected {encoding.feature_names})")
    if not named:
        r.fail("inputs.feature_names_in must be true when inputs.encoding is given (the model reads named columns)")
    return encoding


def encode_inputs(df, mf: ModelFile, *, rows: str = "index") -> np.ndarray:
    """The model's inputs (n_samples, n_features) from a table holding the columns it was fitted on.

    The columns ``mf.columns`` are taken from ``df`` (others are ignored) and
    coded by the model's encoding (:meth:`moelab.encoding.DesignEncoding.transform`):
    numeric columns as numbers, categorical ones as the indicator columns of
    the saved levels.

    Parameters
    ----------
    df : pandas.DataFrame of shape (n_samples, n_columns)
    mf : ModelFile
    rows : {"index", "file"}, default "index"
        How rows are named in messages: index labels, or data rows counted from 1 after a file's
        header (what ``moelab predict`` uses).

    Returns
    -------
    ndarray of shape (n_samples, n_features), float64

    Raises
    ------
    ValueError
        A column is missing; a numeric column holds values that are not
        numbers, or NaN/inf; a categorical column holds a missing value or a
        level the model was not fitted on (each names the column, the rows and
        the values).
    """
    by_name = {str(c): c for c in df.columns}
    missing = [c for c in mf.columns if c not in by_name]
    if missing:
        raise ValueError(f"the data have no column(s) {', '.join(map(repr, missing))} that the model was fitted on; "
                         f"available columns: {', '.join(by_name)}")
    X = df[[by_name[c] for c in mf.columns]]
    X.columns = list(mf.columns)
    v = mf.design_encoding.transform(X, rows=rows).to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        j = int(np.flatnonzero(bad.any(0))[0])
        i = int(np.flatnonzero(bad[:, j])[0])
        where = f"data row {i + 1}" if rows == "file" else f"index {df.index[i]!r}"
        raise ValueError(f"column {mf.features[j]!r} has {int(bad[:, j].sum())} missing or infinite value(s) "
                         f"(first in {where}); drop or impute those rows first")
    return v


def load_estimator(path, cls=None):
    """A fitted ``MixtureOfExpertsRegressor`` from a model file.

    The estimator has its hyper-parameters (``get_params``) and the fitted
    attributes that describe the model (``model_``, ``gate_slope_``,
    ``gate_intercept_``, ``temperature_``, ``expert_slope_``,
    ``expert_intercept_``, ``expert_variance_``, ``expert_size_``,
    ``loglik_``, ``n_iter_``, ``converged_``, ``n_features_in_``,
    ``feature_names_in_``, ``encoding_``); the training history and
    ``result_`` are not saved. It predicts exactly what the saved estimator
    predicted, from the same raw columns (categorical ones included).

    Parameters
    ----------
    path : str or Path
    cls : type, optional
        The estimator class (default :class:`moelab.MixtureOfExpertsRegressor`).

    Raises
    ------
    ModelFileError
        As :func:`read_model_file`.
    """
    if cls is None:
        from .estimator import MixtureOfExpertsRegressor as cls
    mf = read_model_file(path)
    try:
        est = cls(**mf.estimator_params)
    except TypeError as exc:
        raise ModelFileError(f"{path}: estimator settings do not fit {cls.__name__}: {exc}") from None
    return fitted_estimator(est, mf.model, loglik=mf.fit["loglik"], n_iter=mf.fit["n_iter"],
                            converged=mf.fit["converged"], expert_size=mf.fit["expert_size"],
                            n_samples=mf.fit["n_samples"], feature_names=mf.features if mf.feature_names_in else None,
                            encoding=mf.encoding)


def fitted_estimator(est, model, *, loglik=None, n_iter=0, converged=True, expert_size=None, n_samples=None,
                     feature_names=None, encoding=None):
    """Set the fitted attributes of an unfitted ``MixtureOfExpertsRegressor`` from a model; returns ``est``.

    For models that were not fitted by ``est.fit`` (a loaded file, the K = 1
    least-squares fit of :func:`moelab.select_n_experts`). Sets ``model_``,
    the parameter attributes (``gate_slope_`` ... ``expert_variance_``,
    ``temperature_`` where the gate has one), ``n_features_in_``, and where
    given ``loglik_``, ``n_iter_``, ``converged_``, ``expert_size_`` (K,),
    ``n_samples_`` and ``feature_names_in_`` (n_features,); ``encoding_`` is
    ``encoding`` (a :class:`~moelab.encoding.DesignEncoding` whose
    ``feature_names`` are ``feature_names``, or None for numeric inputs).
    """
    if encoding is not None and (feature_names is None or list(feature_names) != encoding.feature_names):
        raise ValueError(f"feature_names {feature_names} must be the encoding's design columns {encoding.feature_names}")
    from .estimator import set_model_attributes

    set_model_attributes(est, model)
    if expert_size is not None:
        est.expert_size_ = np.asarray(expert_size, dtype=np.float64)
    if loglik is not None:
        est.loglik_ = float(loglik)
    if n_samples is not None:
        est.n_samples_ = int(n_samples)
    est.n_iter_ = int(n_iter)
    est.converged_ = bool(converged)
    est.n_features_in_ = model.n_features
    if feature_names is not None:
        est.feature_names_in_ = np.asarray(feature_names, dtype=object)
    est.encoding_ = encoding
    return est
