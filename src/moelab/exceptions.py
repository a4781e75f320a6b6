"""moelab's warning classes: one hierarchy under :class:`MoelabWarning`.

::

    UserWarning
    └── MoelabWarning                 anything moelab says about a fit or its data
        ├── ConvergenceWarning        stopped at max_iter (also a sklearn ConvergenceWarning)
        ├── DegenerateFitWarning      every start collapsed an expert
        ├── IdentifiabilityWarning    an estimated parameter is not identified (τ)
        ├── RankDeficientWarning      the columns of x are (numerically) linearly dependent
        ├── SmallExpertWarning        an expert has too few effective samples for its parameters
        └── FewStartsWarning          too few starts (n_init) to trust the maximum found

``warnings.filterwarnings("ignore", category=moelab.MoelabWarning)`` silences
all of them; ``"error"`` turns them into exceptions. Every message is one line
(the command line prints one ``moelab fit: warning: ...`` line per warning).

:class:`ConvergenceWarning` also subclasses scikit-learn's
``sklearn.exceptions.ConvergenceWarning``; it is defined in
:mod:`moelab.fitcore` (importing scikit-learn) and resolved here on first
use, so importing this module (e.g. from :mod:`moelab.gates`) loads no
scikit-learn.
"""

from __future__ import annotations

__all__ = ["MoelabWarning", "ConvergenceWarning", "DegenerateFitWarning", "IdentifiabilityWarning",
           "RankDeficientWarning", "SmallExpertWarning", "FewStartsWarning"]


class MoelabWarning(UserWarning):
    """Base class of every warning moelab emits about a fit or its data."""


class DegenerateFitWarning(MoelabWarning):
    """Every start collapsed an expert (tiny variance or almost no samples)."""


class IdentifiabilityWarning(MoelabWarning):
    """An estimated parameter is not identified by the model (e.g. τ for a homogeneous σ)."""


class RankDeficientWarning(MoelabWarning):
    """The columns of x are linearly dependent (numerical rank of the standardised design < n_features).

    The slopes of the dependent columns are then not identified (only their
    combination is); see :func:`moelab.diagnostics.design_rank`.
    """


class SmallExpertWarning(MoelabWarning):
    """An expert's effective size Σ_n P(k | x_n, y_n) leaves fewer than 5 residual degrees of freedom."""


class FewStartsWarning(MoelabWarning):
    """Fewer than 10 starts (``n_init``): EM finds a local maximum, and a few starts often miss the best one."""


def __getattr__(name: str):
    if name == "ConvergenceWarning":
        from .fitcore import ConvergenceWarning

        return ConvergenceWarning
    raise AttributeError(f"module 'moelab.exceptions' has no attribute {name!r}")
