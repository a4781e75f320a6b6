"""The routed experts' element-wise work: fused by ``torch.compile`` (Inductor's C++ backend) or eager.

Between the expert matmuls (which stay in ATen: they are the compute floor) the layer makes
element-wise passes over blocks of several MB: the SwiGLU non-linearity with the factors of its
derivative, and the weighted combine of the expert outputs (and of the input gradient). Eagerly
each ATen op is one pass over memory; compiled, Inductor generates one vectorised C++ (OpenMP)
loop per kernel below that reads its inputs once and writes its outputs once. Each kernel is a
pure function that writes into given output tensors (views of the layer's workspace, so nothing is
allocated) and has an eager twin that computes the same with ATen ops; the twin runs whenever the
compiled kernel cannot (no C++ compiler, unsupported platform, a failed call, or a tensor with a
dimension below 2, which dynamo would compile separately).

The kernels (``rows`` = assignments of one expert, or of all experts; ``d`` = ``d_model``):

======================  ==========================================================================
``swiglu_forward``      ``act = silu(g) · u``, ``u · silu'(g)``, ``silu(g)`` for ``h = [g, u]``
``swiglu``              ``act = silu(g) · u`` only (no graph recorded)
``sum_rows``            ``out[t] = Σ_{j<k} w[o_tj] · rows[o_tj]``, ``o = order.view(T, k)``
``gather_sum``          the same without weights (the input gradient's combine)
======================  ==========================================================================

Measured in place, one thread, on the layer of ``benchmarks/nn_layer.py`` (per forward+backward,
CPU time): SwiGLU forward 21.3 → 12.6 ms, combine 6.2 → 2.3 ms. Fusing the backward's passes too
was tried and is not used: recomputing ``silu(g)`` from a saved ``h`` made the backward slower than
one multiply by the saved factors (the sigmoid costs as much as the memory traffic, 17.0 against
11.7 ms, and the forward's matmul then writes ``h`` to cold memory), and a compiled gather-and-scale
of the output gradient was slower than ATen's ``index_select`` (13.0 against 10.8 ms).

:class:`ElementwiseKernels` (one per process, ``moelab.nn.elementwise.kernels``) holds the
compiled functions and what is known about them: per (device type, dtype) whether they compiled
and matched the eager twins on a small problem, and which failed later. A failure is reported once
(``warnings.warn`` when the fused kernels were asked for with ``True``; a log record of the
``moelab.nn`` logger under ``"auto"``) and the layer runs eagerly from then on — same results to
rounding, slower. Graphs are compiled with ``dynamic=True``, so a different number of tokens per
expert does not recompile; dynamo does recompile for a new dtype, a new intra-op thread count
(``torch.set_num_threads``) and a new ``top_k`` (``sum_rows``, ``gather_sum``).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "ElementwiseKernels",
    "FusedKernels",
    "kernels",
    "resolve_fused_elementwise",
    "AUTO_DTYPES",
    "AUTO_MIN_ELEMENTS",
    "FUSED_SETTINGS",
    "swiglu_forward",
    "swiglu",
    "sum_rows",
    "gather_sum",
]

logger = logging.getLogger("moelab.nn")

#: the values ``fused_elementwise`` accepts
FUSED_SETTINGS = ("auto", True, False)
#: dtypes for which ``"auto"`` uses the compiled kernels (on CPU)
AUTO_DTYPES = (torch.float32, torch.bfloat16)
#: ``"auto"`` compiles only for calls with at least this many hidden elements (assignments × d_ff)
AUTO_MIN_ELEMENTS = 1 << 20


# ---------------------------------------------------------------- kernels (traced by torch.compile)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, act: torch.Tensor, du_factor: torch.Tensor,
                   silu_g: torch.Tensor) -> None:
    """SwiGLU forward and the factors of its derivative, in one pass over ``h = [g, u]``.

    ``act = silu(g) · u``, ``du_factor = u · silu'(g)`` and ``silu_g = silu(g)``, all of shape
    (rows, d_ff), so that ``dL/dh = dL/da · [du_factor, silu_g]`` (Shazeer 2020, "GLU variants",
    Eq. (6)); ``silu'(g) = σ(g) (1 + g (1 − σ(g)))``, the formula of ATen's ``silu_backward``.
    """
    s = torch.sigmoid(g)
    silu = g * s
    act.copy_(silu * u)
    du_factor.copy_(u * (s * (1 + g * (1 - s))))
    silu_g.copy_(silu)


def swiglu(g: torch.Tensor, u: torch.Tensor, act: torch.Tensor) -> None:
    """``act = silu(g) · u`` (the forward without a graph to record); all of shape (rows, d_ff)."""
    act.copy_(F.silu(g) * u)


def sum_rows(rows: torch.Tensor, order: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = Σ_{j<k} weight[o[t, j]] · rows[o[t, j]]`` with ``o = order.view(n_tokens, k)``, summed in order of j.

    ``rows`` (n_assign, d), ``order`` (n_assign,) long (each token's assignments, token by token),
    ``weight`` (n_assign,), ``out`` (n_tokens, d), ``k = n_assign / n_tokens``: the weighted combine
    of the expert outputs without a zero-filled output or a scatter-add.
    """
    o = order.view(out.shape[0], -1)
    acc = rows[o[:, 0]] * weight[o[:, 0], None]
    for j in range(1, o.shape[1]):
        acc = acc + rows[o[:, j]] * weight[o[:, j], None]
    out.copy_(acc)


def gather_sum(rows: torch.Tensor, order: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = Σ_{j<k} rows[o[t, j]]`` (as :func:`sum_rows` without weights: the input gradient's combine)."""
    o = order.view(out.shape[0], -1)
    acc = rows[o[:, 0]]
    for j in range(1, o.shape[1]):
        acc = acc + rows[o[:, j]]
    out.copy_(acc)


# ---------------------------------------------------------------- eager twins (same results to rounding)


def _swiglu_forward_eager(g, u, act, du_factor, silu_g):
    torch.ops.aten.silu.out(g, out=silu_g)
    torch.mul(silu_g, u, out=act)
    torch.ops.aten.silu_backward.grad_input(u, g, grad_input=du_factor)


def _swiglu_eager(g, u, act):
    torch.mul(F.silu(g), u, out=act)


def _sum_rows_eager(rows, order, weight, out):
    o = order.view(out.shape[0], -1)
    torch.mul(rows[o[:, 0]], weight[o[:, 0], None], out=out)
    for j in range(1, o.shape[1]):
        out.add_(rows[o[:, j]] * weight[o[:, j], None])


def _gather_sum_eager(rows, order, out):
    o = order.view(out.shape[0], -1)
    torch.index_select(rows, 0, o[:, 0], out=out)
    for j in range(1, o.shape[1]):
        out.add_(rows[o[:, j]])


KERNELS = {
    "swiglu_forward": (swiglu_forward, _swiglu_forward_eager),
    "swiglu": (swiglu, _swiglu_eager),
    "sum_rows": (sum_rows, _sum_rows_eager),
    "gather_sum": (gather_sum, _gather_sum_eager),
}


def _detached(args) -> tuple:
    """The arguments without autograd flags: dynamo guards on ``requires_grad``, which the kernels never need
    (they run inside an autograd Function), so a training and an inference call share one graph."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _small(args) -> bool:
    """True if a tensor argument has a dimension below 2 (dynamo would compile sizes 0 and 1 separately)."""
    return any(isinstance(a, torch.Tensor) and any(s < 2 for s in a.shape) for a in args)


class FusedKernels:
    """The kernels of this module as methods, each compiled when it can run compiled, else eager.

    Made by :meth:`ElementwiseKernels.select`; ``compiled=False`` gives the eager twins only (the
    reference in tests, and the layer's path after a failure).
    """

    def __init__(self, owner: "ElementwiseKernels", compiled: bool, report: Callable[[str], None]):
        self._owner, self.compiled, self._report = owner, compiled, report
        for name in KERNELS:
            setattr(self, name, self._bind(name))

    def _bind(self, name):
        owner = self._owner
        eager = KERNELS[name][1]
        if not self.compiled:
            return eager
        report = self._report

        def call(*args):
            if _small(args) or owner.failed(name):
                return eager(*args)
            args = _detached(args)
            try:  # compiled by the start-up check (which mutes torch's own warnings); no global state touched here
                return owner.compiled_fn(name)(*args)
            except Exception as exc:  # a recompilation that fails mid-run, say
                owner.mark_failed(name, exc)
                report(f"the compiled element-wise kernel {name} failed ({type(exc).__name__}: "
                       f"{_first_line(exc)}); running it eagerly from now on in this process (same results, slower)")
                return eager(*args)

        call.__name__ = name
        return call


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


class ElementwiseKernels:
    """What this process knows about the compiled element-wise kernels.

    * :meth:`compiled_fn` — a kernel wrapped by ``torch.compile(fullgraph=True, dynamic=True)``
      once per process;
    * :meth:`available` — whether they compiled and matched the eager twins for a (device type,
      dtype), checked once (the check is the caller's: a small forward + backward);
    * :meth:`failed` / :meth:`mark_failed` — kernels whose compiled call failed after the check;
    * :meth:`select` — the :class:`FusedKernels` to use for one call, or None (eager layer path);
    * :meth:`clear` — forget all of it (tests).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._compiled: dict = {}
        self._status: dict = {}  # (device type, dtype) -> True, or the failure's text
        self._failed_calls: dict = {}
        self._reported: set = set()
        self._sets: dict = {}  # way of reporting -> FusedKernels
        #: seconds the last successful check took (compile included), per (device type, dtype)
        self.check_seconds: dict = {}

    def clear(self) -> None:
        with self._lock:
            self._compiled.clear()
            self._status.clear()
            self._failed_calls.clear()
            self._reported.clear()
            self._sets.clear()
            self.check_seconds.clear()

    def compiled_fn(self, name: str):
        """``torch.compile`` of the kernel ``name`` (made on first use)."""
        with self._lock:
            fn = self._compiled.get(name)
            if fn is None:
                fn = self._compiled[name] = torch.compile(KERNELS[name][0], fullgraph=True, dynamic=True)
            return fn

    def failed(self, name: str) -> bool:
        return name in self._failed_calls

    def mark_failed(self, name: str, exc: BaseException) -> None:
        self._failed_calls[name] = repr(exc)

    def status(self, dtype: torch.dtype, device: torch.device):
        """True (compiled and checked), the text of the failure, or None (not tried yet)."""
        return self._status.get((torch.device(device).type, dtype))

    def available(self, dtype: torch.dtype, device: torch.device, check: Callable[[FusedKernels], None],
                  report: Callable[[str], None]) -> bool:
        """Whether the compiled kernels work for ``dtype`` on ``device``'s type; ``check`` runs once per key.

        ``check(fused)`` must run every kernel through ``fused`` (compiling them) and raise if the
        results differ from the eager twins'. On failure ``report`` gets one message and False is
        returned from then on, without a new attempt.
        """
        key = (torch.device(device).type, dtype)
        with self._lock:
            known = self._status.get(key)
            if known is True:
                return True
            if known is None:
                t0 = time.perf_counter()
                try:
                    check(_Strict(self))
                except Exception as exc:  # no compiler, an Inductor error, or results that differ
                    known = self._status[key] = f"{type(exc).__name__}: {_first_line(exc)}"
            if known is not None:  # this attempt or an earlier one failed: said once per way of reporting
                report(f"torch.compile of the fused element-wise kernels failed for {dtype} on {key[0]} "
                       f"({known}); the MoE layer runs its eager element-wise path instead (same results, "
                       "slower). torch.compile on CPU needs a C++ compiler (g++ or clang); "
                       "pass fused_elementwise=False to skip this attempt")
                return False
            self._status[key] = True
            self.check_seconds[key] = time.perf_counter() - t0
            logger.info("compiled the fused element-wise kernels for %s on %s in %.1f s", dtype, key[0],
                        self.check_seconds[key])
            return True

    def select(self, setting: Union[str, bool], dtype: torch.dtype, device: torch.device, n_elements: int,
               check: Callable[[FusedKernels], None]) -> Optional[FusedKernels]:
        """The kernels for one call under ``fused_elementwise=setting``, or None for the eager layer path.

        ``"auto"``: compiled on CPU for :data:`AUTO_DTYPES` when ``n_elements`` (assignments × d_ff)
        is at least :data:`AUTO_MIN_ELEMENTS` and the check passes (a failure is logged once).
        ``True``: compiled for any dtype and device when the check passes (a failure warns once).
        ``False``: None.
        """
        if setting is False:
            return None
        if setting == "auto":
            if torch.device(device).type != "cpu" or dtype not in AUTO_DTYPES or n_elements < AUTO_MIN_ELEMENTS:
                return None
            report = self._logger_report
        else:
            report = self._warning_report
        if not self.available(dtype, device, check, report):
            return None
        with self._lock:
            fused = self._sets.get(report.__name__)
            if fused is None:
                fused = self._sets[report.__name__] = FusedKernels(self, True, report)
            return fused

    def _warning_report(self, message: str) -> None:
        if ("warning", message) not in self._reported:
            self._reported.add(("warning", message))
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _logger_report(self, message: str) -> None:
        if ("log", message) not in self._reported:
            self._reported.add(("log", message))
            logger.warning(message)


class _Strict(FusedKernels):
    """Compiled kernels that raise instead of falling back (the availability check)."""

    def __init__(self, owner: ElementwiseKernels):
        self._owner, self.compiled, self._report = owner, True, None
        for name in KERNELS:
            setattr(self, name, self._strict(name))

    def _strict(self, name):
        def call(*args):
            if _small(args):
                raise ValueError(f"the check of {name} must use sizes of at least 2 (got {[tuple(getattr(a, 'shape', ())) for a in args]})")
            with warnings.catch_warnings():
                # torch.compile imports torch.jit helpers that warn (not actionable by a user)
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                return self._owner.compiled_fn(name)(*_detached(args))

        return call


#: the process's compiled kernels and their state
kernels = ElementwiseKernels()


def resolve_fused_elementwise(setting) -> Union[str, bool]:
    """Validate a ``fused_elementwise`` setting: ``"auto"``, True or False.

    Raises
    ------
    TypeError
        For anything else (a string other than "auto", a number, None).
    """
    if setting is True or setting is False or (isinstance(setting, str) and setting == "auto"):
        return setting
    raise TypeError(f"fused_elementwise must be 'auto', True or False, got {setting!r}; "
                    "'auto' compiles the element-wise kernels on CPU for float32/bfloat16 calls large enough to pay")
