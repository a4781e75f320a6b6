"""The gate registry: what each gate family declares, and the one validator every entry point uses.

A gate family is a :class:`~moelab.gates.Gate` subclass. Like a
``torch.distributions.Distribution`` with its ``arg_constraints``, it declares
in class attributes

- ``name`` and ``description`` (one line, for help texts),
- ``options``: a tuple of :class:`GateOption` (name, constraint, default, help),
- ``em_pass``: how EM's one-pass iteration covers it (``"linear"``, ``"newton"`` or None:
  :mod:`moelab._fused`),
- ``sparse_routing`` (EM keeps each sample's routing set: fit a dense start first),
- ``rate_studies`` (usable as the gate of a study's true and fitted models),

and in methods its free-parameter count and its maps to and from
standardised units. :func:`gate_spec` turns a family name and user options
into a frozen, validated :class:`GateSpec`; ``fit_em``, ``fit_mle``, the
estimator, the CLI and the study files all call it, so a family registered
with :func:`register_gate` is usable everywhere at once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = ["fused_families", "Constraint", "positive_real", "boolean", "activation_function", "experts_kept", "GateOption", "GateSpec",
           "GATES", "register_gate", "unregister_gate", "gate_family", "gate_spec", "families_taking"]


# ------------------------------------------------------------------ constraints
class Constraint:
    """A constraint on one gate option; :meth:`check` returns the validated value or raises ValueError."""

    #: short text for error messages and help, e.g. "a finite number > 0"
    text = "any value"

    def check(self, value, name: str, n_experts: Optional[int] = None):
        """Validate ``value`` of option ``name``; ``n_experts`` (when known) for constraints that need it.

        Raises
        ------
        ValueError
            Naming the option, the value and what is allowed.
        """
        return value


class _PositiveReal(Constraint):
    text = "a finite number > 0"

    def check(self, value, name, n_experts=None):
        if isinstance(value, torch.Tensor):
            return value  # per-problem values: the gate checks them (finite, > 0, batch shape)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}; the {name} must be a finite number > 0")
        return float(value)


class _Boolean(Constraint):
    text = "True or False"

    def check(self, value, name, n_experts=None):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        return bool(value)


class _Activation(Constraint):
    @property
    def text(self):
        from ..activations import ACTIVATIONS

        return f"one of {', '.join(ACTIVATIONS)} or a callable"

    def check(self, value, name, n_experts=None):
        from ..activations import resolve_activation

        resolve_activation(value)  # ValueError / TypeError naming the choices
        return value


class _ExpertsKept(Constraint):
    text = "an integer with 1 <= value <= n_experts"

    def check(self, value, name, n_experts=None):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        value = int(value)
        hi = n_experts if n_experts is not None else value
        if not 1 <= value <= max(hi, 1):
            raise ValueError(f"{name}={value} is outside [1, n_experts={n_experts}]; choose 1 <= {name} <= n_experts")
        return value


positive_real = _PositiveReal()
boolean = _Boolean()
activation_function = _Activation()
experts_kept = _ExpertsKept()


@dataclass(frozen=True)
class GateOption:
    """One hyper-parameter of a gate family.

    Attributes
    ----------
    name : str
        Keyword of the gate's constructor (and key of ``gate_options``).
    constraint : Constraint
    default : object
        The constructor's default (None with ``required=True``).
    help : str
        One line, shown by the CLI and in errors.
    required : bool, default False
        The family cannot be built without it (``top_k``).
    of_estimation : bool, default False
        A setting of the estimation, not of the model (``learn_temperature``):
        a study's true gate does not take it.
    """

    name: str
    constraint: Constraint
    default: Any = None
    help: str = ""
    required: bool = False
    of_estimation: bool = False


# ------------------------------------------------------------------ registry
#: family name -> Gate subclass, in registration order (the CLI lists them so)
GATES: dict = {}


def register_gate(cls, *, replace: bool = False):
    """Register a gate family (a :class:`~moelab.gates.Gate` subclass); usable as a class decorator.

    Parameters
    ----------
    cls : type
        Subclass of :class:`~moelab.gates.Gate` with a unique ``name``.
    replace : bool, default False
        Allow replacing a registered family of the same name.

    Returns
    -------
    cls

    Raises
    ------
    TypeError
        ``cls`` is not a Gate subclass.
    ValueError
        The name is taken (and ``replace`` is False) or an option is declared twice.
    """
    from .base import Gate

    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise TypeError(f"register_gate takes a Gate subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or name == Gate.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name (a non-empty str) to be registered")
    if name in GATES and GATES[name] is not cls and not replace:
        raise ValueError(f"a gate family named {name!r} is already registered ({GATES[name].__name__}); "
                         "choose another name or pass replace=True")
    names = [o.name for o in cls.options]
    if len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}.options declares an option twice: {names}")
    GATES[name] = cls
    return cls


def unregister_gate(name: str) -> None:
    """Remove a registered family (no-op if absent)."""
    GATES.pop(name, None)


def gate_family(name) -> type:
    """The Gate subclass registered as ``name``.

    Raises
    ------
    ValueError
        Unknown name (the message lists the registered families).
    TypeError
        A Gate instance instead of a name.
    """
    from .base import Gate

    if isinstance(name, Gate):
        raise TypeError("pass the gate family by name (e.g. 'softmax') and starting values through init_model")
    if not isinstance(name, str) or name not in GATES:
        raise ValueError(f"unknown gate {name!r}; choose one of {', '.join(GATES)}")
    return GATES[name]


def fused_families() -> Tuple[str, ...]:
    """Names of the registered families EM's one-pass iteration covers (``Gate.em_pass`` set)."""
    return tuple(n for n, c in GATES.items() if c.em_pass is not None)


def families_taking(option: str) -> Tuple[str, ...]:
    """Names of the registered families that take ``option``."""
    return tuple(n for n, c in GATES.items() if any(o.name == option for o in c.options))


@dataclass(frozen=True)
class GateSpec:
    """A gate family with validated options: what a fit needs to build its gates.

    Build with :func:`gate_spec`. Immutable; ``options`` is a read-only mapping
    holding only the options that were set.
    """

    family: type
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.family.name

    def build(self, slope, intercept):
        """The gate with these parameters: slope (..., K, d), intercept (..., K)."""
        return self.family(slope, intercept, **self.options)

    def template(self, n_experts: int, n_features: int, batch_shape=(), *, dtype=torch.float64, device=None):
        """The family's :meth:`~moelab.gates.Gate.uniform` gate (equal weights) of the given batch shape."""
        return self.family.uniform(n_experts, n_features, batch_shape, dtype=dtype, device=device, **self.options)

    def n_free_parameters(self, n_experts: int, n_features: int) -> int:
        """Free gate parameters per problem (``Gate.n_free_parameters`` of this family and options)."""
        opts = {k: (v.flatten()[0] if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()}
        return GateSpec(self.family, opts).template(n_experts, n_features).n_free_parameters()

    def supports(self, kernel: str, n_experts: int = 2) -> bool:
        """Whether fast kernel ``kernel`` covers this family and options: ``"fused"`` — EM's one-pass
        iteration (``Gate.em_pass``, and the ``em_pass_spec()`` of a gate with these options and
        ``n_experts`` experts; the family's declaration alone where such a gate cannot be built)."""
        if kernel != "fused" or self.family.em_pass is None:
            return False
        try:
            gate = self.template(n_experts, 1)
        except ValueError:
            return True
        return gate.em_pass_spec() is not None


def gate_spec(name, options: Optional[Mapping] = None, *, n_experts: Optional[int] = None) -> GateSpec:
    """Validate a gate family and its options once: the entry points' single gate validator.

    Parameters
    ----------
    name : str
        A registered family (:data:`GATES`).
    options : mapping, optional
        Hyper-parameters of the family; entries that are None are dropped.
    n_experts : int, optional
        The number of experts, for options bounded by it (``top_k``).

    Returns
    -------
    GateSpec

    Raises
    ------
    ValueError
        Unknown family, an option the family does not take, a value outside
        its constraint, or a missing required option.
    """
    if isinstance(name, GateSpec):
        name, options = name.name, {**name.options, **(options or {})}
    cls = gate_family(name)
    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    declared = {o.name: o for o in cls.options}
    extra = [k for k in opts if k not in declared]
    if extra:
        takes = f"it takes {', '.join(declared)}" if declared else "it does not take options"
        raise ValueError(f"gate {cls.name!r} does not take {', '.join(sorted(extra))}; {takes}")
    for o in cls.options:
        if o.name in opts:
            opts[o.name] = o.constraint.check(opts[o.name], o.name, n_experts)
        elif o.required:
            raise ValueError(f"gate {cls.name!r} needs {o.name} ({o.help})")
    return GateSpec(cls, MappingProxyType(opts))
