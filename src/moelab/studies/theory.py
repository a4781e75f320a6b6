"""What the theory says beside every empirical slope, and the verdict.

A study's ``[[fit]]`` table may carry a ``[fit.theory]`` table, one entry per
quantity of ``rates.csv`` (``loss_D1`` / ``loss_D2``, ``hellinger``, ``tv``,
``err_*``)::

    [fit.theory]
    loss_D1 = { slope = -0.5, source = "NeurIPS 2023 (arXiv 2305.03288), exact-specified D1 rate" }
    err_temperature = { rate = "slower-than-polynomial", source = "ICML 2024 (arXiv 2401.13875), abstract" }
    err_gate_slope = { rate = "polynomial", source = "ICML 2024, abstract" }

A claim is a numeric log-log ``slope`` (a rate n^slope, slope ≤ 0) or a
``rate`` without a number: ``"slower-than-polynomial"`` (the theory's
"slower than any polynomial rate, possibly as slow as O(1/log n)") or
``"polynomial"`` (some n^-r, r > 0, unspecified).

Verdicts (column ``verdict`` of rates.csv), in this order:

* ``not identified`` — the quantity is not identified by the model (an
  estimated τ for a gate invariant to (β_1, τ) → (cβ_1, cτ) on the design's
  x range; :func:`moelab.gates.identifiability.temperature_identified`):
  its slope measures where the estimator's start put it, not a rate.
* ``no theory`` — the study states no claim for it.
* ``no estimate`` — the slope or its interval could not be computed.
* ``consistent`` / ``inconsistent``:

  - numeric slope s: consistent iff the 95% bootstrap interval contains s;
  - ``slower-than-polynomial``: the log-log slope of such a rate tends to 0,
    and the slowest one the theory names, 1/log n, has on the study's grid
    the least-squares log-log slope s_log (``log_rate_slope``, e.g. −0.11 on
    n ∈ [10³, 10⁵], −0.13 on [10², 10⁵]). Consistent iff the interval's upper end is ≥ s_log, i.e.
    the data do not exclude a decay as slow as 1/log n (interval containing
    0, or lying below 0 by no more than s_log); inconsistent iff the whole
    interval lies below s_log (a decay provably faster than 1/log n);
    ``theory_slope`` is 0;
  - ``polynomial``: consistent iff the interval lies entirely below s_log
    (a decay provably faster than 1/log n); ``theory_slope`` is NaN.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["QUANTITY_NAMES", "RATE_CLAIMS", "VERDICTS", "log_rate_slope", "verdict", "identified_quantities", "describe_claim"]

#: quantities of rates.csv a claim can name
QUANTITY_NAMES = ("loss_D1", "loss_D2", "hellinger", "tv", "regression_l2", "err_gate_mass", "err_gate_slope", "err_temperature",
                  "err_gate_slope_over_tau", "err_expert_slope", "err_expert_intercept", "err_variance",
                  "err_gate_mean", "err_gate_covariance")
RATE_CLAIMS = ("slower-than-polynomial", "polynomial")
VERDICTS = ("consistent", "inconsistent", "not identified", "no theory", "no estimate")


def log_rate_slope(n_levels: Sequence[float]) -> float:
    """Least-squares slope of log(1/log n) on log n over the sample sizes ``n_levels`` (each > 1).

    Raises
    ------
    ValueError
        Fewer than two distinct sample sizes, or a size ≤ 1.
    """
    n = np.unique(np.asarray(n_levels, dtype=float))
    if n.size < 2 or n[0] <= 1:
        raise ValueError(f"need at least two distinct sample sizes > 1, got {list(n)}")
    x = np.log(n)
    y = -np.log(np.log(n))
    xc = x - x.mean()
    return float((y - y.mean()) @ xc / (xc @ xc))


def describe_claim(claim: Optional[Mapping[str, Any]]) -> str:
    """A short text for a claim: ``n^-0.5``, ``slower than any polynomial``, ``polynomial`` or ``""``."""
    if not claim:
        return ""
    if "slope" in claim:
        return f"n^{claim['slope']:g}"
    return claim["rate"].replace("-", " ").replace("slower than polynomial", "slower than any polynomial")


def verdict(slope: float, ci_low: float, ci_high: float, *, identified: bool, claim: Optional[Mapping[str, Any]],
            n_levels: Sequence[float]) -> Dict[str, Any]:
    """The theory columns of one rates.csv row (see the module docstring).

    Parameters
    ----------
    slope, ci_low, ci_high : float
        Empirical log-log slope and its 95% interval (NaN if not computed).
    identified : bool
        Whether the quantity is identified.
    claim : mapping or None
        ``{"slope": s, "source": ...}`` or ``{"rate": "slower-than-polynomial" | "polynomial", "source": ...}``.
    n_levels : sequence of float
        The sample sizes the slope was fitted on.

    Returns
    -------
    dict with ``theory_slope`` (float, NaN if none), ``theory_rate`` (str),
    ``theory_source`` (str, "none" without a claim) and ``verdict`` (one of :data:`VERDICTS`).
    """
    out = {"theory_slope": math.nan, "theory_rate": describe_claim(claim),
           "theory_source": (claim or {}).get("source", "none"), "verdict": None}
    if claim and "slope" in claim:
        out["theory_slope"] = float(claim["slope"])
    elif claim and claim.get("rate") == "slower-than-polynomial":
        out["theory_slope"] = 0.0
    if not identified:
        out["verdict"] = "not identified"
    elif not claim:
        out["verdict"] = "no theory"
    elif not all(np.isfinite([slope, ci_low, ci_high])) or len(set(n_levels)) < 2:
        out["verdict"] = "no estimate"
    elif "slope" in claim:
        out["verdict"] = "consistent" if ci_low <= claim["slope"] <= ci_high else "inconsistent"
    else:
        s_log = log_rate_slope(n_levels)
        slow = ci_high >= s_log
        out["verdict"] = "consistent" if slow == (claim["rate"] == "slower-than-polynomial") else "inconsistent"
    return out


def identified_quantities(truth, learn_temperature: bool, x) -> Dict[str, bool]:
    """Which rates.csv quantities are identified for a fitted setting.

    Parameters
    ----------
    truth : GaussianMoE
        The true model (batch shape ()).
    learn_temperature : bool
        Whether the fitted setting estimates τ.
    x : tensor of shape (m, d)
        Points of the design's x distribution (the logits' range).

    Returns
    -------
    dict quantity → bool: ``err_gate_slope`` and ``err_temperature`` are
    False where τ is estimated and the gate is invariant to (β_1, τ) →
    (cβ_1, cτ) on ``x``; ``err_gate_slope`` is False where the true gate acts
    only through its routing partition (top-1: :func:`moelab.gates.identifiability.routing_only`;
    the losses and ``err_gate_mass`` then use routing masses); every other
    quantity (the losses use the identified β_1/τ there) is True.
    """
    from ..gates.identifiability import routing_only, temperature_identified

    gate = truth.gate
    if gate.models_x:  # Gaussian gate: no temperature; every quantity identified
        return {}
    if learn_temperature and hasattr(gate, "learn_temperature"):
        import copy

        gate = copy.copy(gate)
        gate.learn_temperature = True
    ok = bool(temperature_identified(gate, x).all())
    return {"err_gate_slope": ok and not routing_only(gate, x), "err_temperature": ok}
