"""The gate interface shared by every gating function.

A gate maps inputs x of shape (..., n_samples, n_features) to log gate
weights of shape (..., n_samples, n_experts). Its parameters carry a leading
``batch_shape`` (independent problems: replicates, restarts, sample sizes), so
one call evaluates many models at once. Gates are immutable: ``replace``
returns a new gate with new parameter values and the same hyper-parameters.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Dict, Optional, Tuple

import torch

from .._validation import as_tensor, check_finite, check_positive, check_shape
from .registry import GateOption

__all__ = ["Gate"]


class Gate:
    """Base class for gates with per-expert slope β_1 (K, d) and intercept β_0 (K,).

    Subclasses implement :meth:`logits`; :meth:`log_weights` defaults to
    ``log_softmax(logits)``.

    Identifiability: the last expert (index K-1) is the reference expert.
    Estimators keep its slope and intercept at zero.

    Class attributes
    ----------------
    name : str
        Short name used by :func:`moelab.gates.make_gate` and the CLI.
    linear_logits : bool
        True when the logits are linear in (slope, intercept) with fixed
        hyper-parameters, so the EM gate step can use exact Newton/IRLS.
    affine_invariant : bool
        True when centring x can be absorbed into the intercept (logits depend
        on x only through β_1ᵀx + β_0); the estimators then centre x.
    description : str
        One line for help texts, e.g. ``softmax(b1'x + b0)``.
    options : tuple of GateOption
        The family's hyper-parameters (constructor keywords) with their
        constraints and defaults; :func:`moelab.gates.gate_spec` validates
        user options against them.
    em_pass : {"linear", "newton"} or None
        How EM's one-pass iteration (:mod:`moelab._fused`: E-step and M-step
        statistics in one pass over the data, compiled or eager) covers the
        family — its one declaration of it: ``"linear"`` (logits linear in
        :meth:`logit_coefficients`: IRLS from moments of the gate weights),
        ``"newton"`` (damped Newton from closed-form derivatives of the
        logits; :meth:`em_pass_spec` says what the kernel specialises on), or
        None (the EM loop with the autograd gate step, eager).
    sparse_routing : bool
        True when the gate gives some experts weight exactly 0, so EM keeps
        each sample's routing set: ``fit_em`` then fits the dense softmax
        model first and starts from :meth:`from_dense`.
    rate_studies : bool
        Usable as the gate of a rate study (Voronoi losses of dense gates).
    models_x : bool
        True when the gate is a model of x too (the Gaussian gate): its fits
        maximise the joint likelihood p(x, y) = p(x) p(y | x), the family has
        :meth:`log_marginal` (log p(x)) and a closed-form ``m_step(x, resp)``,
        and BIC/AIC count its x-model parameters.
    estimators : tuple of str
        The estimators that can fit the family (``"em"``, ``"mle"``; ``"lse"``,
        least squares with :func:`moelab.fit_lse`). A gate whose weights do not
        sum to 1 over experts (the sigmoid gate) defines no mixture density and
        declares ``("lse",)``: the likelihood estimators refuse it.

    Register a subclass with :func:`moelab.gates.register_gate` to make it
    usable by ``fit_em``, ``fit_mle``, the estimator and study files.
    """

    name: ClassVar[str] = "gate"
    description: ClassVar[str] = ""
    options: ClassVar[Tuple[GateOption, ...]] = ()
    em_pass: ClassVar[Optional[str]] = None
    sparse_routing: ClassVar[bool] = False
    rate_studies: ClassVar[bool] = True
    linear_logits: ClassVar[bool] = False
    affine_invariant: ClassVar[bool] = True
    models_x: ClassVar[bool] = False
    estimators: ClassVar[tuple] = ("em", "mle")
    #: EM may be accelerated by extrapolating the estimable parameters (:mod:`moelab.acceleration`):
    #: every entry of :meth:`params` free, those in ``positive_params`` on the log scale
    em_extrapolation: ClassVar[bool] = True
    #: parameters constrained to be positive (optimised on the log scale)
    positive_params: ClassVar[tuple] = ()
    #: tensor attributes whose leading dimensions are the batch shape
    batched_attrs: ClassVar[tuple] = ("slope", "intercept")

    def __init__(self, slope, intercept):
        slope = as_tensor(slope, "gate slope")
        intercept = as_tensor(intercept, "gate intercept", dtype=slope.dtype, device=slope.device)
        if slope.dim() < 2:
            raise ValueError(
                f"gate slope must have shape (..., n_experts, n_features), got {tuple(slope.shape)}"
            )
        check_shape(intercept, "gate intercept", (slope.shape[-2],))
        if intercept.shape[:-1] != slope.shape[:-2]:
            raise ValueError(
                f"gate slope has batch shape {tuple(slope.shape[:-2])} but the intercept has "
                f"{tuple(intercept.shape[:-1])}; they must match"
            )
        check_finite(slope, "gate slope")
        check_finite(intercept, "gate intercept")
        self.slope = slope  # [..., K, d]
        self.intercept = intercept  # [..., K]

    @classmethod
    def uniform(cls, n_experts: int, n_features: int, batch_shape=(), *, dtype=torch.float64, device=None, **options):
        """The gate with equal weights everywhere (all-zero slope and intercept), of the given batch shape.

        The estimators' template; families with other parameters override it.
        """
        shape = tuple(batch_shape)
        slope = torch.zeros(*shape, n_experts, n_features, dtype=dtype, device=device)
        intercept = torch.zeros(*shape, n_experts, dtype=dtype, device=device)
        return cls(slope, intercept, **options)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample, (..., n), for gates that model x (``models_x``).

        Raises
        ------
        TypeError
            The gate models only y given x.
        """
        raise TypeError(f"the {self.name!r} gate models y given x only; it has no density of x")

    def _check_temperature(self, temperature) -> torch.Tensor:
        """τ as a tensor of the batch shape; ValueError if non-finite, ≤ 0 or mis-shaped."""
        tau = as_tensor(temperature, "temperature", dtype=self.slope.dtype, device=self.slope.device)
        check_finite(tau, "temperature")
        check_positive(tau, "temperature", "the temperature τ scales the logits and must be strictly positive")
        try:
            return tau.expand(self.batch_shape) if tau.dim() <= len(self.batch_shape) else tau
        except RuntimeError:
            raise ValueError(
                f"temperature of shape {tuple(tau.shape)} does not match the gate's batch shape "
                f"{tuple(self.batch_shape)}"
            ) from None

    # ------------------------------------------------------------------ shapes
    @property
    def n_experts(self) -> int:
        return self.slope.shape[-2]

    @property
    def n_features(self) -> int:
        return self.slope.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.slope.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.slope.dtype

    # ------------------------------------------------------------- parameters
    def params(self) -> Dict[str, torch.Tensor]:
        """The estimable parameters, by name (tensors with leading batch_shape)."""
        return {"slope": self.slope, "intercept": self.intercept}

    def hyperparams(self) -> dict:
        """Fixed settings (activation, fixed temperature, top_k, ...)."""
        return {}

    def replace(self, **params) -> "Gate":
        """A new gate of the same kind with some parameters replaced.

        Shapes are not re-validated (this is the estimators' inner-loop path,
        and it works under ``torch.func`` transforms); pass values of the same
        trailing shapes as the current ones.

        Raises
        ------
        ValueError
            If a name is not one of :meth:`params`.
        """
        known = self.params()
        unknown = set(params) - set(known)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no estimable parameter(s) {sorted(unknown)}; it has {sorted(known)}")
        new = copy.copy(self)
        for k, v in params.items():
            setattr(new, k, v)
        return new

    def map_tensors(self, fn) -> "Gate":
        """Apply ``fn`` to every batched tensor, estimable or fixed (e.g. ``lambda t: t[3]``
        to select a problem, ``lambda t: t.to(torch.float32)``)."""
        new = copy.copy(self)
        for k in self.batched_attrs:
            setattr(new, k, fn(getattr(self, k)))
        return new

    def n_free_parameters(self) -> int:
        """Free parameters per problem, reference expert excluded (for BIC/AIC).

        The K−1 free slope rows and intercepts, plus every other estimated
        parameter (:meth:`params`). The one rule for an estimated temperature:
        it adds a parameter only where β_1 and τ are identified separately,
        decided numerically from the gate family at generic parameter values
        (:func:`~moelab.gates.identifiability.temperature_identified_generically`).
        So the temperature gate counts as the softmax gate (only β_1/τ is
        identified), a tanh activation gate counts τ, an identity or relu one does not.
        """
        n = (self.n_experts - 1) * (self.n_features + 1)
        nb = len(self.batch_shape)
        for k, t in self.params().items():
            if k in ("slope", "intercept"):
                continue
            if k == "temperature":
                from .identifiability import temperature_identified_generically

                n += int(temperature_identified_generically(self))
            else:
                n += int(t[(0,) * nb].numel()) if nb else int(t.numel())
        return n

    def em_pass_spec(self) -> Optional[tuple]:
        """The hashable spec of this gate's one-pass EM kernel (``em_pass``), or None where it has none.

        ``("linear",)`` for ``em_pass = "linear"``; families with ``em_pass = "newton"``
        return what :mod:`moelab._fused.newton` specialises on (e.g. the activation's
        name), or None for settings it does not cover (a user callable activation).
        """
        return ("linear",) if self.em_pass == "linear" else None

    # -------------------------------------------------- linear logits, units
    def logit_coefficients(self) -> torch.Tensor:
        """θ (..., K, d+1) with logits = θ_k·[x, 1], for gates whose logits are linear in x.

        The EM gate step (exact Newton/IRLS, ``linear_logits``) and the linear
        one-pass kernel work on θ. Default: [β_1, β_0].
        """
        return torch.cat([self.slope, self.intercept.unsqueeze(-1)], -1)

    def with_logit_coefficients(self, theta: torch.Tensor) -> "Gate":
        """Inverse of :meth:`logit_coefficients`: the gate whose logits have coefficients θ (..., K, d+1)."""
        return self.replace(slope=theta[..., :-1], intercept=theta[..., -1])

    def absorb_linear_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """The intercept change that absorbs a per-expert change ``shift`` (..., K) of β_1ᵀx.

        Used to map affine-invariant gates between standardised and original
        units. Default: ``shift`` itself (logits β_1ᵀx + β_0).
        """
        return shift

    def to_original(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "Gate":
        """The gate fitted on x' = (x − x_loc)/x_scale as the same function of x.

        x_loc, x_scale of shape batch_shape + (n_features,).

        Raises
        ------
        RuntimeError
            A gate that is not ``affine_invariant`` with a non-zero ``x_loc``
            (such gates are fitted on rescaled, uncentred x).
        """
        slope = self.slope / x_scale.unsqueeze(-2)
        if not self.affine_invariant:
            if bool((x_loc != 0).any()):  # pragma: no cover - the estimators do not centre x for these gates
                raise RuntimeError(f"{type(self).__name__} gates must be fitted on uncentred x")
            return self.replace(slope=slope)
        shift = (self.slope * (x_loc / x_scale).unsqueeze(-2)).sum(-1)  # β1'ᵀ m/s  [..., K]
        return self.replace(slope=slope, intercept=self.intercept - self.absorb_linear_shift(shift))

    def to_scaled(self, x_loc: torch.Tensor, x_scale: torch.Tensor) -> "Gate":
        """Inverse of :meth:`to_original`: the gate in units x' = (x − x_loc)/x_scale."""
        slope = self.slope * x_scale.unsqueeze(-2)
        if not self.affine_invariant:
            return self.replace(slope=slope)
        shift = (self.slope * x_loc.unsqueeze(-2)).sum(-1)
        return self.replace(slope=slope, intercept=self.intercept + self.absorb_linear_shift(shift))

    def atom_masses(self) -> torch.Tensor:
        """Per-expert masses (..., K) of the Voronoi losses: the weights at x = 0 with the slopes removed.

        Default (softmax-type gates): softmax(β_0), the normalised exp(β_0).
        """
        return torch.softmax(self.intercept, -1)

    @classmethod
    def from_dense(cls, dense: "Gate", **options) -> "Gate":
        """For ``sparse_routing`` families: the gate that sparsifies a fitted dense softmax gate."""
        raise NotImplementedError(f"{cls.__name__} has no dense start (sparse_routing is False)")

    # ---------------------------------------------------------------- the map
    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        """β_1ᵀx for every expert: x [..., n, d] → [..., n, K]."""
        if x.shape[-1] != self.n_features:
            raise ValueError(
                f"x has {x.shape[-1]} features but the gate was built for {self.n_features}"
            )
        return x @ self.slope.transpose(-1, -2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Gate logits l(x) of shape (..., n_samples, n_experts)."""
        raise NotImplementedError

    def log_weights(self, x: torch.Tensor) -> torch.Tensor:
        """log g(x), shape (..., n_samples, n_experts); rows logsumexp to 0."""
        return torch.log_softmax(self.logits(x), dim=-1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights g(x), shape (..., n_samples, n_experts); rows sum to 1."""
        return self.log_weights(x).exp()

    # ---------------------------------------------------------------- display
    def describe(self) -> str:
        """A one-line description of the gate family, e.g. ``activation(tanh), tau=1``."""
        return self.name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_experts={self.n_experts}, n_features={self.n_features}, "
            f"batch_shape={tuple(self.batch_shape)})"
        )
