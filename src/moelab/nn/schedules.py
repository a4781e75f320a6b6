"""Temperature schedules of the dense-to-sparse routers."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TemperatureSchedule"]


@dataclass(frozen=True)
class TemperatureSchedule:
    """Temperature τ(t) going from ``tau_max`` at step 0 to the floor ``tau_min`` at ``steps``.

    Dense-to-sparse gating starts with a high temperature (nearly uniform,
    dense weights) and anneals it so the gate becomes sparse (EvoMoE, Nie et
    al. 2021, Sec. 3.2; the temperature softmax gate of Nguyen, Akbarian & Ho,
    ICML 2024, arXiv 2401.13875, Eq. (2)). With ``r = min(t, steps) / steps``:

    - ``"constant"``: τ = tau_max
    - ``"linear"``: τ = tau_max + r (tau_min - tau_max)
    - ``"exponential"``: τ = tau_max (tau_min / tau_max)^r
    - ``"cosine"``: τ = tau_min + (tau_max - tau_min) (1 + cos(π r)) / 2

    After ``steps`` the temperature stays at its floor ``tau_min``, which is
    strictly positive, so the logits ``l / τ`` stay finite.

    Parameters
    ----------
    tau_max : float
        Starting temperature, ``>= tau_min``.
    tau_min : float
        Floor, ``> 0``.
    kind : str, default "constant"
        One of ``"constant"``, ``"linear"``, ``"exponential"``, ``"cosine"``.
    steps : int, default 1
        Steps from ``tau_max`` to ``tau_min``; ``>= 1``.

    Raises
    ------
    ValueError
        If ``tau_min <= 0`` (a schedule reaching 0), ``tau_max < tau_min``,
        ``steps < 1`` or an unknown ``kind``.
    """

    tau_max: float
    tau_min: float
    kind: str = "constant"
    steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "exponential", "cosine"):
            raise ValueError(
                f"unknown schedule kind {self.kind!r}; choose constant, linear, exponential or cosine"
            )
        if not (self.tau_min > 0) or not math.isfinite(self.tau_min):
            raise ValueError(
                f"tau_min={self.tau_min!r} must be a finite number > 0: a temperature schedule "
                f"reaching 0 divides the logits by 0; use a small positive floor such as 0.05"
            )
        if not (self.tau_max >= self.tau_min) or not math.isfinite(self.tau_max):
            raise ValueError(
                f"tau_max={self.tau_max!r} must be finite and >= tau_min={self.tau_min!r}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")

    def __call__(self, step: int) -> float:
        """Temperature at ``step`` (an int >= 0).

        Raises
        ------
        ValueError
            If ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        r = min(step, self.steps) / self.steps
        hi, lo = self.tau_max, self.tau_min
        if self.kind == "constant":
            return hi
        if self.kind == "linear":
            tau = hi + r * (lo - hi)
        elif self.kind == "exponential":
            tau = hi * (lo / hi) ** r
        else:
            tau = lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * r))
        return max(tau, lo)  # rounding only: every formula is >= lo in exact arithmetic
