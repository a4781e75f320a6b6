"""Which gate parameters are identified: decided numerically from the gate itself.

Two invariances of a gate g(x; β_1, β_0, τ) matter for estimation and for the
Voronoi losses. Both are decided by differentiating the gate *weights* along
the invariance direction at the given parameters, over the given inputs x
(the range the logits take on the data or the design), never from a list of
activation names, so user callables are classified like the named ones.

**Translation (common slope shift).** The softmax is unchanged when the same
function s(x) is added to every logit. If adding w to every expert's slope,
β_{1k} → β_{1k} + t·w, changes every logit by the same amount, the slopes are
identified only up to that common shift (softmax, temperature, top-K gates;
an activation gate whose σ is affine over the logits' range, e.g. identity).
Test: ∂g_k(x)/∂t = 0 at t = 0 for every expert k, every x, and every unit
direction w (d forward-mode derivatives).

**Scaling (β_1, τ) → (cβ_1, cτ).** For a gate with a temperature, the logits
σ(β_{1k}ᵀx)/τ + β_{0k} are unchanged by c > 0 whenever σ(cz) = cσ(z) over the
range of z = β_{1k}ᵀx (identity, relu, any positively homogeneous σ; the
temperature gate is the identity case). Then β_1 and τ are not identified
separately when τ is estimated; only β_1/τ is (Nguyen, Akbarian & Ho, ICML
2024: the PDE ∂u/∂τ = −(1/τ) β_1·∂u/∂β_1 behind the slow rates is this
direction). Test: ∂g_k(x)/∂c = 0 at c = 1 for every k and x, i.e. the
conditional density's derivative along the direction vanishes (Gaussian
experts with distinct parameters are linearly independent, so ∂p(y|x)/∂c = 0
for all (x, y) exactly when every ∂g_k/∂c = 0). By Euler's relation this is
zσ'(z) − σ(z) = 0 on the logits' range, up to a common shift across experts.

**Routing only (top-1 and other piecewise-constant gates).** If the weights
do not change with *any* gate parameter at any x (∂g_k(x)/∂θ = 0 for every
slope and intercept entry θ, every k and x), the gate acts only through its
routing partition, the regions of x sent to each expert: top-1 gating, where
the selected expert has weight 1 and every other 0. Then neither the slopes
nor the masses exp(β_0) are identified (every (cβ_1, cβ_0), c > 0, plus a
common shift gives the same partition); what is identified is the partition
itself, e.g. for two experts in d = 1 the switch point −(β_{01} − β_{02})/(β_{11} − β_{12}).
The Voronoi losses then weight atoms by their routing mass E_X[g_i(X)] and
leave the gate slopes out (:mod:`moelab.metrics.voronoi`). With top_k ≥ 2 the
weights inside a routing set are a softmax of the selected logits, which
varies with the parameters, so the test is False. (Derivatives see no routing
change: where only the partition moves, they are 0, which is exactly the case
this test detects.)

The derivatives are exact (autograd); "vanishes" means
max |∂g| ≤ ``atol`` (default 1e-9 in float64; the gate weights lie in [0, 1]).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..exceptions import IdentifiabilityWarning
from .base import Gate

__all__ = ["GateInvariances", "IdentifiabilityWarning", "gate_invariances", "temperature_identified", "routing_only",
           "temperature_identified_generically", "default_x", "warn_if_temperature_not_identified"]




@dataclass(frozen=True)
class GateInvariances:
    """Result of :func:`gate_invariances`; every field has the gate's batch shape.

    Attributes
    ----------
    translation : bool tensor
        Slopes are identified only up to a common shift (centred by the Voronoi losses).
    scaling : bool tensor
        (β_1, τ) → (cβ_1, cτ) leaves the gate unchanged (False for gates without a temperature).
    translation_derivative, scaling_derivative : float tensors
        max over x, experts (and directions) of |∂g_k/∂t| and |∂g_k/∂c|
        (NaN for ``scaling`` of a gate without a temperature).
    routing_only : bool tensor
        The weights do not vary with any slope or intercept entry on x: only the
        routing partition is identified (top-1 gating; module docstring).
    routing_derivative : float tensor
        max over x, experts and slope/intercept entries of |∂g_k/∂θ|.
    """

    translation: torch.Tensor
    scaling: torch.Tensor
    translation_derivative: torch.Tensor
    scaling_derivative: torch.Tensor
    routing_only: Optional[torch.Tensor] = None
    routing_derivative: Optional[torch.Tensor] = None


def default_x(n_features: int, dtype=torch.float64, device=None, n_points: int = 256) -> torch.Tensor:
    """Inputs used when no data are given: ``n_points`` draws of N(0, I_d), fixed seed 0; shape (n_points, d)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n_points, n_features, generator=gen, dtype=dtype).to(device)


def _with(gate: Gate, **attrs) -> Gate:
    new = copy.copy(gate)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _max_derivative(fn, like: torch.Tensor) -> torch.Tensor:
    """max |d fn(t)/dt| at t = 0 over the trailing (n, K) dims, for fn: scalar → (..., n, K).

    Forward derivative by the double-backward trick (J·1 = ∂(vᵀJ)/∂v), so
    plain reverse-mode autograd suffices.
    """
    with torch.enable_grad():
        t = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        out = fn(t)
        v = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, t, v, create_graph=True)
        (dg,) = torch.autograd.grad(vjp, v, allow_unused=True)
    if dg is None:  # the weights do not depend on t at all
        dg = torch.zeros_like(out)
    return torch.nan_to_num(dg.detach(), nan=float("inf")).abs().amax(dim=(-2, -1))


def gate_invariances(gate: Gate, x: Optional[torch.Tensor] = None, *, atol: float = 1e-9,
                     routing: bool = True) -> GateInvariances:
    """Decide the translation and (β_1, τ)-scaling invariances of ``gate`` on inputs ``x``.

    Parameters
    ----------
    gate : Gate
        Any gate with ``slope`` (..., K, d); ``temperature`` (batch shape) if it has one.
    x : tensor of shape (n_points, d) or (..., n_points, d), optional
        Inputs spanning the range of interest (the data, or points of the
        design's x distribution). Default :func:`default_x` (256 draws of N(0, I)).
    atol : float, default 1e-9
        A derivative of the weights with max |∂g| ≤ atol counts as zero.
    routing : bool, default True
        Also decide ``routing_only`` (K·(d+1) more derivatives); False leaves
        it False with a NaN derivative (what :func:`temperature_identified` needs).

    Returns
    -------
    GateInvariances

    Raises
    ------
    ValueError
        If ``x`` has the wrong number of features or ``atol`` is not positive.

    Notes
    -----
    See the module docstring for the maths. Source for the scaling direction:
    Nguyen, Akbarian & Ho (ICML 2024, arXiv 2401.13875), the PDE between τ
    and β_1; for translation: Nguyen, Nguyen & Ho (NeurIPS 2023), "identifiable
    up to translation".
    """
    if not (atol > 0):
        raise ValueError(f"atol must be > 0, got {atol!r}")
    slope = gate.slope
    if x is None:
        x = default_x(gate.n_features, slope.dtype, slope.device)
    x = torch.as_tensor(x, dtype=slope.dtype, device=slope.device)
    if x.dim() < 2 or x.shape[-1] != gate.n_features:
        raise ValueError(f"x must have shape (n_points, {gate.n_features}), got {tuple(x.shape)}")
    d = gate.n_features
    trans = None
    for j in range(d):
        w = torch.zeros(d, dtype=slope.dtype, device=slope.device)
        w[j] = 1.0
        dj = _max_derivative(lambda t: _with(gate, slope=slope + t * w).weights(x), slope)
        trans = dj if trans is None else torch.maximum(trans, dj)
    tau = getattr(gate, "temperature", None)
    if tau is None:
        scal = torch.full_like(trans, float("nan"))
        scaling = torch.zeros(trans.shape, dtype=torch.bool, device=trans.device)
    else:
        scal = _max_derivative(lambda t: _with(gate, slope=slope * (1 + t), temperature=tau * (1 + t)).weights(x), slope)
        scaling = scal <= atol
    route = None
    if routing:
        nb = len(gate.batch_shape)
        for name in ("slope", "intercept"):
            p = getattr(gate, name)
            for idx in itertools.product(*(range(s) for s in p.shape[nb:])):
                e = torch.zeros_like(p)
                e[(...,) + idx] = 1.0
                dj = _max_derivative(lambda t, e=e, p=p, name=name: _with(gate, **{name: p + t * e}).weights(x), slope)
                route = dj if route is None else torch.maximum(route, dj)
    if route is None:
        route = torch.full_like(trans, float("nan"))
    # derivatives carry x's batch dims too when x is batched: reduce them onto the gate's batch shape
    extra = trans.dim() - len(gate.batch_shape)
    if extra > 0:
        dims = tuple(range(extra))
        trans, scal, route = trans.amax(dims), scal.amax(dims), route.amax(dims)
        scaling = scal <= atol if tau is not None else torch.zeros(trans.shape, dtype=torch.bool, device=trans.device)
    return GateInvariances(translation=trans <= atol, scaling=scaling, translation_derivative=trans, scaling_derivative=scal,
                           routing_only=route <= atol, routing_derivative=route)


def routing_only(gate: Gate, x: Optional[torch.Tensor] = None, *, atol: float = 1e-9) -> bool:
    """Whether ``gate`` acts on ``x`` only through its routing partition (top-1 gating), for every problem.

    True when no slope or intercept entry changes any weight at any x (see the
    module docstring): then the gate's slopes and masses exp(β_0) are not
    identified, only the partition of x between the experts. Same
    parameters and errors as :func:`gate_invariances`.
    """
    return bool(gate_invariances(gate, x, atol=atol).routing_only.all())


def temperature_identified(gate: Gate, x: Optional[torch.Tensor] = None, *, atol: float = 1e-9) -> torch.Tensor:
    """Whether β_1 and τ are identified separately (bool tensor of the gate's batch shape).

    True for gates with a fixed or no temperature; for an estimated τ, False
    where the gate is invariant to (β_1, τ) → (cβ_1, cτ) on ``x`` (see
    :func:`gate_invariances`; same parameters and errors).
    """
    inv = gate_invariances(gate, x, atol=atol, routing=False)
    learn = bool(getattr(gate, "learn_temperature", False))
    return ~inv.scaling if learn else torch.ones_like(inv.scaling)


def temperature_identified_generically(gate: Gate, *, atol: float = 1e-9) -> bool:
    """Whether the family identifies an estimated τ at generic parameter values (for counting parameters).

    The family's gate with the same hyper-parameters, slopes drawn N(0, 1)
    with a fixed seed (reference row 0), zero intercepts and τ = 1, over
    :func:`default_x`: the answer that holds for almost every parameter
    value, decided from the gate itself (σ), not from where a fit ended
    (whose units and slopes would make the answer depend on the data's
    scale). False when τ is not estimated.
    """
    if not bool(getattr(gate, "learn_temperature", False)):
        return False
    nb = len(gate.batch_shape)
    one = gate.map_tensors(lambda t: t[(0,) * nb] if nb else t)
    gen = torch.Generator().manual_seed(0)
    slope = torch.randn(one.n_experts, one.n_features, generator=gen, dtype=torch.float64)
    slope[-1] = 0
    generic = _with(one, slope=slope.to(one.slope), intercept=torch.zeros_like(one.intercept),
                    temperature=torch.ones_like(one.temperature))
    return bool(temperature_identified(generic, atol=atol).all())


def warn_if_temperature_not_identified(gate: Gate, x: torch.Tensor, *, stacklevel: int = 3) -> None:
    """Emit one :class:`IdentifiabilityWarning` if ``gate`` estimates τ where only β_1/τ is identified.

    ``x`` (..., n, d) are the data the gate was fitted on (the logits' range).
    """
    if not getattr(gate, "learn_temperature", False):
        return
    ok = temperature_identified(gate, x)
    bad = int((~ok).sum())
    if bad:
        total = max(ok.numel(), 1)
        warnings.warn(
            f"the temperature is not identified in {bad} of {total} problem(s): over the range the gate's logits take on "
            "these data, (β_1, τ) and (cβ_1, cτ) give the same model (σ(cz) = cσ(z)), so only β_1/τ is estimated and the "
            "fitted τ (and β_1) reflect the start, not the data. Fix τ (learn_temperature=False, --temperature T) or use an activation that is "
            "not positively homogeneous (e.g. tanh, sigmoid).",
            IdentifiabilityWarning,
            stacklevel=stacklevel,
        )
