"""Input checks shared by the model, the estimators and the CLI.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the
offending argument, what was found, and how to fix it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["as_tensor", "check_finite", "check_positive", "check_xy", "tiny"]


def as_tensor(value, name: str, dtype=None, device=None) -> torch.Tensor:
    """Convert ``value`` to a floating tensor without modifying the caller's object.

    Raises
    ------
    TypeError
        If ``value`` cannot be converted to a numeric tensor.
    """
    try:
        if isinstance(value, torch.Tensor):
            t = value
        else:
            # copy: never alias (or later modify) the caller's array
            t = torch.as_tensor(np.array(value))
    except Exception as exc:  # pragma: no cover - message path tested via callers
        raise TypeError(f"{name} must be array-like of numbers; could not convert ({exc})") from None
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    target = dtype if dtype is not None else (t.dtype if t.is_floating_point() else torch.get_default_dtype())
    return t.to(dtype=target, device=device if device is not None else t.device)


def tiny(dtype: torch.dtype) -> float:
    """A positive floor for divisions and logs: 1e-300 in float64, the dtype's smallest normal number
    (``torch.finfo(dtype).tiny``) where 1e-300 would underflow to 0 (float32, bfloat16, float16)."""
    return max(1e-300, float(torch.finfo(dtype).tiny))


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``t`` holds NaN or ±inf."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        # NaN and ±inf propagate through a sum, so a finite sum proves every entry finite in one
        # reduction, without the boolean mask (an overflowing sum of finite values takes the full check)
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite value(s) (first at index {first}); "
            "remove or impute those rows before fitting"
        )


def check_positive(t: torch.Tensor, name: str, fix: str = "") -> None:
    """Raise ``ValueError`` if any entry of ``t`` is not strictly positive."""
    bad = ~(t > 0)
    if bool(bad.any()):
        vals = t[bad].flatten()[:5].tolist()
        raise ValueError(
            f"{name} must be > 0, got {vals}{' (first 5 shown)' if int(bad.sum()) > 5 else ''}"
            + (f"; {fix}" if fix else "")
        )


def check_shape(t: torch.Tensor, name: str, expected: Sequence[object]) -> None:
    """Check trailing dimensions of ``t`` against ``expected`` (ints, or None for any)."""
    tail = tuple(t.shape[len(t.shape) - len(expected):]) if t.dim() >= len(expected) else None
    ok = tail is not None and all(e is None or e == s for e, s in zip(expected, tail))
    if not ok:
        want = "(..., " + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check x of shape (..., n_samples, n_features) against y of shape (..., n_samples)."""
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (..., n_samples, n_features), got {tuple(x.shape)}; "
            "for a single input column use x.reshape(-1, 1)"
        )
    if y.dim() < 1:
        raise ValueError(f"y must have shape (..., n_samples), got a scalar")
    if x.shape[-2] != y.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-2]} samples but y has {y.shape[-1]}; x and y must have the same number of rows"
        )
    check_finite(x, "x")
    check_finite(y, "y")
