"""Choosing the number of experts K by information criteria (BIC, AIC, ICL).

One fit per K. K = 1 is a linear regression fitted by least squares (no
starts: the maximum-likelihood fit is unique), K ≥ 2 are
:class:`~moelab.MixtureOfExpertsRegressor` fits with the given settings and
seed, so the row for K equals ``moelab fit --experts K`` with the same
options. Fits of different K have different parameter shapes and run one
after the other; each fit batches its own starts.

Criteria, all on the −2 log-likelihood scale where **lower is better**
(n samples, p free parameters, r_nk the responsibilities P(k | x_n, y_n)):

- BIC = −2 log L + p log n (Schwarz 1978),
- AIC = −2 log L + 2p (Akaike 1974),
- ICL = BIC + 2 EN, with EN = −Σ_n Σ_k r_nk log r_nk ≥ 0 the entropy of the
  responsibilities: the BIC approximation of the integrated completed
  likelihood (Biernacki, Celeux & Govaert 2000, IEEE TPAMI 22(7):719-725,
  eq. (10)–(11), there written −ICL/2 in the "higher is better" sign). ICL
  penalises experts that overlap (uncertain assignments), so it tends to
  choose fewer, better-separated experts than BIC. For K = 1, EN = 0 and
  ICL = BIC.

The chosen K minimises the criterion among fits that did not collapse
(``degenerate``: every start had an expert with almost no samples); ties go
to the smaller K.
"""

from __future__ import annotations

import numbers
import re
import warnings

import numpy as np
import pandas as pd
import torch

__all__ = ["CRITERIA", "parse_experts", "responsibility_entropy", "select_n_experts", "linear_regression_model",
           "choose_n_experts"]

#: criterion name -> its column in the table
CRITERIA = ("bic", "aic", "icl")
#: gate settings of MixtureOfExpertsRegressor, not used by the K = 1 fit (its gate weight is 1)
_GATE_PARAMS = ("gate", "activation", "temperature", "learn_temperature", "top_k", "gate_options")
_COLUMNS = ("n_experts", "loglik", "n_params", "bic", "aic", "icl", "min_expert_size", "converged", "degenerate")


def parse_experts(spec) -> list:
    """Candidate numbers of experts from ``"1-6"``, ``"1,2,4"``, ``"2-4,6"`` or an iterable of ints.

    Returns
    -------
    list of int
        Sorted, without duplicates, each ≥ 1.

    Raises
    ------
    ValueError
        A part that is not an integer or a range A-B with 1 ≤ A ≤ B, or nothing given.
    """
    if isinstance(spec, str):
        values = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if not m:
                raise ValueError(f"cannot read {part!r} in experts {spec!r}; give K, a range A-B or a list, "
                                 "e.g. 1-6 or 1,2,4")
            if m.group(3) is not None:
                values.append(int(m.group(3)))
            else:
                a, b = int(m.group(1)), int(m.group(2))
                if a > b:
                    raise ValueError(f"range {part!r} in experts {spec!r} is empty; write it as {b}-{a}")
                values.extend(range(a, b + 1))
    else:
        try:
            values = list(spec)
        except TypeError:
            values = [spec]
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise ValueError(f"n_experts must be integers >= 1, got {spec!r}")
    values = sorted({int(v) for v in values})
    if not values:
        raise ValueError("no number of experts given; e.g. n_experts=range(1, 7) or experts '1-6'")
    if values[0] < 1:
        raise ValueError(f"numbers of experts must be >= 1, got {values[0]}")
    return values


def responsibility_entropy(resp) -> float:
    """EN = −Σ_n Σ_k r_nk log r_nk, the entropy of the responsibilities (0 log 0 = 0).

    Parameters
    ----------
    resp : array-like of shape (n_samples, n_experts)
        Posterior expert probabilities P(k | x_n, y_n); rows sum to 1.

    Returns
    -------
    float ≥ 0, in nats. Source: Biernacki, Celeux & Govaert (2000), eq. (10).
    """
    r = np.asarray(resp, dtype=np.float64)
    return float(-np.sum(r * np.log(np.where(r > 0, r, 1.0))))


def linear_regression_model(X, y, reg_variance: float = 1e-6):
    """The K = 1 model: ordinary least squares y = aᵀx + b + ε, ε ~ N(0, ν), fitted in closed form.

    ν is the maximum-likelihood variance RSS / n, floored at
    ``reg_variance`` · var(y) as in :func:`moelab.fit_em`.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float64
    y : ndarray of shape (n_samples,), float64
    reg_variance : float, default 1e-6

    Returns
    -------
    GaussianMoE
        One expert, softmax gate with zero parameters (weight 1), original units.
    """
    from .experts import GaussianExperts
    from .gates import SoftmaxGate
    from .model import GaussianMoE

    n, d = X.shape
    design = np.column_stack([X, np.ones(n)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(np.sum((y - design @ coef) ** 2))
    var = max(rss / n, reg_variance * float(np.var(y, ddof=1)))
    gate = SoftmaxGate(torch.zeros(1, d, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    experts = GaussianExperts(torch.tensor(coef[None, :d]), torch.tensor(coef[d:]), torch.tensor([var]))
    return GaussianMoE(gate, experts)


def _validated_xy(X, y):
    from sklearn.utils import check_X_y

    names = [str(c) for c in X.columns] if isinstance(X, pd.DataFrame) else None
    Xa, ya = check_X_y(X, y, dtype=np.float64, y_numeric=True)
    return Xa, ya, names


def _row(K, model, x, y, *, converged, degenerate, sizes) -> dict:
    from .summary import information_criteria

    with torch.no_grad():
        ll = float(model.loglik(x, y))
        resp = model.responsibilities(x, y).numpy()
    p = int(model.n_free_parameters())
    n = y.shape[0]
    bic, aic = information_criteria(ll, p, n)
    return {"n_experts": K, "loglik": ll, "n_params": p, "bic": bic, "aic": aic,
            "icl": bic + 2.0 * responsibility_entropy(resp), "min_expert_size": float(np.min(sizes)),
            "converged": bool(converged), "degenerate": bool(degenerate)}


def select_n_experts(X, y, n_experts=range(1, 7), *, criterion: str = "bic", return_estimators: bool = False,
                     **params):
    """Fit one mixture of experts per K and tabulate log-likelihood, BIC, AIC and ICL.

    Parameters
    ----------
    X : array-like or DataFrame of shape (n_samples, n_features)
    y : array-like of shape (n_samples,)
    n_experts : iterable of int or str, default range(1, 7)
        Candidate K (≥ 1), or a string such as ``"1-6"`` or ``"1,2,4"``.
    criterion : {"bic", "aic", "icl"}, default "bic"
        The criterion that chooses K (lower is better for all three).
    return_estimators : bool, default False
        Also return the fitted estimators by K.
    **params
        Keyword parameters of :class:`~moelab.MixtureOfExpertsRegressor`
        (``gate``, ``activation``, ``temperature``, ``learn_temperature``,
        ``top_k``, ``estimator``, ``n_init``, ``random_state``, ...), the same
        for every K ≥ 2. An int ``random_state`` makes the row for K equal to
        ``MixtureOfExpertsRegressor(K, random_state=...)``. K = 1 is least
        squares whatever the gate (with one expert the gate weight is 1).

    Returns
    -------
    table : DataFrame with one row per K
        Columns ``n_experts``, ``loglik`` (Σ_n log p(y_n | x_n)), ``n_params``
        (free parameters), ``bic``, ``aic``, ``icl``, ``min_expert_size``
        (smallest effective expert size Σ_n r_nk), ``converged``,
        ``degenerate``. ``table.attrs`` holds ``criterion`` and ``chosen``
        (the K minimising it among non-degenerate fits; None if all are).
    estimators : dict of int -> MixtureOfExpertsRegressor
        Only with ``return_estimators=True``.

    Warns
    -----
    Warnings of each fit (ConvergenceWarning, DegenerateFitWarning, ...)
    are re-issued with the K they come from, e.g. ``"n_experts=5: ..."``.

    Raises
    ------
    ValueError
        Unknown criterion, bad ``n_experts``, invalid estimator parameters,
        bad data (NaN, constant columns), or a K with more free parameters
        than samples (the message names K).

    Examples
    --------
    >>> import moelab
    >>> df = moelab.load_dataset("mcycle")
    >>> table = moelab.select_n_experts(df[["times"]], df["accel"], "1-4", random_state=0)  # doctest: +SKIP
    >>> table.attrs["chosen"]  # doctest: +SKIP
    4
    """
    from .estimator import MixtureOfExpertsRegressor
    from .persistence import fitted_estimator

    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    ks = parse_experts(n_experts)
    Xa, ya, names = _validated_xy(X, y)
    from .gates import gate_spec

    n, d = Xa.shape
    for K in ks:  # every K's settings and parameter count checked before any fit runs
        if K > 1:
            try:
                kw = MixtureOfExpertsRegressor(K, **params)._fit_kwargs()
            except ValueError as exc:
                raise ValueError(f"n_experts={K}: {exc}") from exc
            n_params = gate_spec(kw["gate"], kw["gate_options"], n_experts=K).n_free_parameters(K, d) + K * (d + 2)
        else:
            n_params = d + 2
        if n < n_params:
            raise ValueError(f"n_experts={K}: {n} samples are fewer than the {n_params} free parameters of a "
                             f"{K}-expert model with {d} feature(s); use fewer experts or more data")
    x, yt = torch.tensor(Xa), torch.tensor(ya)
    rows, estimators = [], {}
    for K in ks:
        if K == 1:
            from ._scaling import Scaling

            Scaling.fit(x.unsqueeze(0), yt.unsqueeze(0), center_x=True)  # constant columns / y: its clear errors
            model = linear_regression_model(Xa, ya)
            rows.append(_row(1, model, x, yt, converged=True, degenerate=False, sizes=[ya.shape[0]]))
            if return_estimators:
                estimators[1] = fitted_estimator(
                    MixtureOfExpertsRegressor(1, **{k: v for k, v in params.items() if k not in _GATE_PARAMS}),
                    model, loglik=rows[-1]["loglik"], n_iter=1, converged=True,
                    expert_size=np.array([float(ya.shape[0])]), n_samples=ya.shape[0], feature_names=names)
            continue
        est = MixtureOfExpertsRegressor(K, **params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                est.fit(pd.DataFrame(Xa, columns=names) if names else Xa, ya)
            except ValueError as exc:
                raise ValueError(f"n_experts={K}: {exc}") from exc
        for w in caught:
            warnings.warn(f"n_experts={K}: {w.message}", w.category, stacklevel=2)
        rows.append(_row(K, est.model_, x, yt, converged=est.converged_, degenerate=bool(est.result_.degenerate),
                         sizes=est.expert_size_))
        estimators[K] = est
    table = pd.DataFrame(rows, columns=list(_COLUMNS))
    table.attrs.update(criterion=criterion, chosen=choose_n_experts(table, criterion))
    if return_estimators:
        return table, estimators
    return table


def choose_n_experts(table, criterion: str = "bic"):
    """The K with the lowest ``criterion`` among fits that did not collapse; ties go to the smaller K.

    Parameters
    ----------
    table : DataFrame
        Columns ``n_experts``, ``criterion`` and (optional) ``degenerate``.
    criterion : {"bic", "aic", "icl"}

    Returns
    -------
    int, or None when every fit collapsed or has a non-finite criterion.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    keep = np.isfinite(table[criterion].to_numpy(dtype=float))
    if "degenerate" in table.columns:
        keep &= ~table["degenerate"].to_numpy(dtype=bool)
    ok = table[keep].sort_values(["n_experts"])
    if ok.empty:
        return None
    return int(ok["n_experts"].iloc[int(np.argmin(ok[criterion].to_numpy()))])
