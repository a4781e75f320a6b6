"""Estimation-error metrics for mixtures of experts.

* :mod:`~moelab.metrics.voronoi` — Voronoi cells, the Voronoi loss family
  (general exponents; presets D1 and D2) and per-parameter-group errors;
  :mod:`~moelab.metrics.gaussian_voronoi`: the losses D̄/D̃ of the Gaussian-gated MoE.
* :mod:`~moelab.metrics.density` — Hellinger and total-variation distances
  between conditional densities, averaged over the x distribution.
* :mod:`~moelab.metrics.regression` — least-squares (regression) MoE: the
  over-specified Voronoi loss of the LSE theory and the L² distance of
  regression functions.
* :mod:`~moelab.metrics.rates` — empirical rates: least-squares slope of
  log(loss) on log(n) with a bootstrap interval over replicates.
"""

from .density import density_distances
from .gaussian_voronoi import gaussian_cells, gaussian_parameter_errors, gaussian_voronoi_loss
from .rates import RateFit, fit_rate
from .regression import lse_exponents, lse_loss, regression_distance
from .voronoi import (
    D1_EXPONENTS,
    PARAMETER_GROUPS,
    d1_loss,
    d2_exponents,
    d2_loss,
    normalised_atoms,
    parameter_errors,
    r_bar,
    voronoi_cells,
    voronoi_loss,
)

__all__ = [
    "voronoi_cells",
    "voronoi_loss",
    "d1_loss",
    "d2_loss",
    "d2_exponents",
    "r_bar",
    "D1_EXPONENTS",
    "PARAMETER_GROUPS",
    "normalised_atoms",
    "parameter_errors",
    "density_distances",
    "lse_exponents",
    "lse_loss",
    "regression_distance",
    "gaussian_voronoi_loss",
    "gaussian_cells",
    "gaussian_parameter_errors",
    "fit_rate",
    "RateFit",
]
