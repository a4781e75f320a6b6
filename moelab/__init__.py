"""moelab: mixture-of-experts models with any gating function.

Statistical side: :class:`GaussianMoE` with gates from :mod:`moelab.gates`,
fitted by :func:`fit_em` (batched EM) or :func:`fit_mle` (L-BFGS);
regression mixtures :class:`RegressionMoE` (sigmoid or softmax gates) by
least squares, :func:`fit_lse`.
Neural side: :mod:`moelab.nn`.

Names are imported on first use (PEP 562 module ``__getattr__``), so
``import moelab.nn`` does not load pandas or scikit-learn and ``moelab
--version`` does not load torch.
"""

from importlib import import_module

from ._version import __version__  # noqa: F401  (re-exported)

#: public name → the submodule that defines it
_LAZY = {
    "GaussianMoE": "model",
    "GaussianExperts": "experts",
    "MixtureOfExpertsRegressor": "estimator",
    "SoftmaxGate": "gates",
    "TemperatureGate": "gates",
    "ActivationGate": "gates",
    "TopKGate": "gates",
    "make_gate": "gates",
    "IdentifiabilityWarning": "gates",
    "fit_em": "em",
    "EMResult": "em",
    "ConvergenceWarning": "em",
    "DegenerateFitWarning": "em",
    "fit_mle": "mle",
    "fit_lse": "lse",
    "LSEResult": "lse",
    "RegressionMoE": "regression",
    "RegressionExperts": "regression",
    "SigmoidGate": "gates",
    "DATASETS": "datasets",
    "load_dataset": "datasets",
    "read_table": "datasets",
}
_SUBMODULES = ("gates", "metrics")

__all__ = [
    "GaussianMoE",
    "GaussianExperts",
    "gates",
    "metrics",
    "MixtureOfExpertsRegressor",
    "SoftmaxGate",
    "TemperatureGate",
    "ActivationGate",
    "TopKGate",
    "make_gate",
    "fit_em",
    "fit_mle",
    "fit_lse",
    "LSEResult",
    "RegressionMoE",
    "RegressionExperts",
    "SigmoidGate",
    "EMResult",
    "ConvergenceWarning",
    "DegenerateFitWarning",
    "IdentifiabilityWarning",
    "DATASETS",
    "load_dataset",
    "read_table",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
