"""Progress display of one fit: the stage it is in and an estimate of the time left (tqdm, stderr).

A fit goes through up to three stages, each shown on one tqdm line on stderr:

* ``screening starts`` — building the candidate starts and ranking them
  (candidates done / total);
* ``compiling`` — ``torch.compile`` of the fused EM kernels (a one-off cost;
  the line shows the expected seconds, since the compiler reports no progress);
* ``EM`` — iterations of the slowest start still running, with the starts still
  active and the best log-likelihood so far (standardised units). The total
  is re-estimated every iteration from each running start's rate of
  convergence (:func:`remaining_iterations`), so tqdm's time-left estimate follows it.

Nothing appears for fits that finish within ``delay`` seconds (2 s), and
nothing at all unless the display is enabled: ``progress=True`` forces it,
``"auto"`` shows it only when stderr is a terminal, ``False`` (the library
default, as scikit-learn estimators are silent unless asked) never.

Each fit owns its :class:`FitProgress`; nothing is kept between fits.
"""

from __future__ import annotations

import math
import time
import sys
from typing import Optional, Union

import torch

__all__ = ["FitProgress", "progress_enabled", "remaining_iterations", "PROGRESS_CHOICES"]

#: accepted values of ``progress``
PROGRESS_CHOICES = ("auto", True, False)
#: seconds a fit runs before its progress line appears
DELAY_S = 2.0


def progress_enabled(progress: Union[bool, str], stream=None) -> bool:
    """Whether a fit with this ``progress`` setting shows its progress on ``stream`` (default stderr).

    Raises
    ------
    ValueError
        ``progress`` not one of "auto", True, False.
    """
    if progress is True or progress is False:
        return progress
    if isinstance(progress, str) and progress == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        try:
            return bool(isatty()) if isatty is not None else False
        except ValueError:  # closed stream
            return False
    raise ValueError(f"progress must be 'auto' (only when stderr is a terminal), True or False, got {progress!r}")


def remaining_iterations(h: torch.Tensor, eps, left: int) -> int:
    """Predicted EM iterations left until the slowest start's increment falls below ``eps``.

    EM converges linearly: the log-likelihood increments shrink geometrically,
    Δ_t ≈ Δ_{t−1}·a with rate a < 1 (Dempster, Laird & Rubin 1977, Sec. 3).
    From the last two increments of every start, a = Δ_t / Δ_{t−1} and the
    iterations until Δ < eps are log(eps / Δ_t) / log a. Returns the largest
    over starts, at most ``left``; ``left`` when any start's increments do not
    yet shrink (a ≥ 1).

    Parameters
    ----------
    h : tensor of shape (R, 3)
        The last three log-likelihoods of the running starts, latest last.
    eps : float or tensor of shape (R,)
        The stopping rule's threshold on |Δℓ| (tol · n for the mean rule).
    left : int
        Iterations left before ``max_iter``.
    """
    if h.numel() == 0 or left <= 0:
        return max(left, 0)
    d1, d2 = (h[:, 1] - h[:, 0]).abs(), (h[:, 2] - h[:, 1]).abs()
    eps = torch.as_tensor(eps, dtype=h.dtype, device=h.device).expand_as(d2)
    ok = torch.isfinite(d1) & torch.isfinite(d2) & (d2 >= eps) & (eps > 0)
    if not bool(ok.any()):
        return min(1, left)
    d1, d2, eps = d1[ok], d2[ok], eps[ok]
    rate = d2 / d1.clamp_min(1e-300)
    if bool((rate >= 1).any()):
        return left
    steps = torch.log(eps / d2) / torch.log(rate)
    return int(min(left, math.ceil(float(steps.max())) + 1))


class FitProgress:
    """One fit's progress line (tqdm on stderr), or a no-op when disabled.

    Parameters
    ----------
    enabled : bool
        Draw anything at all (see :func:`progress_enabled`).
    delay : float, optional
        Seconds before the line first appears (default :data:`DELAY_S`, 2 s);
        stages announced with an expected duration above it appear at once.
    file : text stream, optional
        Default ``sys.stderr`` at the time of each fit.

    Use as a context manager; :meth:`stage` starts a stage, :meth:`advance`
    and :meth:`em` report within it.
    """

    def __init__(self, enabled: bool, *, delay: Optional[float] = None, file=None):
        self.enabled = bool(enabled)
        self._bar = None
        self._delay = DELAY_S if delay is None else float(delay)
        self._file = file
        self._stage: Optional[str] = None

    @classmethod
    def create(cls, progress: Union[bool, str], **kw) -> "FitProgress":
        """A display for the setting ``progress`` ("auto", True or False)."""
        return cls(progress_enabled(progress, kw.get("file")), **kw)

    def __enter__(self) -> "FitProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, file=self._file if self._file is not None else sys.stderr,
                             delay=self._delay, leave=False, dynamic_ncols=True, unit="it",
                             bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]{postfix}")
        return self._bar

    @property
    def stage_name(self) -> Optional[str]:
        return self._stage

    def stage(self, name: str, total: Optional[int] = None, unit: str = "it", expected_s: Optional[float] = None,
              detail: str = "") -> None:
        """Start stage ``name`` with ``total`` steps of ``unit`` (None: unknown).

        ``expected_s``: a blocking stage's expected seconds (shown; the line
        appears at once when it exceeds the delay); ``detail``: shown after it.
        """
        self._stage = name
        if not self.enabled:
            return
        bar = self._ensure()
        # one bar per fit (tqdm's delay counts from the fit's start); a stage restarts its count
        bar.total, bar.n, bar.last_print_n = total, 0, 0
        bar.unit = unit
        bar.set_description_str(name, refresh=False)
        post = detail
        if expected_s is not None:
            post = (f"{detail}, " if detail else "") + f"expected ~{expected_s:.0f} s"
        bar.set_postfix_str(post, refresh=False)
        visible = time.time() >= bar.start_t + self._delay  # tqdm times with time.time
        if visible or (expected_s is not None and expected_s > self._delay):
            bar.refresh()

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps done in the current stage."""
        if self.enabled and self._bar is not None:
            self._bar.update(steps)

    def em(self, it: int, remaining: int, active: int, starts: int) -> None:
        """EM at iteration ``it`` with ``remaining`` predicted iterations left, ``active`` of ``starts`` running."""
        if not self.enabled or self._bar is None:
            return
        bar = self._bar
        bar.total = it + max(int(remaining), 0)
        bar.set_postfix_str(f"{active}/{starts} starts running", refresh=False)
        bar.update(it - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
