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
    "GaussianGate": "gates",
    "make_gate": "gates",
    "MoelabWarning": "exceptions",
    "IdentifiabilityWarning": "exceptions",
    "RankDeficientWarning": "exceptions",
    "SmallExpertWarning": "exceptions",
    "FewStartsWarning": "exceptions",
    "fit_em": "em",
    "EMResult": "em",
    "ConvergenceWarning": "em",
    "DegenerateFitWarning": "exceptions",
    "fit_mle": "mle",
    "fit_lse": "lse",
    "LSEResult": "lse",
    "RegressionMoE": "regression",
    "RegressionExperts": "regression",
    "SigmoidGate": "gates",
    "DATASETS": "datasets",
    "load_dataset": "datasets",
    "read_table": "datasets",
    "select_n_experts": "selection",
    "predict_table": "prediction",
    "prediction_interval": "prediction",
    "ModelFileError": "persistence",
    "wald_inference": "inference",
    "WaldInference": "inference",
    "SeparationWarning": "inference",
    "bootstrap_fit": "bootstrap",
    "BootstrapResult": "bootstrap",
}
_SUBMODULES = ("gates", "metrics", "exceptions")

__all__ = [
    "GaussianMoE",
    "GaussianExperts",
    "gates",
    "metrics",
    "exceptions",
    "MixtureOfExpertsRegressor",
    "SoftmaxGate",
    "TemperatureGate",
    "ActivationGate",
    "TopKGate",
    "GaussianGate",
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
    "MoelabWarning",
    "RankDeficientWarning",
    "SmallExpertWarning",
    "FewStartsWarning",
    "DATASETS",
    "load_dataset",
    "read_table",
    "select_n_experts",
    "predict_table",
    "prediction_interval",
    "ModelFileError",
    "wald_inference",
    "WaldInference",
    "SeparationWarning",
    "bootstrap_fit",
    "BootstrapResult",
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
