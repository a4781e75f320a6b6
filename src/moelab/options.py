"""The settings of one fit: a frozen, validated :class:`FitOptions`, built once at the entry points.

:func:`moelab.fit_em` and :func:`moelab.fit_mle` build one ``FitOptions``
from their keyword arguments and pass it down; every function below them
(the EM loop, the starts, the result) reads a setting from it where the
setting is used, e.g. ``opts.reg_variance`` in the expert M-step. All
validation of the settings is here, in :meth:`FitOptions.__post_init__`:
a bad value fails before any data are touched.

The data (x, y) and ``random_state`` (a seed or a generator, i.e. state) are
not options; :func:`moelab.fitcore.setup_problem` validates the data.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Any, Mapping, Optional, Union

import torch

from .gates import GateSpec, gate_spec
from .gates.registry import fused_families
from .init import INIT_METHODS

__all__ = ["FitOptions", "ESTIMATORS", "CONVERGENCE_RULES", "check_n_experts"]

#: the estimators sharing the fitting core: EM (:func:`moelab.fit_em`) and L-BFGS (:func:`moelab.fit_mle`)
ESTIMATORS = ("em", "mle")

#: fit_em's stopping rules (``convergence``): change of the mean log-likelihood, or relative change
CONVERGENCE_RULES = ("mean", "relative")


def check_n_experts(n_experts) -> int:
    """n_experts as an int; ValueError unless it is an integer >= 1 (bool rejected)."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be an integer >= 1, got {n_experts!r}")
    return n_experts


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


@dataclass(frozen=True)
class FitOptions:
    """Validated settings of one fit by EM (``estimator="em"``) or L-BFGS (``"mle"``).

    The fields are :func:`moelab.fit_em`'s keyword arguments of the same
    names (see its docstring for their meaning); ``gate`` is the validated
    :class:`~moelab.gates.GateSpec` (a family name or spec is accepted, with
    ``gate_options``, and validated by :func:`moelab.gates.gate_spec`).
    ``reg_variance`` is the variance floor in standardised units of y
    (var(y) = 1), i.e. ``reg_variance · var(y)`` in the original units.
    Settings that one estimator does not use (``convergence``, ``compile``,
    ``gate_steps``, ``n_candidates`` for ``"mle"``) keep their defaults.

    Raises
    ------
    ValueError
        Naming the setting, the value and what is allowed.
    """

    n_experts: int
    gate: Union[GateSpec, str] = "softmax"
    gate_options: InitVar[Optional[Mapping]] = None
    estimator: str = "em"
    n_init: int = 160
    init: str = "auto"
    n_candidates: Optional[int] = None
    max_iter: int = 2000
    tol: float = 1e-8
    convergence: str = "mean"
    reg_variance: float = 1e-6
    min_expert_size: Union[float, str] = "auto"
    min_expert_sd: float = 0.01
    gate_steps: int = 1
    compile: Union[bool, str] = "auto"
    dtype: torch.dtype = torch.float64
    device: Any = None
    warn: bool = True
    feature_names: Optional[tuple] = None
    prune_starts: bool = False
    progress: Union[bool, str] = False
    accelerate: Optional[str] = "squarem"

    def __post_init__(self, gate_options):
        if not (self.progress is True or self.progress is False or (isinstance(self.progress, str) and self.progress == "auto")):
            raise ValueError(f"progress must be 'auto' (only when stderr is a terminal), True or False, got {self.progress!r}")
        if not (self.accelerate is None or (isinstance(self.accelerate, str) and self.accelerate == "squarem")):
            raise ValueError(f"accelerate must be 'squarem' (SQUAREM extrapolation, Varadhan & Roland 2008) or None "
                             f"(plain EM), got {self.accelerate!r}")
        if not isinstance(self.prune_starts, bool):
            raise ValueError(f"prune_starts must be True or False, got {self.prune_starts!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {self.estimator!r}")
        em = self.estimator == "em"
        if em:
            _check_compile(self.compile)
        ints = (("n_init", self.n_init), ("max_iter", self.max_iter)) + ((("gate_steps", self.gate_steps),) if em else ())
        for nm, v in ints:
            if not _is_int(v) or v < (0 if nm == "max_iter" and em else 1):
                raise ValueError(f"{nm} must be a positive integer, got {v!r}")
        if em and not (self.tol >= 0):
            raise ValueError(f"tol must be >= 0 (0 runs exactly max_iter iterations), got {self.tol!r}")
        if not em and not (self.tol > 0):
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if not (isinstance(self.convergence, str) and self.convergence in CONVERGENCE_RULES):
            raise ValueError(f"convergence must be one of {', '.join(map(repr, CONVERGENCE_RULES))} (the stopping rule "
                             f"on the change of the log-likelihood), got {self.convergence!r}")
        if not (self.reg_variance > 0):
            raise ValueError(f"reg_variance must be > 0, got {self.reg_variance!r}")
        if self.init not in ("auto",) + INIT_METHODS:
            raise ValueError(f"unknown init {self.init!r}; choose one of auto, {', '.join(INIT_METHODS)}, "
                             "or pass init_model")
        spec = gate_spec(self.gate, gate_options, n_experts=check_n_experts(self.n_experts))
        object.__setattr__(self, "gate", spec)
        if self.estimator not in spec.family.estimators and not set(spec.family.estimators) & set(ESTIMATORS):
            raise ValueError(f"gate {spec.name!r} is not normalised (its weights do not sum to 1), so it defines no "
                             f"mixture density for {self.estimator.upper()}; fit the regression model by least squares "
                             f"with moelab.fit_lse(x, y, n_experts, gate={spec.name!r}), or use a softmax-type gate")
        if self.estimator not in spec.family.estimators:
            raise ValueError(f"estimator {self.estimator!r} cannot fit the {spec.name!r} gate; it is fitted by "
                             f"{' or '.join(map(repr, spec.family.estimators))}"
                             + (" (closed-form EM on the joint likelihood of x and y)" if spec.family.models_x else ""))
        if em:
            _check_compile(self.compile, spec, self.gate_steps, self.dtype, self.n_experts)
        if self.min_expert_size != "auto":
            try:
                size = float(self.min_expert_size)
            except (TypeError, ValueError):
                raise ValueError(f"min_expert_size must be a number >= 0 or 'auto', got {self.min_expert_size!r}") from None
            if not size >= 0:
                raise ValueError(f"min_expert_size must be >= 0 or 'auto', got {self.min_expert_size!r}")
        if self.feature_names is not None:
            names = self.feature_names
            if isinstance(names, str) or not all(isinstance(c, str) for c in names):
                raise ValueError(f"feature_names must be a sequence of str (one per x column), got {names!r}")
            object.__setattr__(self, "feature_names", tuple(names))
        if self.n_candidates is not None and int(self.n_candidates) < 1:
            raise ValueError(f"n_candidates must be a positive integer, got {self.n_candidates!r}")

    def min_size(self, n_samples: int) -> float:
        """The collapse threshold on an expert's effective size: ``min_expert_size``, "auto" resolved for n."""
        if self.min_expert_size == "auto":
            return min(10.0, n_samples / (4.0 * self.n_experts))
        return float(self.min_expert_size)


def _check_compile(compile, gate: Optional[GateSpec] = None, gate_steps: int = 1, dtype=torch.float64,
                   n_experts: int = 2) -> None:
    """Validate fit_em's ``compile``; for compile=True also that the fused kernel covers the fit
    (the gate family declares it, ``Gate.em_pass``, and covers its options: ``GateSpec.supports("fused")``)."""
    if not (compile is True or compile is False or (isinstance(compile, str) and compile == "auto")):
        raise ValueError(f"compile must be 'auto', True or False, got {compile!r}")
    if compile is True and gate is not None:
        why = None
        if gate.family.em_pass is None:
            why = f"a {' or '.join(fused_families())} gate (got gate={gate.name!r})"
        elif not gate.supports("fused", max(n_experts, 2)):
            why = f"a named activation (got a callable: its derivatives are not in closed form)"
        elif gate_steps != 1:
            why = f"gate_steps=1 (got {gate_steps})"
        elif dtype != torch.float64:
            why = f"dtype=torch.float64 (got {dtype}; its step checks cannot be resolved in lower precision)"
        if why is not None:
            raise ValueError(f"compile=True (CLI --compile on) runs a fused kernel that needs {why}; "
                             "use compile='auto' or False (--compile auto|off)")
