"""Summaries of a fitted mixture of experts: a JSON-ready dict and a text report.

Used by ``moelab fit``; works on any fitted
:class:`~moelab.estimator.MixtureOfExpertsRegressor`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ._version import __version__

__all__ = ["fit_report", "expert_table", "format_report", "information_criteria", "coefficient_table"]


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


def fit_report(est, *, data: str, feature_names, response: str, level: float = 0.95) -> dict:
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
    level : float, default 0.95
        Level of the confidence intervals.

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
        ``expert_size`` (K,)), ``standard_errors`` (the same keys and shapes, None where
        undefined), ``parameter_status`` (the same keys and shapes: "estimated", "reference",
        "fixed", "not identified", "unbounded", "not a maximum", "not a parameter"),
        ``switch_points`` (hard gate switches, :class:`moelab.inference.SwitchPoint`),
        ``confidence_level`` and ``confidence_intervals`` (a list of rows of
        ``est.confint(level)``), and ``bootstrap`` (with ``bootstrap=B``: ``n_boot``, ``kind``,
        ``seed``, ``n_valid``, ``n_converged``, ``se``/``lower``/``upper`` mirroring ``params``).
        Non-finite numbers are None.
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
        **_inference_report(est, level),
    }


def _inference_report(est, level: float) -> dict:
    """The standard-error part of :func:`fit_report`."""
    inf = est.inference_
    if inf is None:  # gates without standard errors yet (the Gaussian gate)
        return {"standard_errors": None, "parameter_status": None, "switch_points": [],
                "confidence_level": float(level), "confidence_intervals": None}
    ci = inf.confint(level)
    rows = [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()} for row in ci.to_dict("records")]
    out = {
        "standard_errors": inf.as_params(),
        "parameter_status": inf.status_params(),
        "switch_points": [s.as_dict() for s in inf.switch_points[0]],
        "confidence_level": float(level),
        "confidence_intervals": rows,
    }
    if hasattr(est, "bootstrap_"):
        b = est.bootstrap_
        out["bootstrap"] = {"n_boot": b.n_boot, "kind": b.kind, "seed": b.seed, "n_valid": b.n_valid,
                            "n_converged": int(b.converged.sum()), "relabelled": b.relabelled,
                            "seconds": round(b.seconds, 3), **b.as_params(level)}
    return out


def coefficient_table(est, level: float = 0.95) -> pd.DataFrame:
    """One row per free parameter: estimate, se and Wald interval; with a bootstrap also its se and
    percentile interval. Unbounded hard-switch parameters and switch points as in
    :meth:`moelab.inference.WaldInference.confint`.

    Returns
    -------
    DataFrame with columns ``parameter``, ``estimate``, ``se``, ``lower``, ``upper``, ``status``
    [, ``boot se``, ``boot lower``, ``boot upper``].
    """
    table = est.inference_.confint(level)
    if hasattr(est, "bootstrap_"):
        b = est.bootstrap_.confint(level)
        p = len(b)
        for col in ("se", "lower", "upper"):
            table[f"boot {col}"] = np.concatenate([b[col].to_numpy(), np.full(len(table) - p, np.nan)])
    return table


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
    if report.get("confidence_intervals") is not None:
        lines += ["", *_format_coefficients(report)]
    return "\n".join(lines)


def _format_coefficients(report: dict) -> list:
    """The coefficient table of :func:`format_report`: estimate, se, Wald (and bootstrap) intervals."""
    pct = f"{100 * report['confidence_level']:g}%"
    boot = report.get("bootstrap")
    rows = [dict(r) for r in report["confidence_intervals"]]
    if boot:
        names = [r["parameter"] for r in rows]
        flat = {}
        for key in ("se", "lower", "upper"):
            flat[key] = _flatten_like(boot[key], report)
        for i, r in enumerate(rows):
            for key in ("se", "lower", "upper"):
                r[f"boot {key}"] = flat[key].get(names[i])
    def cell(v):
        if v is None:
            return "NA"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return format(v, ".5g") if isinstance(v, float) else str(v)
    table = []
    for r in rows:
        st = r["status"]
        if st == "unbounded":
            r["se"] = "unbounded"
        elif st not in ("estimated",) and not st.startswith("switch"):
            r["se"] = st
        note = "" if st == "estimated" or st == "unbounded" else st
        if st.startswith("switch"):
            note = "hard switch (below)"
        row = {"parameter": r["parameter"], "estimate": cell(r["estimate"]), "se": cell(r["se"]),
               "lower": cell(r["lower"]), "upper": cell(r["upper"])}
        if boot:
            row.update({k: cell(r.get(k)) for k in ("boot se", "boot lower", "boot upper")})
        row["note"] = note
        table.append(row)
    df = pd.DataFrame(table)
    title = f"coefficients (se from the observed information; lower/upper: {pct} Wald interval"
    if boot:
        title += (f"; boot: {boot['kind']} bootstrap, {boot['n_valid']} of {boot['n_boot']} refits, "
                  f"{pct} percentile interval, seed {boot['seed']}")
    lines = [title + ")", df.to_string(index=False)]
    for s in report.get("switch_points", []):
        if not s["normal"]:  # a non-linear gate: no closed-form switch point
            lines.append(f"hard switch: expert {s['versus']} -> {s['expert']} through a saturated activation; the gate "
                         f"slope and intercept of expert {s['expert']} are unbounded")
            continue
        where = (f"{report['x'][0]} = {s['location']:.6g}" if s["location"] is not None
                 else f"{s['normal']}·x = {s['offset']:.6g}")
        lo, hi = s["likelihood_interval"]
        lines.append(f"hard switch: expert {s['versus']} -> {s['expert']} at {where} (between samples "
                     f"{lo:.6g} and {hi:.6g}: {pct} likelihood interval of an infinitely sharp switch); the gate slope "
                     f"and intercept of expert {s['expert']} are unbounded. The switch's delta-method se is taken at the "
                     f"sharpness where the fit stopped and grows without bound as the switch sharpens: report the switch as "
                     f"the likelihood interval [{lo:.6g}, {hi:.6g}] instead")
    return lines


def _flatten_like(params: dict, report: dict) -> dict:
    """Bootstrap values in the ``params`` structure → {parameter name: value} (names as the coefficient rows)."""
    out = {}
    K, names = report["n_experts"], report["x"]
    for k in range(K - 1):
        out[f"gate[{k + 1}] intercept"] = params["gate"]["intercept"][k]
        for j, c in enumerate(names):
            out[f"gate[{k + 1}] {c}"] = params["gate"]["slope"][k][j]
    if "temperature" in params["gate"]:
        out["temperature"] = params["gate"]["temperature"]
    for k in range(K):
        out[f"expert[{k + 1}] intercept"] = params["experts"]["intercept"][k]
        for j, c in enumerate(names):
            out[f"expert[{k + 1}] {c}"] = params["experts"]["slope"][k][j]
        out[f"expert[{k + 1}] sd"] = params["experts"]["sd"][k]
    return out
