"""moelab: mixture-of-experts models with any gating function.

Statistical side: :class:`GaussianMoE` with gates from :mod:`moelab.gates`,
fitted by :func:`fit_em` (batched EM) or :func:`fit_mle` (L-BFGS).
Neural side: :mod:`moelab.nn`.
"""

from . import gates, metrics
from .datasets import DATASETS, load_dataset, read_table
from .estimator import MixtureOfExpertsRegressor
from .em import ConvergenceWarning, DegenerateFitWarning, EMResult, fit_em
from .experts import GaussianExperts
from .gates import ActivationGate, IdentifiabilityWarning, SoftmaxGate, TemperatureGate, TopKGate, make_gate
from .mle import fit_mle
from .model import GaussianMoE

__version__ = "0.1.0"

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
    "EMResult",
    "ConvergenceWarning",
    "DegenerateFitWarning",
    "IdentifiabilityWarning",
    "DATASETS",
    "load_dataset",
    "read_table",
]
