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
        ``slope`` (K, d), ``intercept`` (K,), ``temperature``; for the
        Gaussian gate ``proportions`` (K,), ``means`` (K, d), ``covariances``
        (K, d, d));
        ``experts``: ``slope`` (K, d), ``intercept``, ``variance``, ``sd``;
        ``expert_size`` (K,)). Non-finite numbers are None.
        For a gate that models x (Gaussian) ``loglik``, ``bic``, ``aic`` and
        ``n_free_parameters`` are those of the joint model p(x, y), and the
        report adds ``likelihood`` ("joint p(x, y)"), ``loglik_x`` (Σ log p(x)),
        ``loglik_conditional`` (Σ log p(y | x), comparable with a softmax-type
        fit's ``loglik``), ``n_free_parameters_conditional``, ``bic_conditional``
        and ``aic_conditional`` (comparable with a softmax-type fit's ``bic``/``aic``).
    """
    res = est.result_
    n = int(res.n_samples)
    p = est.n_free_parameters()
    bic, aic = information_criteria(est.loglik_, p, n)
    gate = est.model_.gate
    joint = {}
    if gate.models_x:  # Gaussian gate: a model of (x, y); report the conditional part beside the joint one
        gate_params = {"proportions": _nums(est.gate_proportions_), "means": _nums(est.gate_means_),
                       "covariances": _nums(est.gate_covariances_)}
        p_cond = est.n_free_parameters(conditional=True)
        ll_cond = est.loglik_ - est.x_loglik_
        bic_c, aic_c = information_criteria(ll_cond, p_cond, n)
        joint = {"likelihood": "joint p(x, y)", "loglik_x": _num(est.x_loglik_), "loglik_conditional": _num(ll_cond),
                 "n_free_parameters_conditional": int(p_cond), "bic_conditional": _num(bic_c),
                 "aic_conditional": _num(aic_c)}
    else:
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
        **joint,
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
    DataFrame of shape (n_experts, 2 d + 4), indexed 1..K (Gaussian gate: π, c (d columns) and the
    upper triangle of Γ in place of the gate intercept and slopes).
    """
    prm = report["params"]
    if "proportions" in prm["gate"]:  # Gaussian gate: π_k, c_k, Γ_k (upper triangle)
        cols = {"pi": prm["gate"]["proportions"]}
        for j, name in enumerate(report["x"]):
            cols[f"c {name}"] = [row[j] for row in prm["gate"]["means"]]
        names = report["x"]
        for a in range(len(names)):
            for b in range(a, len(names)):
                key = f"Gamma {names[a]}" if a == b and len(names) == 1 else f"Gamma {names[a]},{names[b]}"
                cols[key] = [m[a][b] for m in prm["gate"]["covariances"]]
    else:
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
    if "loglik_conditional" in report:
        lines += [
            f"log-likelihood  {g(report['loglik'], '.3f')}  (joint, log p(x, y): the gate models x)",
            f"  log p(y | x)  {g(report['loglik_conditional'], '.3f')}  (comparable with a softmax-type fit's log-likelihood)",
            f"  log p(x)      {g(report['loglik_x'], '.3f')}",
            f"BIC (x, y)      {g(report['bic'], '.3f')}  ({report['n_free_parameters']} free parameters, x-model included)",
            f"BIC (y | x)     {g(report['bic_conditional'], '.3f')}  ({report['n_free_parameters_conditional']} parameters "
            "p(y|x) identifies; comparable with a softmax-type fit's BIC)",
            f"AIC (x, y)      {g(report['aic'], '.3f')}",
            f"AIC (y | x)     {g(report['aic_conditional'], '.3f')}",
        ]
    else:
        lines += [
            f"log-likelihood  {g(report['loglik'], '.3f')}",
            f"BIC             {g(report['bic'], '.3f')}  ({report['n_free_parameters']} free parameters)",
            f"AIC             {g(report['aic'], '.3f')}",
        ]
    lines += [
        f"iterations      {report['n_iter']} ({conv})",
        f"estimator       {report['estimator']}, {report['seconds']:.2f} s",
        "",
        expert_table(report).reset_index().to_string(index=False, float_format=lambda v: format(v, ".5g")),
    ]
    if "loglik_conditional" in report:
        lines.append("(gate: X | expert k ~ N(c_k, Gamma_k) with weight pi_k; sigma = expert standard deviation; "
                     "size = effective number of samples)")
    else:
        lines.append(f"(expert {report['n_experts']} is the gate's reference: its gate parameters are fixed at 0; "
                     "sigma = expert standard deviation; size = effective number of samples)")
    return "\n".join(lines)
