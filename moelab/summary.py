"""Summaries of a fitted mixture of experts: a JSON-ready dict and a text report.

Used by ``moelab fit``; works on any fitted
:class:`~moelab.estimator.MixtureOfExpertsRegressor`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ._version import __version__

__all__ = ["fit_report", "expert_table", "format_report", "information_criteria"]


def information_criteria(loglik: float, n_params: int, n_samples: int) -> tuple[float, float]:
    """BIC = −2 loglik + p log n and AIC = −2 loglik + 2p.

    Returns
    -------
    (bic, aic) : tuple of float
    """
    return -2.0 * loglik + n_params * math.log(n_samples), -2.0 * loglik + 2.0 * n_params


def _num(v):
    """A float for JSON: non-finite values become None (JSON has no NaN/inf)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _nums(a) -> list:
    return np.vectorize(_num, otypes=[object])(np.asarray(a, dtype=float)).tolist()


def fit_report(est, *, data: str, feature_names, response: str) -> dict:
    """Everything about a fit, as a JSON-serialisable dict.

    Parameters
    ----------
    est : MixtureOfExpertsRegressor
        Fitted estimator.
    data : str
        Where the data came from (path or bundled data set name).
    feature_names : sequence of str of length n_features_in_
    response : str
        Name of y.

    Returns
    -------
    dict
        Keys ``moelab`` ("fit"), ``version``, ``data``, ``x``, ``y``,
        ``n_samples``, ``n_features``, ``n_experts``, ``gate``,
        ``gate_description``, ``gate_options``, ``estimator``, ``loglik``,
        ``n_free_parameters``, ``bic``, ``aic``, ``n_iter``, ``converged``,
        ``degenerate``, ``seconds``, ``settings`` and ``params`` (``gate``:
        ``slope`` (K, d), ``intercept`` (K,), ``temperature``;
        ``experts``: ``slope`` (K, d), ``intercept``, ``variance``, ``sd``;
        ``expert_size`` (K,)). Non-finite numbers are None.
    """
    res = est.result_
    n = int(res.n_samples)
    p = est.n_free_parameters()
    bic, aic = information_criteria(est.loglik_, p, n)
    gate = est.model_.gate
    gate_params = {"slope": _nums(est.gate_slope_), "intercept": _nums(est.gate_intercept_)}
    if hasattr(est, "temperature_"):
        gate_params["temperature"] = _num(est.temperature_)
    options = {k: v for k, v in res.settings.get("gate_options", {}).items() if not callable(v)}
    return {
        "moelab": "fit",
        "version": __version__,
        "data": str(data),
        "x": [str(c) for c in feature_names],
        "y": str(response),
        "n_samples": n,
        "n_features": int(est.n_features_in_),
        "n_experts": int(est.model_.n_experts),
        "gate": gate.name,
        "gate_description": gate.describe(),
        "gate_options": options,
        "estimator": res.settings.get("estimator", est.estimator),
        "loglik": _num(est.loglik_),
        "n_free_parameters": int(p),
        "bic": _num(bic),
        "aic": _num(aic),
        "n_iter": est.n_iter_,
        "converged": est.converged_,
        "degenerate": bool(res.degenerate),
        "seconds": round(float(res.seconds), 3),
        "settings": {k: v for k, v in res.settings.items() if k not in ("gate", "gate_options")},
        "params": {
            "gate": gate_params,
            "experts": {
                "slope": _nums(est.expert_slope_),
                "intercept": _nums(est.expert_intercept_),
                "variance": _nums(est.expert_variance_),
                "sd": _nums(np.sqrt(est.expert_variance_)),
            },
            "expert_size": _nums(est.expert_size_),
        },
    }


def expert_table(report: dict) -> pd.DataFrame:
    """One row per expert: gate intercept and slopes, expert intercept and slopes, σ, effective size.

    Parameters
    ----------
    report : dict
        From :func:`fit_report`.

    Returns
    -------
    DataFrame of shape (n_experts, 2 d + 4), indexed 1..K.
    """
    prm = report["params"]
    cols = {"gate intercept": prm["gate"]["intercept"]}
    for j, name in enumerate(report["x"]):
        cols[f"gate {name}"] = [row[j] for row in prm["gate"]["slope"]]
    cols["expert intercept"] = prm["experts"]["intercept"]
    for j, name in enumerate(report["x"]):
        cols[f"expert {name}"] = [row[j] for row in prm["experts"]["slope"]]
    cols["sigma"] = prm["experts"]["sd"]
    cols["size"] = prm["expert_size"]
    table = pd.DataFrame(cols, dtype=float)
    table.index = pd.RangeIndex(1, len(table) + 1, name="expert")
    return table


def format_report(report: dict) -> str:
    """The text summary printed by ``moelab fit``.

    Parameters
    ----------
    report : dict
        From :func:`fit_report`.

    Returns
    -------
    str (several lines, no trailing newline)
    """
    def g(v, fmt=".6g"):
        return "n/a" if v is None else format(v, fmt)

    conv = "converged" if report["converged"] else "NOT converged"
    if report["degenerate"]:
        conv += ", degenerate (an expert collapsed)"
    lines = [
        f"data            {report['data']}  ({report['n_samples']} samples)",
        f"model           {report['y']} ~ {' + '.join(report['x'])}",
        f"experts         {report['n_experts']}",
        f"gate            {report['gate_description']}",
    ]
    tau = report["params"]["gate"].get("temperature")
    if tau is not None:
        lines.append(f"temperature     {g(tau)}")
    lines += [
        f"log-likelihood  {g(report['loglik'], '.3f')}",
        f"BIC             {g(report['bic'], '.3f')}  ({report['n_free_parameters']} free parameters)",
        f"AIC             {g(report['aic'], '.3f')}",
        f"iterations      {report['n_iter']} ({conv})",
        f"estimator       {report['estimator']}, {report['seconds']:.2f} s",
        "",
        expert_table(report).reset_index().to_string(index=False, float_format=lambda v: format(v, ".5g")),
    ]
    lines.append(f"(expert {report['n_experts']} is the gate's reference: its gate parameters are fixed at 0; "
                 "sigma = expert standard deviation; size = effective number of samples)")
    return "\n".join(lines)
