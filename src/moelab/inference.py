"""Standard errors, Wald confidence intervals and hard gate switches of a fitted mixture of experts.

**Observed information.** For the exact log-likelihood
ℓ(θ) = Σ_n log Σ_k g_k(x_n) N(y_n; a_kᵀx_n + b_k, σ_k²) the observed
information is I(θ̂) = −∇²ℓ(θ̂) and the Wald covariance I(θ̂)⁻¹ (Efron & Hinkley
1978; for mixtures of experts Jordan & Jacobs 1994, McLachlan & Peel 2000
§2.15). The Hessian is exact (autograd), taken in standardised units
x' = (x − m_x)/s_x, y' = (y − m_y)/s_y where it is well conditioned whatever
the units (mcycle's gate slope is 134 per ms), and mapped to the original units
by the delta method Cov(θ̂) = J I'(θ̂')⁻¹ Jᵀ, J = ∂θ/∂θ'. The map θ' → θ is affine
for every gate without an estimated temperature, so this is exact, not an
approximation.

**Reported parameterisation** (original units of x and y), in this order:
for each non-reference expert k = 1..K−1 the gate intercept β_{0k} and slopes
β_{1k}; the temperature τ when it is estimated; for each expert k = 1..K the
expert intercept b_k, slopes a_k and standard deviation σ_k. The reference
expert's gate parameters are fixed at 0, a fixed τ is not estimated: both have
no standard error (None / NaN). An estimated τ that the gate does not identify
on these data (:func:`moelab.gates.temperature_identified`: σ positively
homogeneous, e.g. the temperature gate or identity/relu activations) has none
either; the other standard errors are then conditional on τ (only β_1/τ is
identified, so β_1's scale is the one τ sets). Var(σ_k²) follows by the delta
method, se(σ²) = 2σ·se(σ).

**Hard switches (near-separation).** When the data do not bound a gate's
sharpness — no sample lies where the gate switches between two experts (a
step in y, mcycle's 3-expert fit with gate slope 134 per ms) — the likelihood
keeps increasing as the slope grows, EM stops wherever ``tol`` says, and the
information in that direction is near zero: the slope's Wald standard error is
meaningless. It is the mixture-of-experts form of separation in logistic
regression (R's glm: "fitted probabilities numerically 0 or 1 occurred";
Albert & Anderson 1984). Test, for each non-reference expert k and each other
expert j: scale the logit difference l_k − l_j by c → ∞ about its zero (θ_k ←
θ_j + c(θ_k − θ_j), so the switch point stays put; for gates whose logits are
not linear, scale β_{1k}). If the log-likelihood at c = 10⁶ is within
χ²₁(0.95)/2 = 1.92 of the maximum, the 95% profile-likelihood interval of the
sharpness is unbounded: the slope and intercept of expert k are reported as
*unbounded* (no standard error), a :class:`SeparationWarning` is emitted, and
the switch point is reported instead: in 1-d the x where the two logits are
equal, x* = −(β_{0k} − β_{0j})/(β_{1k} − β_{1j}); for d > 1 the hyperplane
u·x = t with unit normal u = Δβ_1/‖Δβ_1‖ and offset t = −Δβ_0/‖Δβ_1‖. Its
standard error is the delta method on t with the sharpness (β_{1k}) held at the
fit, which the data cannot bound; all other standard errors of that fit are
conditional on it too. ``data_interval`` gives the two nearest samples on
either side (1-d): a hard switch is located only up to that gap.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ._scaling import Scaling
from .fitcore import prepare_xy
from .gates import temperature_identified
from .model import GaussianMoE

__all__ = ["SeparationWarning", "ParameterLayout", "SwitchPoint", "WaldInference", "wald_inference",
           "SEPARATION_GAP", "HARD_SWITCH_SCALE"]

#: log-likelihood gap χ²₁(0.95)/2 within which an infinitely sharp switch counts as "not excluded by the data"
SEPARATION_GAP = 0.5 * 3.841458820694124
#: the factor c standing in for c → ∞ in the hard-switch test (logits then differ by ≥ 10⁶·|l_k − l_j|)
HARD_SWITCH_SCALE = 1e6


class SeparationWarning(UserWarning):
    """A gate switch is sharper than the data can resolve: its slope is unbounded (see :mod:`moelab.inference`)."""


class ParameterLayout:
    """The reported free parameters of a K-expert, d-feature model as one flat vector of length ``p``.

    Order: for k = 1..K−1 gate intercept, gate slopes (d); the temperature if
    ``temperature`` (estimated τ); for k = 1..K expert intercept, expert slopes
    (d), expert sd.

    Parameters
    ----------
    n_experts, n_features : int
    temperature : bool
        Whether the gate estimates τ (``learn_temperature``).
    feature_names : sequence of str of length n_features, optional
        Default ``x0``, ``x1``, … (scikit-learn's convention).
    """

    def __init__(self, n_experts: int, n_features: int, temperature: bool, feature_names: Optional[Sequence[str]] = None):
        K, d = int(n_experts), int(n_features)
        names = [f"x{j}" for j in range(d)] if feature_names is None else [str(c) for c in feature_names]
        if len(names) != d:
            raise ValueError(f"feature_names has {len(names)} names for {d} features; give one per column of x")
        self.n_experts, self.n_features, self.temperature, self.feature_names = K, d, bool(temperature), names
        self.n_gate = (K - 1) * (d + 1)
        self.p = self.n_gate + int(self.temperature) + K * (d + 2)
        self.tau_index = self.n_gate if self.temperature else None
        e0 = self.n_gate + int(self.temperature)
        self.names = ([f"gate[{k + 1}] {t}" for k in range(K - 1) for t in ["intercept"] + names]
                      + (["temperature"] if self.temperature else [])
                      + [f"expert[{k + 1}] {t}" for k in range(K) for t in ["intercept"] + names + ["sd"]])
        # where each structured entry sits in the vector
        self.gate_intercept = [k * (d + 1) for k in range(K - 1)]
        self.gate_slope = [[k * (d + 1) + 1 + j for j in range(d)] for k in range(K - 1)]
        self.expert_intercept = [e0 + k * (d + 2) for k in range(K)]
        self.expert_slope = [[e0 + k * (d + 2) + 1 + j for j in range(d)] for k in range(K)]
        self.expert_sd = [e0 + k * (d + 2) + d + 1 for k in range(K)]

    @classmethod
    def of(cls, model: GaussianMoE, feature_names=None) -> "ParameterLayout":
        """The layout of ``model`` (its experts, features and whether τ is estimated)."""
        return cls(model.n_experts, model.n_features, bool(getattr(model.gate, "learn_temperature", False)), feature_names)

    def vector(self, model: GaussianMoE) -> torch.Tensor:
        """Model of batch shape (R,) → parameters (R, p) in this layout (differentiable)."""
        g, e = model.gate, model.experts
        R, K = g.slope.shape[0], self.n_experts
        parts = [torch.cat([g.intercept[:, :K - 1, None], g.slope[:, :K - 1]], -1).reshape(R, -1)]
        if self.temperature:
            parts.append(g.temperature.reshape(R, 1))
        parts.append(torch.cat([e.intercept[..., None], e.slope, e.variance.sqrt()[..., None]], -1).reshape(R, -1))
        return torch.cat(parts, -1)

    def model(self, template: GaussianMoE, v: torch.Tensor) -> GaussianMoE:
        """Inverse of :meth:`vector`: ``template`` (batch (R,)) with the parameters v (R, p)."""
        K, d, R = self.n_experts, self.n_features, v.shape[0]
        gp = v[:, :self.n_gate].reshape(R, K - 1, d + 1)
        zero = torch.zeros(R, 1, d + 1, dtype=v.dtype, device=v.device)
        gp = torch.cat([gp, zero], 1)
        new = {"slope": gp[..., 1:], "intercept": gp[..., 0]}
        if self.temperature:
            new["temperature"] = v[:, self.tau_index]
        gate = template.gate.replace(**new)
        ep = v[:, self.n_gate + int(self.temperature):].reshape(R, K, d + 2)
        experts = template.experts.map_tensors(lambda t: t)  # a copy of the same kind, then its parameters
        experts.slope, experts.intercept, experts.variance = ep[..., 1:d + 1], ep[..., 0], ep[..., d + 1].square()
        return GaussianMoE(gate, experts)

    def structured(self, values, *, sd_estimate=None) -> dict:
        """A flat vector (p,) → the structure of a fit's ``params``, None where there is no entry.

        Keys: ``gate`` (``slope`` (K, d), ``intercept`` (K,), ``temperature`` if estimated),
        ``experts`` (``slope`` (K, d), ``intercept``, ``variance``, ``sd`` (K,)), ``expert_size``
        (K Nones). The reference expert's gate entries are None; so are non-finite values.
        ``values`` are estimates (``variance`` = sd²), or standard errors of the estimates
        ``sd_estimate`` (p,) (then se(σ²) = 2σ·se(σ), the delta method).
        """
        K, d = self.n_experts, self.n_features
        v = [float(x) if math.isfinite(float(x)) else None for x in np.asarray(values, dtype=float)]
        gate = {"slope": [[v[i] for i in self.gate_slope[k]] for k in range(K - 1)] + [[None] * d],
                "intercept": [v[i] for i in self.gate_intercept] + [None]}
        if self.temperature:
            gate["temperature"] = v[self.tau_index]
        sd = [v[i] for i in self.expert_sd]
        if sd_estimate is None:
            var = [None if s is None else s * s for s in sd]
        else:
            est = np.asarray(sd_estimate, dtype=float)
            var = [None if s is None else 2.0 * float(est[i]) * s for s, i in zip(sd, self.expert_sd)]
        experts = {"slope": [[v[i] for i in self.expert_slope[k]] for k in range(K)],
                   "intercept": [v[i] for i in self.expert_intercept], "variance": var, "sd": sd}
        return {"gate": gate, "experts": experts, "expert_size": [None] * K}


@dataclass
class SwitchPoint:
    """Where the gate switches between ``expert`` and ``versus`` as a hard step (1-based expert numbers).

    Attributes
    ----------
    expert, versus : int
        The experts whose gate logits are equal on the switch (``expert`` is the one with the unbounded slope).
    normal : list of float, length n_features
        Unit normal u of the hyperplane u·x = ``offset`` (in 1-d: the sign of the slope difference).
    offset : float
        t in u·x = t; in 1-d ``location`` = t·u.
    location : float or None
        In 1-d the switch point x* (original units of x); None for d > 1.
    se : float
        Standard error of ``offset`` (and of ``location`` in 1-d), delta method,
        conditional on the sharpness (see the module notes).
    data_interval : tuple of float or None
        In 1-d: the nearest sample x on either side of x* (None on a side without samples).
    likelihood_interval : tuple of float
        95% likelihood interval of ``location`` (1-d; of ``offset`` for d > 1) for an infinitely sharp switch, the other
        parameters held at the fit: the samples' projections u·x_n bounding the contiguous switch
        positions around the fit whose log-likelihood is within 1.92 of the fit's (±inf where no
        sample bounds it).
    loglik_gap : float
        ℓ(infinitely sharp switch) − ℓ̂ (≥ −1.92; > 0: the fit had not reached the limit).
    slope : list of float
        The fitted slope difference β_{1k} − β_{1j} (original units), which the data do not bound.
    """

    expert: int
    versus: int
    normal: list
    offset: float
    location: Optional[float]
    se: float
    data_interval: Optional[tuple]
    likelihood_interval: tuple
    loglik_gap: float
    slope: list

    def as_dict(self) -> dict:
        """JSON-ready (non-finite numbers → None)."""
        f = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
        return {"expert": self.expert, "versus": self.versus, "location": f(self.location), "se": f(self.se),
                "normal": [f(u) for u in self.normal], "offset": f(self.offset),
                "data_interval": None if self.data_interval is None else [f(v) for v in self.data_interval],
                "likelihood_interval": [f(v) for v in self.likelihood_interval],
                "loglik_gap": f(self.loglik_gap), "slope": [f(s) for s in self.slope]}


@dataclass
class WaldInference:
    """Result of :func:`wald_inference` (leading dimensions = the model's batch shape ``batch``).

    Attributes
    ----------
    layout : ParameterLayout
        Parameter names and order (``layout.names``, length p).
    estimate : ndarray of shape batch + (p,)
        θ̂ in the reported parameterisation, original units.
    se : ndarray of shape batch + (p,)
        Standard errors; NaN where undefined (``status`` says why).
    covariance : ndarray of shape batch + (p, p)
        Wald covariance in original units (rows/columns of parameters without an SE are NaN).
    status : ndarray of str, shape batch + (p,)
        "estimated", "unbounded" (hard switch), "not identified" (τ), "no information" (the
        likelihood does not depend on it locally, e.g. the gate of a top-1 gate), "not a maximum"
        (the information is not positive definite there: the fit is not at a local maximum).
    switch_points : list (per problem, flattened batch) of list of SwitchPoint
    min_eigenvalue : ndarray of shape batch
        Smallest eigenvalue of the information over the estimated parameters in correlation form
        D^-½ I D^-½ (D its diagonal; unit-free, 1 for uncorrelated estimates, → 0 near singular).
    temperature : float or None
        A fixed τ of the gate (reported, no SE); None otherwise.
    """

    layout: ParameterLayout
    estimate: np.ndarray
    se: np.ndarray
    covariance: np.ndarray
    status: np.ndarray
    switch_points: list
    min_eigenvalue: np.ndarray
    batch: tuple = ()
    temperature: Optional[float] = None
    warnings: list = field(default_factory=list)

    def _one(self, arr, index):
        if self.batch == ():
            return arr
        return arr.reshape(-1, *arr.shape[len(self.batch):])[index]

    def confint(self, level: float = 0.95, *, index: int = 0):
        """Wald intervals θ̂ ± z_{(1+level)/2}·se as a DataFrame (one problem).

        Parameters
        ----------
        level : float in (0, 1), default 0.95
        index : int, default 0
            Which problem of a batched result (flattened batch order).

        Returns
        -------
        pandas.DataFrame with columns ``parameter``, ``estimate``, ``se``, ``lower``, ``upper``, ``status``:
        one row per free parameter, then one row per hard-switch point (``parameter`` "gate[k] switch (x)"
        in 1-d, "gate[k] switch offset" for d > 1), whose ``lower``/``upper`` are its 95% likelihood
        interval (:class:`SwitchPoint`; the delta-method ``se`` is not valid for a hard switch).
        An unbounded slope has se NaN and its interval open on the side it grows to (±inf), NaN on
        the other; an unbounded intercept has NaN bounds.

        Raises
        ------
        ValueError
            ``level`` not in (0, 1).
        """
        import pandas as pd
        from scipy.stats import norm

        z = _z(level, norm)
        est, se, status = self._one(self.estimate, index), self._one(self.se, index), self._one(self.status, index)
        lower, upper = est - z * se, est + z * se
        lay = self.layout
        for k in range(lay.n_experts - 1):
            for i in lay.gate_slope[k]:
                if status[i] == "unbounded":
                    lower[i], upper[i] = (np.nan, np.inf) if est[i] > 0 else (-np.inf, np.nan)
        rows = pd.DataFrame({"parameter": lay.names, "estimate": est, "se": se, "lower": lower, "upper": upper,
                             "status": status})
        sw = self.switch_points[index]
        sw = [s for s in sw if s.normal]
        if sw:
            extra = []
            for s in sw:
                name = (f"gate[{s.expert}] switch ({lay.feature_names[0]})" if s.location is not None
                        else f"gate[{s.expert}] switch offset")
                v = s.location if s.location is not None else s.offset
                lo, hi = s.likelihood_interval
                extra.append({"parameter": name, "estimate": v, "se": s.se, "lower": lo, "upper": hi,
                              "status": f"switch to expert {s.versus}; likelihood interval"})
            rows = pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)
        return rows

    def as_params(self, *, index: int = 0) -> dict:
        """The standard errors in the structure of the fit's parameters (None where undefined; one problem).

        Keys as a fit report's ``params``: ``gate`` (``slope`` (K, d), ``intercept`` (K,),
        ``temperature`` if the gate has one), ``experts`` (``slope``, ``intercept``, ``variance``, ``sd``),
        ``expert_size`` (all None: not a parameter).
        """
        est, se = self._one(self.estimate, index), self._one(self.se, index)
        out = self.layout.structured(se, sd_estimate=est)
        if self.temperature is not None and "temperature" not in out["gate"]:
            out["gate"]["temperature"] = None
        return out

    def status_params(self, *, index: int = 0) -> dict:
        """What each parameter's standard error is, in the structure of the fit's parameters.

        "estimated", "unbounded", "not identified", "not a maximum"; "reference" (the reference
        expert's gate parameters, fixed at 0), "fixed" (a fixed τ), "not a parameter" (expert sizes).
        """
        lay, st = self.layout, list(self._one(self.status, index))
        K, d = lay.n_experts, lay.n_features
        gate = {"slope": [[st[i] for i in lay.gate_slope[k]] for k in range(K - 1)] + [["reference"] * d],
                "intercept": [st[i] for i in lay.gate_intercept] + ["reference"]}
        if lay.temperature:
            gate["temperature"] = st[lay.tau_index]
        elif self.temperature is not None:
            gate["temperature"] = "fixed"
        sd = [st[i] for i in lay.expert_sd]
        experts = {"slope": [[st[i] for i in lay.expert_slope[k]] for k in range(K)],
                   "intercept": [st[i] for i in lay.expert_intercept], "variance": sd, "sd": sd}
        return {"gate": gate, "experts": experts, "expert_size": ["not a parameter"] * K}


def _z(level, norm) -> float:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(norm.ppf(0.5 + level / 2))


def _flat(model: GaussianMoE):
    """Model of any batch shape → batch (R,)."""
    nb = len(model.batch_shape)
    if nb == 0:
        return model.gate.map_tensors(lambda t: t.unsqueeze(0)), model.experts.map_tensors(lambda t: t.unsqueeze(0))
    return (model.gate.map_tensors(lambda t: t.reshape(-1, *t.shape[nb:])),
            model.experts.map_tensors(lambda t: t.reshape(-1, *t.shape[nb:])))


def _rows_of(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-problem Jacobian ∂out/∂v (R, m, p) of out (R, m), a function of v (R, p) whose problems are independent
    (so the gradient of a column's sum over problems is that column's row for every problem at once)."""
    rows = []
    for i in range(out.shape[-1]):
        (g,) = torch.autograd.grad(out[:, i].sum(), v, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(v) if g is None else g)
    return torch.stack(rows, -2)


def _hard_switch_gaps(model: GaussianMoE, x, y, ll_hat):
    """ℓ(c → ∞) − ℓ̂ for every (non-reference k, other j): tensor (R, K−1, K) (−inf on j = k)."""
    gate, K = model.gate, model.n_experts
    R = ll_hat.shape[0]
    gaps = torch.full((R, max(K - 1, 0), K), -math.inf, dtype=ll_hat.dtype, device=ll_hat.device)
    c = HARD_SWITCH_SCALE
    for k in range(K - 1):
        for j in range(K):
            if j == k:
                continue
            if gate.linear_logits:
                th = gate.logit_coefficients().clone()
                moves = (th[:, k, :-1] - th[:, j, :-1]).abs().amax(-1) > 0  # equal slopes: no switch to sharpen
                th[:, k] = th[:, j] + c * (th[:, k] - th[:, j])
                g2 = gate.with_logit_coefficients(th)
            else:
                if j != K - 1:
                    continue  # only β_{1k} is scaled for non-linear logits; one test per k
                s = gate.slope.clone()
                moves = s[:, k].abs().amax(-1) > 0
                s[:, k] = c * s[:, k]
                g2 = gate.replace(slope=s)
            gap = torch.nan_to_num(GaussianMoE(g2, model.experts).loglik(x, y) - ll_hat, nan=-math.inf)
            gaps[:, k, j] = torch.where(moves, gap, torch.full_like(gap, -math.inf))
    return gaps


#: |smallest eigenvalue| of the information's correlation form at or below which it counts as singular (a flat
#: direction: parameters not identified) rather than indefinite (not a maximum)
SINGULAR_EIGENVALUE = 1e-8


def wald_inference(model: GaussianMoE, x, y, *, feature_names: Optional[Sequence[str]] = None,
                   warn: bool = True) -> WaldInference:
    """Standard errors of a fitted model from the observed information, with hard switches detected.

    Parameters
    ----------
    model : GaussianMoE
        The fit (original units), e.g. ``fit_em(...).model`` or ``MixtureOfExpertsRegressor.model_``;
        any batch shape B (one set of standard errors per problem).
    x : array-like of shape (n_samples, n_features) or B + (n_samples, n_features)
        The data it was fitted on.
    y : array-like of shape (n_samples,) or B + (n_samples,)
    feature_names : sequence of str, optional
        Names of the columns of x, for the parameter names (default x0, x1, ...).
    warn : bool, default True
        Emit :class:`SeparationWarning` for hard switches and a RuntimeWarning when the
        information is not positive definite (the fit is not a local maximum).

    Returns
    -------
    WaldInference
        ``se`` (B + (p,)), ``covariance``, ``status``, ``switch_points``; ``confint(level)`` and
        ``as_params()`` give a DataFrame and the structure of the fit's parameters.

    Raises
    ------
    ValueError
        x, y of the wrong shape or not finite, x or y constant, feature_names of the wrong length.

    Notes
    -----
    See the module docstring: Hessian of the exact log-likelihood by autograd in standardised units,
    delta method to the original units; hard-switch test; the reference expert's gate
    parameters and a fixed or unidentified τ have no standard error.
    Source: Efron & Hinkley (1978) for the observed information; Albert & Anderson (1984) for
    separation.
    """
    if not isinstance(model, GaussianMoE):
        raise TypeError(f"model must be a moelab.GaussianMoE, got {type(model).__name__}")
    batch = tuple(model.batch_shape)
    gate, experts = _flat(model)
    R = gate.slope.shape[0]
    xt, yt, _ = prepare_xy(x, y, dtype=model.dtype, device=gate.slope.device)
    if xt.shape[-1] != model.n_features:
        raise ValueError(f"x has {xt.shape[-1]} features but the model has {model.n_features}")
    if xt.shape[0] not in (1, R):
        raise ValueError(f"x, y hold {xt.shape[0]} problems but the model has batch shape {batch}; give one data set "
                         "or one per problem")
    xt, yt = xt.expand(R, *xt.shape[1:]), yt.expand(R, yt.shape[-1])
    fit = GaussianMoE(gate, experts)
    layout = ParameterLayout.of(model, feature_names)
    p, dev = layout.p, gate.slope.device
    scaling = Scaling.fit(xt, yt, center_x=type(gate).affine_invariant)
    xs, ys = scaling.transform(xt, yt)
    fit_s = scaling.model_to_scaled(fit)
    with torch.no_grad():
        ll_hat = fit.loglik(xt, yt)
        gaps = _hard_switch_gaps(fit, xt, yt, ll_hat)
    # which entries get no SE: unidentified τ, and the slopes of hard switches (held at the fit)
    fixed = torch.zeros(R, p, dtype=torch.bool, device=dev)
    status = np.full((R, p), "estimated", dtype=object)
    if layout.temperature:
        ident = temperature_identified(gate, xt).reshape(R)
        fixed[:, layout.tau_index] = ~ident
        status[~ident.cpu().numpy(), layout.tau_index] = "not identified"
    separated = (gaps >= -SEPARATION_GAP).cpu()  # (R, K−1, K)
    for r, k in zip(*np.nonzero(separated.any(-1).numpy())):
        fixed[r, layout.gate_slope[k]] = True
        status[r, layout.gate_slope[k] + [layout.gate_intercept[k]]] = "unbounded"
    with torch.enable_grad():
        v = layout.vector(fit_s).detach().requires_grad_(True)
        ll = layout.model(fit_s, v).loglik(xs, ys)
        (grad,) = torch.autograd.grad(ll.sum(), v, create_graph=True)
        hess = _rows_of(v, grad).detach()  # (R, p, p)
        vo = layout.model(fit_s, v)
        orig = layout.vector(scaling.model_to_original(vo))
        jac = _rows_of(v, orig).detach()  # ∂θ/∂θ' (R, p, p)
    info = -hess
    # parameters the likelihood does not depend on locally (e.g. the gate of a top-1 gate: piecewise constant)
    flat = (info.abs().amax(-1) == 0) & ~fixed
    status[flat.cpu().numpy()] = "no information"
    fixed = fixed | flat
    free = ~fixed
    mask2 = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(p, dtype=info.dtype).expand_as(info)
    a = torch.where(mask2, 0.5 * (info + info.transpose(-1, -2)), eye)  # fixed entries: decoupled unit rows
    # positive definiteness judged, and the inverse taken, on the correlation form C = D^-½ A D^-½ (free of the
    # parameters' units): A⁻¹ = D^-½ C⁻¹ D^-½. Inverting A itself lost a parameter with almost no information
    # (the intercept at a hard switch) to rounding: an eigenvalue ≤ 0 made every standard error NaN.
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    dpos = (diag > 0).all(-1)
    dn = diag.clamp_min(1e-300).rsqrt()
    corr = a * dn.unsqueeze(-1) * dn.unsqueeze(-2)
    evals, evecs = torch.linalg.eigh(corr)
    min_eig = evals[..., 0]
    pd_ok = dpos & (min_eig > 1e-12)
    inv_ev = torch.where(evals > 0, 1.0 / evals, torch.full_like(evals, math.nan))
    inv_c = (evecs * inv_ev.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    cov_s = torch.where(mask2, dn.unsqueeze(-1) * inv_c * dn.unsqueeze(-2), torch.zeros_like(a))
    cov = jac @ cov_s @ jac.transpose(-1, -2)
    se = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    unbounded = torch.as_tensor((status == "unbounded").astype(bool), device=dev)
    se[fixed | unbounded] = math.nan
    se[~pd_ok.to(dev)] = math.nan
    pd_ok = pd_ok.cpu()
    # singular rather than indefinite (smallest eigenvalue of the correlation form zero to rounding): a flat
    # direction, e.g. collinear inputs, so the parameters are not identified; otherwise not a maximum
    singular = (~pd_ok) & dpos.cpu() & (min_eig.abs().cpu() <= SINGULAR_EIGENVALUE)
    for r in np.nonzero(~pd_ok.numpy())[0]:  # no SEs, and no hard-switch claims either
        status[r, (free[r] | unbounded[r]).cpu().numpy()] = "not identified" if bool(singular[r]) else "not a maximum"
        separated[r] = False
    covn = cov.clone()
    bad = fixed | unbounded | (~pd_ok).to(dev).unsqueeze(-1)
    covn[bad.unsqueeze(-1).expand_as(covn) | bad.unsqueeze(-2).expand_as(covn)] = math.nan
    estimate = layout.vector(fit).detach()
    switches = _switch_points(fit, layout, separated, gaps, cov, estimate, xt, yt, pd_ok)
    msgs = []
    if warn:
        msgs = _warnings(layout, switches, pd_ok, R, singular)
    tau = getattr(model.gate, "temperature", None)
    fixed_tau = None
    if tau is not None and not layout.temperature:
        fixed_tau = float(tau.flatten()[0])
    shape = lambda t: t.reshape(batch + tuple(t.shape[1:])).cpu().numpy()  # noqa: E731
    return WaldInference(layout=layout, estimate=shape(estimate), se=shape(se), covariance=shape(covn),
                         status=status.reshape(batch + (p,)), switch_points=switches, min_eigenvalue=shape(min_eig),
                         batch=batch, temperature=fixed_tau, warnings=msgs)


def _switch_likelihood_interval(fit: GaussianMoE, r: int, k: int, j: int, u: torch.Tensor, x, y, window: int = 64) -> tuple:
    """Likelihood interval of the offset t of a hard k|j switch along u (see :class:`SwitchPoint`).

    The log-likelihood of an infinitely sharp switch is constant between consecutive projections
    u·x_n, so one offset per gap is evaluated, walking outwards from the fitted switch in windows of
    ``window`` gaps until it falls 1.92 below the fit's on each side (cost: a few windows, not n²).
    """
    one = fit[r] if fit.batch_shape else fit
    th = one.gate.logit_coefficients()  # (K, d+1), original units
    w = th[k, :-1] - th[j, :-1]
    z = torch.unique(x @ u)  # sorted projections
    cand = torch.cat([z[:1] - 1.0, 0.5 * (z[1:] + z[:-1]), z[-1:] + 1.0])  # one offset per gap between samples
    m = cand.numel()

    def loglik(idx):
        t = cand[idx]
        thb = th.expand(t.numel(), *th.shape).clone()
        thb[:, k, :-1] = th[j, :-1] + HARD_SWITCH_SCALE * w
        thb[:, k, -1] = th[j, -1] - HARD_SWITCH_SCALE * w.norm() * t
        gate = one.gate.map_tensors(lambda a: a.expand(t.numel(), *a.shape)).with_logit_coefficients(thb)
        experts = one.experts.map_tensors(lambda a: a.expand(t.numel(), *a.shape))
        with torch.no_grad():
            return GaussianMoE(gate, experts).loglik(x, y)

    t_hat = -(th[k, -1] - th[j, -1]) / w.norm()
    i0 = min(int(torch.searchsorted(z, t_hat)), m - 1)  # the gap holding the fitted switch
    floor = float(loglik(torch.tensor([i0], device=z.device))[0]) - SEPARATION_GAP
    lo = hi = i0
    while lo > 0:  # walk left
        idx = torch.arange(max(lo - window, 0), lo, device=z.device).flip(0)
        below = (loglik(idx) < floor).nonzero()
        if below.numel():
            lo = int(idx[below[0, 0]]) + 1
            break
        lo = int(idx[-1])
    while hi < m - 1:  # walk right
        idx = torch.arange(hi + 1, min(hi + 1 + window, m), device=z.device)
        below = (loglik(idx) < floor).nonzero()
        if below.numel():
            hi = int(idx[below[0, 0]]) - 1
            break
        hi = int(idx[-1])
    return (float(z[lo - 1]) if lo > 0 else -math.inf, float(z[hi]) if hi < m - 1 else math.inf)


def _switch_points(fit: GaussianMoE, layout: ParameterLayout, separated, gaps, cov, estimate, x, y, pd_ok) -> list:
    """One list of :class:`SwitchPoint` per problem: for each separated k, its best pivot j."""
    R, d = estimate.shape[0], layout.n_features
    out = [[] for _ in range(R)]
    linear = fit.gate.linear_logits
    for r, k in zip(*np.nonzero(separated.any(-1).numpy())):
        j = int(gaps[r, k].argmax())
        gap = float(gaps[r, k, j])
        if not linear:  # no closed-form switch for non-linear logits: the slope is marked, no point reported
            out[r].append(SwitchPoint(expert=int(k) + 1, versus=j + 1, normal=[], offset=math.nan, location=None,
                                      se=math.nan, data_interval=None, likelihood_interval=(math.nan, math.nan),
                                      loglik_gap=gap,
                                      slope=fit.gate.slope[r, k].tolist()))
            continue

        def offset_of(v):
            m = layout.model(GaussianMoE(*_flat(fit[r:r + 1] if fit.batch_shape else fit)), v.unsqueeze(0))
            th = m.gate.logit_coefficients()[0]
            dth = th[k] - th[j]
            w = dth[:-1]
            return -dth[-1] / w.norm(), w

        v = estimate[r].clone().requires_grad_(True)
        with torch.enable_grad():
            t, w = offset_of(v)
            (g,) = torch.autograd.grad(t, v)
        var_t = float(g @ cov[r] @ g) if bool(pd_ok[r]) else math.nan
        se_t = math.sqrt(var_t) if var_t >= 0 else math.nan
        w = w.detach()
        u = (w / w.norm()).tolist()
        t = float(t.detach())
        loc, interval = None, None
        lik = _switch_likelihood_interval(fit, r, int(k), j, torch.tensor(u, dtype=x.dtype, device=x.device), x[r], y[r])
        if d == 1:
            loc = t * u[0]
            lik = tuple(sorted(v * u[0] for v in lik))
            xs = x[r, :, 0]
            below, above = xs[xs < loc], xs[xs > loc]
            interval = (float(below.max()) if below.numel() else None, float(above.min()) if above.numel() else None)
        out[r].append(SwitchPoint(expert=int(k) + 1, versus=j + 1, normal=u, offset=t, location=loc, se=se_t,
                                  data_interval=interval, likelihood_interval=lik, loglik_gap=gap, slope=w.tolist()))
    return out


def _warnings(layout, switches, pd_ok, R, singular) -> list:
    msgs = []
    for r, sw in enumerate(switches):
        where = f" (problem {r})" if R > 1 else ""
        for s in sw:
            name = layout.feature_names[0]
            if s.location is not None:
                at = f"{name} = {s.location:.6g}"
            elif s.normal:
                at = f"the hyperplane {[round(u, 6) for u in s.normal]}·x = {s.offset:.6g}"
            else:
                at = "a saturated activation"
            lo, hi = s.likelihood_interval
            instead = (f"the switch point is reported instead, with its 95% likelihood interval [{lo:.6g}, {hi:.6g}]"
                       if s.normal else "this gate has no closed-form switch point")
            grows = "; the fitted slope still grows at the stop" if s.loglik_gap > 0 else ""
            msg = (f"gate probabilities numerically 0 or 1{where}: the gate switches from expert {s.versus} to expert "
                   f"{s.expert} as a hard step at {at}, and no sample lies inside the switch, so the data do not "
                   f"bound its slope (the likelihood of an infinitely sharp switch is within 1.92 of the "
                   f"maximum{grows}). Gate slope and intercept of expert {s.expert} are reported as unbounded (no "
                   f"standard error); {instead}.")
            msgs.append(msg)
            warnings.warn(msg, SeparationWarning, stacklevel=3)
    for which, text in ((singular, "is singular in {m} of {R} problem(s): the likelihood is flat along some direction "
                         "of the parameters, so they are not identified and have no standard errors (collinear or "
                         "constant inputs, or a gate parameter the data do not determine); drop the redundant input(s)"),
                        (~pd_ok & ~singular, "is not positive definite in {m} of {R} problem(s): the fit is not at a "
                         "local maximum of the likelihood (not converged, or a saddle), so it has no standard errors; "
                         "fit with more iterations (max_iter) or a smaller tol")):
        m = int(which.sum())
        if m:
            msg = "the observed information " + text.format(m=m, R=R)
            msgs.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msgs
