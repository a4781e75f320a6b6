"""The one-pass EM iteration: E-step and every M-step statistic in a single pass over the data.

The textbook EM loop materialises the responsibilities (R, K, n) and runs
dozens of full-size tensor operations per iteration, so at large R·n it is
bound by memory traffic. For every gate family that declares it
(``Gate.em_pass``, :mod:`moelab.gates.registry`), everything an EM iteration
needs from the data is a fixed set of sums over samples:

* ``"linear"`` (softmax, temperature: logits linear in
  ``Gate.logit_coefficients``) — :mod:`moelab._fused.linear`: IRLS from the
  moments of the gate weights; the step is checked by the next pass;
* ``"newton"`` (activation with fixed or estimated τ, top-K) —
  :mod:`moelab._fused.newton`: damped Newton from closed-form derivatives
  of the logits; activation gates have the step checked by the next pass
  (as linear gates), top-K by a pass at the candidates.

Each pass runs compiled by ``torch.compile`` (one fused loop over the samples,
:class:`~moelab._fused.cache.KernelCache`) or eagerly on blocks of samples
(:func:`~moelab._fused.cache.run_blocked`), the same functions either way, so
compiled and eager fits agree to rounding. :mod:`moelab._fused.steppers` drives
an EM iteration for :func:`moelab.fit_em`.

The kernels unroll experts and features into (R, n)-shaped operations; the
graph grows like the number of sums, so :func:`supported` limits it to
small models (the simulation studies' regime).
"""

from __future__ import annotations

import warnings

import torch

from . import linear, newton
from .cache import KERNELS, KernelCache, Runner, run_blocked
from .linear import (MAX_SUMS, em_statistics, em_sums, expert_update, gate_lse_sum, gate_proposal, gate_verify,
                     logit_range, unpack_sums)
from .steppers import LinearStepper, NewtonStepper

__all__ = ["supported", "pass_spec", "n_sums", "MAX_SUMS", "available", "kernel_key", "runner", "stepper",
           "statistics", "em_sums", "unpack_sums", "em_statistics", "gate_lse_sum", "logit_range", "expert_update",
           "gate_proposal", "gate_verify", "m_step", "KernelCache", "kernels", "KERNELS", "run_blocked", "Runner",
           "linear", "newton"]

LINEAR = ("linear",)

#: the process's compiled kernels (see :class:`~moelab._fused.cache.KernelCache`)
kernels = KernelCache()


def pass_spec(gate):
    """The one-pass kernel spec of ``gate`` (``Gate.em_pass_spec()``), or None where no pass covers it."""
    fn = getattr(gate, "em_pass_spec", None)
    return fn() if fn is not None else None


def n_sums(K: int, d: int, spec=LINEAR) -> int:
    """Sums over samples one pass computes for K experts and d features."""
    return linear.n_sums(K, d) if spec == LINEAR else newton.n_sums(spec, K, d)


def supported(gate, K: int, d: int) -> bool:
    """True for gates whose family declares a pass covering them, with K ≥ 2 and at most MAX_SUMS sums."""
    spec = pass_spec(gate)
    return spec is not None and K >= 2 and n_sums(K, d, spec) <= MAX_SUMS


def kernel_key(K: int, d: int, dtype, device, spec=LINEAR) -> tuple:
    """The key of the compiled kernels for a pass spec, K experts, d features, dtype and device type."""
    return (K, d, str(dtype), torch.device(device).type) + ((spec,) if spec != LINEAR else ())


def runner(compiled: bool) -> Runner:
    """The kernels compiled (through :data:`kernels`) or eager and blocked over samples."""
    return Runner(kernels, compiled)


def stepper(gate, x, y, var_floor, compiled: bool):
    """The one-pass EM iteration for ``gate``'s family on x (R, n, d), y (R, n) (see :mod:`.steppers`)."""
    spec = pass_spec(gate)
    cls = LinearStepper if spec == LINEAR else NewtonStepper
    return cls(spec, x, y, var_floor, runner(compiled))


def _check_problem(K, d, spec, dtype, device):
    """Small random problem and the kernels' compiled and eager outputs on it (pairs to compare)."""
    gen = torch.Generator().manual_seed(0)
    R, n, p = 3, 17, d + 1
    kw = dict(dtype=dtype)
    x = torch.rand(R, n, d, generator=gen, **kw).to(device)
    y = torch.randn(R, n, generator=gen, **kw).to(device)
    th = torch.randn(R, K, p, generator=gen, **kw).to(device)
    th[:, -1] = 0
    eth = torch.randn(R, K, p, generator=gen, **kw).to(device)
    var = (torch.rand(R, K, generator=gen, **kw) + 0.5).to(device)
    if spec == LINEAR:
        cand = torch.stack([th, 0.5 * th, -th])  # the step-size search evaluates several at once
        calls = [(em_sums, (th, eth, var, x, y)), (gate_lse_sum, (cand, x)), (logit_range, (eth, x))]
        if d == 1:  # the one-feature M-step, on the sums of a pass (and of one problem: a graph of its own)
            sums = em_sums(th, eth, var, x, y)
            lo, hi = x[..., 0].amin(-1), x[..., 0].amax(-1)
            floor = torch.tensor(1e-8, dtype=dtype, device=device)  # a tensor, as the stepper passes it
            calls += [(linear.m_step_one_feature, (sums, th, eth, var, lo, hi, n, floor)),
                      (linear.m_step_one_feature, (sums[:1], th[:1], eth[:1], var[:1], lo[:1], hi[:1], n, floor))]
    else:
        slope, icpt = th[..., :-1].contiguous(), th[..., -1].contiguous()
        tau = (torch.rand(R, generator=gen, **kw) + 0.5).to(device)
        args = (slope, icpt, tau, eth, var, x, y, spec)
        cs, ci, ct = torch.stack([slope, 0.5 * slope]), torch.stack([icpt, -icpt]), torch.stack([tau, 2 * tau])
        calls = [(newton.newton_sums, args), (newton.newton_q, (cs, ci, ct) + args)]
        if spec[0] == "activation":
            check = torch.softmax(torch.randn(R, K, n, generator=gen, **kw), 1).to(device)
            resp = newton.newton_sums_resp(*args[:-1], check, spec)[1]
            calls += [(newton.newton_sums_resp, args[:-1] + (check, spec)), (newton.newton_q_resp, (cs, ci, ct, resp, x, spec)),
                      (newton.newton_q_resp, (cs[:1], ci[:1], ct[:1], resp, x, spec))]  # one candidate: a graph of its own
    return [(kernels.get(fn)(*a, fallback=False), fn(*a)) for fn, a in calls]


def available(K: int, d: int, dtype, device, strict: bool = False, spec=LINEAR) -> bool:
    """Compile (or load from Inductor's cache) the pass kernels for a spec, K experts, d features.

    Runs them once on a small problem and checks them against the eager
    functions. Returns False (with a warning) if compilation fails, e.g.
    without a C++ compiler on CPU; ``strict=True`` raises RuntimeError instead.
    """
    key = kernel_key(K, d, dtype, device, spec)
    if kernels.is_ready(key):  # compiled and checked earlier in this process
        return True
    if kernels.is_broken(key) and not strict:
        return False
    try:
        for got, ref in _check_problem(K, d, spec, dtype, device):
            torch.testing.assert_close(got, ref)
    except Exception as exc:  # compiler missing, Inductor error, or wrong results
        kernels.mark_broken(key, repr(exc))
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        hint = "torch.compile on CPU needs a C++ compiler (g++/clang) if that is the cause"
        if strict:
            raise RuntimeError(f"compile=True: torch.compile of the fused EM kernels failed ({cause}); {hint}; "
                               "or pass compile='auto' (falls back to the eager loop) or compile=False") from exc
        msg = (f"torch.compile of the fused EM kernels failed ({cause}); running the eager EM loop instead "
               f"({hint}; pass compile=False to skip this attempt)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return False
    kernels.mark_ready(key)
    return True


def statistics(gate_theta, expert_theta, var, x, y, compiled: bool = True):
    """:func:`~moelab._fused.linear.em_statistics` with the pass compiled (default) or eager (blocked)."""
    sums = runner(compiled)(em_sums, gate_theta, expert_theta, var, x, y)
    return unpack_sums(sums, gate_theta.shape[1], x.shape[-1])


def m_step(st, gate_theta, expert_theta, var, x, var_floor, compiled: bool = True):
    """One full linear-gate M-step from the statistics (:func:`moelab._fused.linear.m_step`)."""
    return linear.m_step(st, gate_theta, expert_theta, var, x, var_floor, runner(compiled))
