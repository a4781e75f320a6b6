"""The textbook EM iteration, with the interface of the one-pass steppers (:mod:`moelab._fused.steppers`).

Per iteration: the E-step as (R, K, n) responsibilities and the log-likelihood
(:func:`moelab.fitcore.e_step`), then the closed-form expert M-step and the gate
step of :func:`moelab.fitcore.gate_step` (IRLS for linear logits, the damped
autograd Newton step otherwise, the Gaussian gate's closed form), each checked
within its own call. It runs for families without a one-pass kernel, callable
activations, ``gate_steps > 1``, float32, and where :func:`moelab.autocompile.pass_mode`
finds it the faster (small or multi-input uncompiled linear-logit fits).
"""

from __future__ import annotations

from typing import Optional

import torch

from .fitcore import State, cat_states, e_step, gate_step
from .mstep import expert_m_step, outer_design

__all__ = ["TextbookStepper", "GROUP_BYTES"]

#: with ``shared_by``, the starts run in groups whose (r, K, n) temporaries stay below this many bytes: larger
#: blocks are mapped afresh at every allocation (glibc's mmap threshold is at most 32 MB), and the page faults
#: cost the full diamonds fit (160, 3, 53,940: 207 MB per temporary) 40 s of system CPU
GROUP_BYTES = 16 * 2**20


class TextbookStepper:
    """R problems' data, ``x`` (R, n, d), ``x1`` (R, n, d+1), ``y`` (R, n), and the responsibilities of the
    last E-step; ``opts`` the fit's :class:`~moelab.options.FitOptions` (``reg_variance``, ``gate_steps``).
    ``sizes`` (R, K) holds the effective expert sizes Σ_n r_nk at each problem's last E-step.

    ``shared_by=R``: the R problems are starts of one fit with linear logits, and ``x`` (n, d), ``x1``
    (n, d+1), ``y`` (n,) their one data set, kept once. Each sum over samples is then one matrix product
    over all R·K rows instead of a batched one over R copies of the (n, (d+1)²) design moments (diamonds
    6,000 × 3 with 160 starts: 0.8 MB instead of 123 MB read per product), and dropping converged starts
    copies no data. ``ya`` is then a broadcast view (R, n)."""

    def __init__(self, x, x1, y, opts, shared_by: Optional[int] = None):
        self.shared = shared_by is not None
        if self.shared and not (x.dim() == 2 and x1.dim() == 2 and y.dim() == 1):
            raise ValueError("shared_by needs one data set: x (n, d), x1 (n, d+1), y (n,)")
        self.xa, self.x1a, self._y = x, x1, y
        self.xxa = outer_design(x1)
        self.opts = opts
        self.active = torch.arange(shared_by if self.shared else y.shape[0], device=y.device)
        self.resp = None
        self.sizes = None
        self._buffer = None  # responsibilities of grouped E-steps, reused across iterations

    def _groups(self, r: int, K: int):
        """Slices of the r current starts, each a group within :data:`GROUP_BYTES`; None for one group."""
        if not self.shared:
            return None
        size = max(1, GROUP_BYTES // (K * self._y.shape[0] * self._y.element_size()))
        return None if size >= r else [slice(i, min(i + size, r)) for i in range(0, r, size)]

    @property
    def ya(self):
        """(r, n) responses of the problems still iterating (a broadcast view with ``shared_by``)."""
        return self._y.expand(self.active.numel(), self._y.shape[0]) if self.shared else self._y

    def _record_sizes(self):
        S = self.resp.sum(-1)
        if self.sizes is None:
            self.sizes = S.new_zeros(self.active.numel(), S.shape[1])
        self.sizes[self.active] = S

    def evaluate(self, st: State):
        """E-step at ``st``: returns (st, loglik (r,))."""
        r, K = st.var.shape
        groups = self._groups(r, K)
        if groups is None:
            self.resp, ll = e_step(st.gate, st.theta, st.var, self.xa, self.x1a, self._y)
        else:
            if self._buffer is None or self._buffer.shape[0] < r:
                self._buffer = st.var.new_empty(r, K, self._y.shape[0])
            self.resp, lls = self._buffer[:r], []
            for g in groups:
                sub = st.take(g)
                self.resp[g], ll_g = e_step(sub.gate, sub.theta, sub.var, self.xa, self.x1a, self._y)
                lls.append(ll_g)
            ll = torch.cat(lls)
        self._record_sizes()
        return st, ll

    def evaluate_extrapolated(self, ext: State, plain: State, ll_min, same=None):
        """E-step at ``ext``; where its log-likelihood is not finite or below ``ll_min`` (r,), at ``plain``
        instead, except where ``same`` (r,) bool says ``ext`` is ``plain``. Returns (state, loglik (r,),
        accepted (r,) bool); see :mod:`moelab.acceleration`."""
        st, ll = self.evaluate(ext)
        ok = torch.isfinite(ll) & (ll >= ll_min)
        redo = ~ok if same is None else ~ok & ~same
        if not bool(redo.any()):
            return st, ll, ok
        idx = redo.nonzero().squeeze(-1)
        sub = plain.take(idx)
        data = (self.xa, self.x1a, self._y) if self.shared else (self.xa[idx], self.x1a[idx], self._y[idx])
        resp, llb = e_step(sub.gate, sub.theta, sub.var, *data)
        self.resp[idx] = resp
        self._record_sizes()
        st = st.put(idx, sub)
        return st, ll.index_put((idx,), llb), ok

    def keep(self, mask):
        """Problems ``mask`` (bool over the current ones) go on iterating."""
        self.active = self.active[mask]
        if not self.shared:
            self.xa, self.x1a, self._y, self.xxa = self.xa[mask], self.x1a[mask], self._y[mask], self.xxa[mask]
        self.resp = self.resp[mask]

    def m_step(self, st: State, checked: bool = False) -> State:
        """Closed-form experts, then the gate step, from the last E-step's responsibilities (checked at once;
        ``checked`` is for the steppers that defer the check to the next pass)."""
        groups = self._groups(*st.var.shape) or [slice(None)]
        parts = []
        for g in groups:
            sub, resp = (st, self.resp) if len(groups) == 1 else (st.take(g), self.resp[g])
            theta, var = expert_m_step(self.x1a, self._y, resp, self.opts.reg_variance, sub.theta, sub.var, self.xxa)
            gate = gate_step(sub.gate, self.xa, self.x1a, resp, self.opts.gate_steps, self.xxa)
            parts.append(State(gate, theta, var))
        return cat_states(parts)
