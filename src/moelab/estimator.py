"""scikit-learn estimator for Gaussian mixtures of experts.

:class:`MixtureOfExpertsRegressor` wraps :func:`moelab.fit_em` (or
:func:`moelab.fit_mle`) behind the scikit-learn regressor API: ``fit`` /
``predict`` (conditional mean E[y | x]) / ``predict_proba`` (gate weights
g(x)) / ``score`` (R², as every scikit-learn regressor) / ``score_samples``
(log p(y | x)) / ``sample`` / ``bic`` / ``aic``, plus ``predict_interval``
(:mod:`moelab.prediction`) and ``save`` / ``load`` (JSON model files,
:mod:`moelab.persistence`).

The model is p(y | x) = Σ_k g_k(x) N(y; a_kᵀx + b_k, ν_k) with the gate chosen
by ``gate`` (see :mod:`moelab.gates`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from .diagnostics import check_finite_predictions
from .encoding import encoding_for, numeric_column
from .em import fit_em
from .gates import gate_spec
from .mle import fit_mle

__all__ = ["MixtureOfExpertsRegressor", "gate_options_from", "set_model_attributes"]


def set_model_attributes(est, model) -> None:
    """Set ``est.model_`` and the fitted parameter attributes from a :class:`moelab.GaussianMoE` (one problem).

    Gate: ``gate_slope_`` (K, d) and ``gate_intercept_`` (K,), or for a gate that models x (Gaussian)
    ``gate_proportions_`` (K,), ``gate_means_`` (K, d), ``gate_covariances_`` (K, d, d); ``temperature_``
    where the gate has one. Experts: ``expert_slope_`` (K, d), ``expert_intercept_``, ``expert_variance_``
    (K,). Arrays are copies. Used by :meth:`MixtureOfExpertsRegressor.fit` and by loading a model file.
    """
    est.model_ = model
    gate = model.gate
    if gate.models_x:
        est.gate_proportions_ = gate.proportions.numpy().copy()
        est.gate_means_ = gate.means.numpy().copy()
        est.gate_covariances_ = gate.covariances.numpy().copy()
    else:
        est.gate_slope_ = gate.slope.numpy().copy()
        est.gate_intercept_ = gate.intercept.numpy().copy()
    if hasattr(gate, "temperature"):
        est.temperature_ = float(gate.temperature)
    est.expert_slope_ = model.experts.slope.numpy().copy()
    est.expert_intercept_ = model.experts.intercept.numpy().copy()
    est.expert_variance_ = model.experts.variance.numpy().copy()


def gate_options_from(gate, *, activation=None, temperature=None, learn_temperature=False, top_k=None,
                      gate_options=None, n_experts=None) -> dict:
    """Validate gate hyper-parameters and build ``gate_options`` for :func:`moelab.fit_em`.

    The family and its options are validated by the gate registry
    (:func:`moelab.gates.gate_spec`), as in ``fit_em`` and the study files.

    Parameters
    ----------
    gate : str
        A registered gate family (:data:`moelab.gates.GATES`).
    activation : str or callable, optional
        Only for ``gate="activation"`` (default there: ``"tanh"``).
    temperature : float, optional
        Fixed τ > 0; only for the temperature and activation gates (default 1).
    learn_temperature : bool, default False
        Estimate τ; only for the temperature and activation gates, and not
        together with ``temperature``.
    top_k : int, optional
        Experts kept per input; required for (and only for) ``gate="topk"``.
    gate_options : dict, optional
        Options of any registered family by name (e.g. of a family added with
        :func:`moelab.gates.register_gate`); not together with the same option
        given as a keyword.
    n_experts : int, optional
        For options bounded by the number of experts (``top_k``).

    Returns
    -------
    dict
        Only the options that were set, validated.

    Raises
    ------
    ValueError
        Unknown gate, an option the gate does not take or outside its
        constraint (τ ≤ 0 or not finite), ``temperature`` together with
        ``learn_temperature``, a required option missing (``topk`` without
        ``top_k``), or an option given twice.
    """
    given = {"activation": activation, "temperature": temperature, "top_k": top_k,
             "learn_temperature": learn_temperature or None}
    opts = dict(gate_options or {})
    twice = sorted(k for k, v in given.items() if v is not None and opts.get(k) is not None)
    if twice:
        raise ValueError(f"{', '.join(twice)} given both as a parameter and in gate_options; give it once")
    opts.update({k: v for k, v in given.items() if v is not None})
    spec = gate_spec(gate, opts, n_experts=n_experts)
    if spec.options.get("temperature") is not None and spec.options.get("learn_temperature"):
        raise ValueError("give either a fixed temperature or learn_temperature=True, not both")
    return dict(spec.options)


def _finite(values: torch.Tensor, x: torch.Tensor, what: str, allow_inf: bool = False) -> np.ndarray:
    """values as numpy; ValueError naming the row where a prediction overflowed (never NaN)."""
    check_finite_predictions(values, x, what, allow_inf=allow_inf)
    return values.numpy()


class MixtureOfExpertsRegressor(RegressorMixin, BaseEstimator):
    """Gaussian mixture of experts regression, p(y | x) = Σ_k g_k(x) N(y; a_kᵀx + b_k, ν_k).

    Parameters
    ----------
    n_experts : int, default 2
        Number of experts K ≥ 1.
    gate : str, default "softmax"
        A registered gate family (see :mod:`moelab.gates`), built in:: softmax(β_1ᵀx + β_0);
        softmax(β_1ᵀx/τ + β_0); softmax(σ(β_1ᵀx)/τ + β_0); top-k sparse softmax;
        "gaussian": g_k(x) ∝ π_k N(x; c_k, Γ_k), a model of (x, y) jointly
        fitted by closed-form EM (estimator "em" only; see ``loglik_`` and :meth:`bic`).
    activation : str or callable, optional
        σ for ``gate="activation"``: "tanh" (default), "sigmoid", "gelu",
        "softplus", "relu", "identity" or a callable.
    temperature : float, optional
        Fixed τ > 0 for the temperature/activation gates (default 1).
    learn_temperature : bool, default False
        Estimate τ (temperature/activation gates). (β_1, τ) is then not
        identifiable — only β_1/τ is.
    top_k : int, optional
        Experts kept per input for ``gate="topk"`` (required there).
    gate_options : dict, optional
        Options of the gate family by name, for any registered family
        (:func:`moelab.gates.register_gate`); the keywords above are shortcuts.
    estimator : {"em", "mle"}, default "em"
        EM (:func:`moelab.fit_em`) or L-BFGS on the log-likelihood
        (:func:`moelab.fit_mle`).
    n_init : int, optional
        Starts run to convergence; the best valid one is kept (default: the
        estimator's own, 160 for EM with init="auto", 10 for MLE).
    n_candidates : int, optional
        EM only: candidates screened by their initial likelihood (see
        :func:`moelab.fit_em`).
    init : {"auto", "kmeans", "random", "segments", "lines"}, default "auto"
        Start strategy.
    max_iter : int, optional
        Maximum iterations (default 2000 for EM, 500 for MLE).
    tol : float, optional
        Convergence tolerance (default 1e-8 on the mean log-likelihood change
        for EM, 1e-10 for MLE).
    random_state : int, numpy RandomState or None, default None
        Seeds the starts. An int gives the same fit as ``fit_em(random_state=int)``.
    compile : {"auto", True, False}, default "auto"
        EM only: run each iteration as one fused pass compiled by
        ``torch.compile`` (see :func:`moelab.fit_em`).
    accelerate : {"squarem", None}, default "squarem"
        EM only: SQUAREM extrapolation (never lowers the log-likelihood), or
        None for plain EM (see :func:`moelab.fit_em`); ignored by ``estimator="mle"``
        (checked as a value all the same). Also the bootstrap refits' setting.
    bootstrap : int, optional
        Refit this many bootstrap resamples (one batched EM call started from the fit,
        :func:`moelab.bootstrap_fit`) for percentile intervals (``confint(method="bootstrap")``).
    bootstrap_kind : {"nonparametric", "parametric"}, default "nonparametric"
        Resample rows, or draw y from the fitted model at the observed x.
    progress : {False, True, "auto"}, default False
        EM only: show the fit's stage and time left on stderr for fits over
        ~2 s (False: silent, as scikit-learn estimators; "auto": only when
        stderr is a terminal). See :mod:`moelab.progress`.

    Attributes
    ----------
    model_ : moelab.GaussianMoE
        The fitted model (original units).
    result_ : moelab.EMResult
        Everything the fitting function returned.
    loglik_ : float
        Training log-likelihood Σ_n log p(y_n | x_n); for ``gate="gaussian"``
        (a model of x too) the joint Σ_n log p(x_n, y_n) that its EM maximises.
    x_loglik_ : float
        ``gate="gaussian"`` only: Σ_n log p(x_n), so ``loglik_ - x_loglik_``
        is the conditional log-likelihood, comparable with other gates' ``loglik_``.
    n_iter_ : int
    converged_ : bool
    history_ : ndarray of shape (n_steps,)
        Log-likelihood after each iteration of the selected start.
    gate_slope_ : ndarray of shape (n_experts, n_features_in_)
        β_1 (the last expert is the reference, zero for softmax-type gates).
    gate_intercept_ : ndarray of shape (n_experts,)
        β_0. (Not for ``gate="gaussian"``.)
    gate_proportions_, gate_means_, gate_covariances_ : ndarrays of shape (n_experts,), (n_experts, n_features_in_), (n_experts, n_features_in_, n_features_in_)
        π_k, c_k, Γ_k of ``gate="gaussian"`` (X | k ~ N(c_k, Γ_k), P(k) = π_k), in units of X.
    temperature_ : float
        τ; only for the temperature and activation gates.
    expert_slope_ : ndarray of shape (n_experts, n_features_in_)
        a_k.
    expert_intercept_ : ndarray of shape (n_experts,)
        b_k.
    expert_variance_ : ndarray of shape (n_experts,)
        ν_k.
    expert_size_ : ndarray of shape (n_experts,)
        Effective sizes Σ_n P(k | x_n, y_n) on the training data.
    standard_errors_ : dict
        Standard errors from the observed information, in the structure of the parameters:
        ``gate`` (``slope`` (K, d), ``intercept`` (K,), ``temperature``), ``experts``
        (``slope``, ``intercept``, ``variance``, ``sd``), ``expert_size``; None where undefined
        (reference expert, fixed or unidentified τ, an unbounded hard-switch slope; see
        :mod:`moelab.inference`).
    inference_ : moelab.inference.WaldInference
        Everything behind ``standard_errors_``: covariance, status, switch points.
    bootstrap_ : moelab.bootstrap.BootstrapResult
        Only with ``bootstrap``.
    n_features_in_ : int
        Columns of the design: the input columns, with each categorical one replaced by
        its dummies (so the slopes have one entry per design column).
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when X was a DataFrame with string column names: the design column names
        (``occupation[sales]`` for a dummy).
    encoding_ : moelab.encoding.DesignEncoding or None
        How the input columns became the design (None: X was numeric); its ``to_dict()``
        is JSON.

    Notes
    -----
    ``score`` is R² of the conditional mean (the scikit-learn regressor
    convention); the mean log-likelihood is ``score_samples(X, y).mean()``.
    Unlike density estimators, ``score_samples`` needs y.

    Examples
    --------
    >>> from moelab import load_dataset
    >>> df = load_dataset("mcycle")
    >>> reg = MixtureOfExpertsRegressor(3, random_state=0).fit(df[["times"]], df["accel"])
    >>> reg.predict_proba(df[["times"]]).shape
    (133, 3)
    """

    def __init__(self, n_experts=2, *, gate="softmax", activation=None, temperature=None, learn_temperature=False,
                 top_k=None, gate_options=None, estimator="em", n_init=None, n_candidates=None, init="auto", max_iter=None, tol=None,
                 random_state=None, compile="auto", bootstrap=None, bootstrap_kind="nonparametric", progress=False,
                 accelerate="squarem"):
        self.n_experts = n_experts
        self.gate = gate
        self.activation = activation
        self.temperature = temperature
        self.learn_temperature = learn_temperature
        self.top_k = top_k
        self.gate_options = gate_options
        self.estimator = estimator
        self.n_init = n_init
        self.n_candidates = n_candidates
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.compile = compile
        self.bootstrap = bootstrap
        self.bootstrap_kind = bootstrap_kind
        self.progress = progress
        self.accelerate = accelerate

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------------------ fit
    def _fit_kwargs(self) -> dict:
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, numbers.Integral) or self.n_experts < 1:
            raise ValueError(f"n_experts must be an integer >= 1, got {self.n_experts!r}")
        if self.estimator not in ("em", "mle"):
            raise ValueError(f"estimator must be 'em' or 'mle', got {self.estimator!r}")
        b = self.bootstrap
        if b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 2):
            raise ValueError(f"bootstrap must be None or an integer >= 2 (resamples, e.g. 200), got {b!r}")
        if self.bootstrap_kind not in ("nonparametric", "parametric"):
            raise ValueError(f"bootstrap_kind must be 'nonparametric' or 'parametric', got {self.bootstrap_kind!r}")
        kw = dict(
            gate=self.gate,
            gate_options=gate_options_from(self.gate, activation=self.activation, temperature=self.temperature,
                                           learn_temperature=self.learn_temperature, top_k=self.top_k,
                                           gate_options=self.gate_options, n_experts=int(self.n_experts)),
            init=self.init,
        )
        if self.n_init is not None:
            kw["n_init"] = self.n_init
        if self.n_candidates is not None:
            if self.estimator != "em":
                raise ValueError("n_candidates applies to estimator='em' only; leave it None for 'mle'")
            kw["n_candidates"] = self.n_candidates
        if self.max_iter is not None:
            kw["max_iter"] = self.max_iter
        if self.tol is not None:
            kw["tol"] = self.tol
        if self.compile != "auto":
            if self.estimator != "em":
                raise ValueError("compile applies to estimator='em' only; leave it 'auto' for 'mle'")
            kw["compile"] = self.compile
        if self.accelerate not in ("squarem", None):
            raise ValueError(f"accelerate must be 'squarem' (SQUAREM extrapolation) or None (plain EM), "
                             f"got {self.accelerate!r}")
        if self.accelerate != "squarem" and self.estimator == "em":  # MLE has no EM iterations: ignored there
            kw["accelerate"] = self.accelerate
        if self.progress is not False:
            if self.estimator != "em":
                raise ValueError("progress applies to estimator='em' only; leave it False for 'mle'")
            kw["progress"] = self.progress
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool):
            kw["random_state"] = int(rs)
        else:
            kw["random_state"] = int(check_random_state(rs).randint(2**31 - 1))
        return kw

    def fit(self, X, y):
        """Fit the mixture of experts.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or DataFrame
            A DataFrame may hold categorical columns (``category``, ``bool`` or text dtype):
            they are one-hot encoded with the first level dropped (:mod:`moelab.encoding`),
            and every later call takes a DataFrame with the same columns.
        y : array-like of shape (n_samples,)

        Returns
        -------
        self

        Raises
        ------
        ValueError
            NaN/inf, mismatched lengths, constant columns, fewer samples than
            free parameters, invalid hyper-parameters, or a value that is not a
            number in a numeric column (its index label and value named).
        """
        kw = self._fit_kwargs()
        encoding = encoding_for(X)  # None unless X is a DataFrame with non-numeric columns
        if encoding is not None:
            X = encoding.transform(X)
        if isinstance(y, pd.Series):
            y = numeric_column(y, str(y.name), role="response")
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True)
        self.encoding_ = encoding
        if hasattr(self, "feature_names_in_"):  # for the warnings' messages
            kw["feature_names"] = [str(c) for c in self.feature_names_in_]
        fit = fit_em if self.estimator == "em" else fit_mle
        res = fit(X, y, int(self.n_experts), **kw)
        self.result_ = res
        model = res.model
        self.loglik_ = float(res.loglik)
        self.n_iter_ = int(res.n_iter)
        self.converged_ = bool(res.converged)
        self.history_ = res.history.numpy().copy()
        set_model_attributes(self, model)
        if model.gate.models_x:  # the x part of the joint log-likelihood
            self.x_loglik_ = float(res.x_loglik)
        self.expert_size_ = res.expert_size.numpy().copy()
        self._infer(X, y, kw)
        return self

    def _infer(self, X, y, kw) -> None:
        """Standard errors (always) and the bootstrap (if asked) at the fit."""
        from .bootstrap import bootstrap_fit
        from .inference import wald_inference

        names = getattr(self, "feature_names_in_", None)
        if not hasattr(self.model_.gate, "slope"):  # a gate that models x (Gaussian): no Wald/bootstrap code yet
            if self.bootstrap is not None:
                raise ValueError(f"bootstrap is not available for gate={self.gate!r} yet; drop bootstrap=")
            self.inference_ = self.standard_errors_ = None
            self.__dict__.pop("bootstrap_", None)
            return
        self.inference_ = wald_inference(self.model_, X, y, feature_names=None if names is None else list(names))
        self.standard_errors_ = self.inference_.as_params()
        if self.bootstrap is None:
            self.__dict__.pop("bootstrap_", None)
            return
        self.bootstrap_ = bootstrap_fit(self.model_, X, y, self.bootstrap, kind=self.bootstrap_kind,
                                    gate_options=kw["gate_options"], random_state=kw["random_state"],
                                    feature_names=None if names is None else list(names),
                                    **{k: kw[k] for k in ("max_iter", "tol", "compile", "accelerate")
                                       if k in kw and self.estimator == "em"})

    def confint(self, level=0.95, method="wald"):
        """Confidence intervals of the free parameters as a DataFrame.

        Parameters
        ----------
        level : float in (0, 1), default 0.95
        method : {"wald", "bootstrap"}, default "wald"
            "wald": θ̂ ± z·se from the observed information (columns ``parameter``, ``estimate``,
            ``se``, ``lower``, ``upper``, ``status``; hard-switch points as extra rows, see
            :meth:`moelab.inference.WaldInference.confint`). "bootstrap": percentile intervals of
            the ``bootstrap`` refits (``se`` = bootstrap sd).

        Returns
        -------
        pandas.DataFrame, one row per parameter.

        Raises
        ------
        ValueError
            Unknown method, ``level`` outside (0, 1), or "bootstrap" without ``bootstrap=B``.
        """
        check_is_fitted(self, "inference_")
        if self.inference_ is None:
            raise NotImplementedError(f"standard errors are not available for gate={self.gate!r} yet "
                                      "(standard_errors_ is None)")
        if method == "wald":
            return self.inference_.confint(level)
        if method == "bootstrap":
            if not hasattr(self, "bootstrap_"):
                raise ValueError("method='bootstrap' needs the estimator fitted with bootstrap=B (e.g. 200)")
            return self.bootstrap_.confint(level)
        raise ValueError(f"method must be 'wald' or 'bootstrap', got {method!r}")

    # ------------------------------------------------------------ inference
    def _design(self, X):
        """X through the fitted encoding (categorical columns → dummies), if there is one."""
        encoding = getattr(self, "encoding_", None)
        return X if encoding is None else encoding.transform(X)

    def _X(self, X) -> torch.Tensor:
        check_is_fitted(self, "model_")
        X = self._design(X)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return torch.tensor(X)  # a copy: X may be a read-only view of the caller's data

    def _Xy(self, X, y):
        check_is_fitted(self, "model_")
        X = self._design(X)
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=True, reset=False)
        return torch.tensor(X), torch.tensor(np.asarray(y, dtype=np.float64))

    def predict(self, X) -> np.ndarray:
        """Conditional mean E[y | x] = Σ_k g_k(x)(a_kᵀx + b_k).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        x = self._X(X)
        return _finite(self.model_.mean(x), x, "predict: E[y | x]")

    def predict_variance(self, X) -> np.ndarray:
        """Conditional variance Var[y | x] (law of total variance).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        x = self._X(X)
        return _finite(self.model_.variance(x), x, "predict_variance: Var[y | x]")

    def predict_proba(self, X) -> np.ndarray:
        """Gate weights g(x): the prior probability of each expert given x.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_experts), float64; rows sum to 1.
        """
        x = self._X(X)
        return _finite(self.model_.gate_weights(x), x, "predict_proba: g(x)")

    def predict_expert(self, X, y=None) -> np.ndarray:
        """Most probable expert: argmax of the gate g(x), or of the posterior P(k | x, y) if y is given.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,), optional

        Returns
        -------
        ndarray of shape (n_samples,), int64
        """
        if y is None:
            return self.predict_proba(X).argmax(-1)
        x, y = self._Xy(X, y)
        return _finite(self.model_.responsibilities(x, y), x, "predict_expert: P(k | x, y)").argmax(-1)

    def score_samples(self, X, y) -> np.ndarray:
        """Log conditional density log p(y_n | x_n) of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        x, y = self._Xy(X, y)
        return _finite(self.model_.log_prob(x, y), x, "score_samples: log p(y | x)", allow_inf=True)

    def sample(self, X, random_state=None) -> np.ndarray:
        """Draw one y ~ p(y | x) for every row of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        random_state : int, numpy RandomState or None

        Returns
        -------
        ndarray of shape (n_samples,), float64
        """
        x = self._X(X)
        _finite(self.model_.gate_weights(x), x, "sample: g(x)")
        seed = int(check_random_state(random_state).randint(2**31 - 1))
        return self.model_.sample(x, torch.Generator().manual_seed(seed)).numpy()

    def n_free_parameters(self, conditional: bool = False) -> int:
        """Free parameters p of the fitted model (used by :meth:`bic` and :meth:`aic`).

        Parameters
        ----------
        conditional : bool, default False
            For a gate that models x (``gate="gaussian"``): count only the
            parameters p(y | x) identifies, K(d + 2) experts + (K − 1)(1 + d + d(d+1)/2)
            gate (its logits are quadratic in x, defined up to a common quadratic),
            instead of the joint model's (x-model included). Same count otherwise.
        """
        check_is_fitted(self, "model_")
        gate = self.model_.gate
        if conditional and gate.models_x:
            return gate.n_conditional_parameters() + self.model_.experts.n_free_parameters()
        return self.model_.n_free_parameters()

    def _ic_loglik(self, X, y, conditional):
        """(total log-likelihood, n) for the information criteria: log p(x, y) for gates that model x
        unless ``conditional``, else log p(y | x)."""
        ll = self.score_samples(X, y)
        total = float(ll.sum())
        if self.model_.gate.models_x and not conditional:
            total += float(self.model_.gate.log_marginal(self._X(X)).sum())
        return total, ll.shape[0]

    def bic(self, X, y, conditional: bool = False) -> float:
        """Bayesian information criterion −2 log L + p log n on (X, y); lower is better.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        conditional : bool, default False
            Only for ``gate="gaussian"``, whose fit is a model of (x, y): by
            default L is the joint likelihood p(x, y) and p counts the x-model
            (comparable with a conditional fit only after adding a model of x
            to that fit); ``conditional=True`` uses L = p(y | x) and the
            parameters p(y | x) identifies (see :meth:`n_free_parameters`),
            comparable with a softmax-type fit's BIC on the same data. The
            Gaussian fit maximised the joint likelihood, not this one.

        Returns
        -------
        float
        """
        ll, n = self._ic_loglik(X, y, conditional)
        return float(-2.0 * ll + self.n_free_parameters(conditional) * math.log(n))

    def aic(self, X, y, conditional: bool = False) -> float:
        """Akaike information criterion −2 log L + 2p on (X, y); lower is better.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        conditional : bool, default False
            As in :meth:`bic`.

        Returns
        -------
        float
        """
        ll, _ = self._ic_loglik(X, y, conditional)
        return float(-2.0 * ll + 2 * self.n_free_parameters(conditional))

    # ------------------------------------------------- intervals and model files
    def predict_interval(self, X, level: float = 0.9):
        """Equal-tailed prediction interval of y given x at probability ``level``.

        [Q((1 − level)/2 | x), Q((1 + level)/2 | x)] with Q the quantile of the
        mixture p(y | x), found by root-finding on its CDF
        (:func:`moelab.prediction.prediction_interval`; the highest-density
        region of a multimodal mixture may be a union of intervals, this is
        the single equal-tailed one).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        level : float, default 0.9
            0 < level < 1.

        Returns
        -------
        (lower, upper) : tuple of ndarray of shape (n_samples,)

        Raises
        ------
        ValueError
            level outside (0, 1), or inputs where the model overflows.
        """
        from .prediction import prediction_interval

        return prediction_interval(self.model_, self._X(X), level)

    def save(self, path, *, response_name=None, feature_names=None):
        """Write the fitted model to ``path`` as a JSON model file (never pickle).

        Format: :mod:`moelab.persistence` (gate family and options, every
        parameter in original units, feature and response names, moelab and
        format versions, and the encoding ``encoding_`` of categorical
        inputs). :meth:`load` reads it back; the loaded estimator predicts
        identically from the same raw columns.

        Parameters
        ----------
        path : str or Path
        response_name : str, optional
            Name of y recorded in the file (default "y").
        feature_names : sequence of str, optional
            Default ``feature_names_in_`` (fitted on a DataFrame) or x0, x1, ...; with
            categorical inputs the encoding names the design columns and they cannot be renamed.

        Returns
        -------
        pathlib.Path

        Raises
        ------
        ValueError
            Not fitted, or a setting JSON cannot hold (a callable activation).
        """
        from .persistence import save_model

        check_is_fitted(self, "model_")
        return save_model(self, path, response_name=response_name, feature_names=feature_names)

    @classmethod
    def load(cls, path) -> "MixtureOfExpertsRegressor":
        """A fitted estimator from a model file written by :meth:`save` or ``moelab fit --out``.

        Raises
        ------
        moelab.ModelFileError (a ValueError)
            Missing or non-JSON file, another format version, or a file edited
            by hand into an invalid state (missing keys, wrong shapes or
            types, NaN); the message names the key.
        """
        from .persistence import load_estimator

        return load_estimator(path, cls)
