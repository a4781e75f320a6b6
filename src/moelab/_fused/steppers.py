"""One EM iteration as passes over the data, for :func:`moelab.em` 's loop.

A stepper holds the data of the problems still iterating and the statistics
of the last pass. Per iteration the loop calls :meth:`evaluate` (the pass at
the current parameters: log-likelihood, effective expert sizes, statistics),
:meth:`keep` when problems leave the batch, and :meth:`m_step`.

* :class:`LinearStepper` — linear-logit gates: the gate step proposed by one
  M-step is checked by the next iteration's pass (Q_gate needs only the
  Σ logsumexp at the proposal), so an iteration is one pass; problems whose
  proposal did not increase Q search smaller steps and redo their pass. With one feature the
  M-step is one call (:func:`moelab._fused.linear.m_step_one_feature`, compiled with the pass):
  once few problems remain, the iteration's fixed cost is what a batch pays (measured, 2
  problems of 200 samples, K = 3, one thread: 2.0 → 1.35 ms per iteration).
* :class:`NewtonStepper` — activation and top-K gates: Q_gate at a candidate
  needs the responsibilities of the pass the step was computed from. For
  activation gates the next pass takes them as an input and returns Q_gate
  at its own gate (the proposal), so an iteration is again one pass; failed
  steps search the more damped ones with
  :func:`moelab._fused.newton.newton_q_resp` and redo their pass. Top-K
  checks the step at once by :func:`moelab._fused.newton.newton_q`, which
  recomputes the responsibilities (its routing test needs the eager E-step's zeros).
"""

from __future__ import annotations

import torch

from ..fitcore import State, gate_theta, theta_gate
from ..mstep import GateParameters
from . import linear, newton

__all__ = ["LinearStepper", "NewtonStepper"]


class _Stepper:
    def __init__(self, spec, x, y, var_floor, run):
        self.spec, self.run, self.var_floor = spec, run, var_floor
        R, n, _ = x.shape
        self.n = n
        self.xa, self.ya = x, y
        self.active = torch.arange(R, device=x.device)
        self.stats = None
        #: effective expert sizes Σ_n r_nk at the last pass of each problem (R, K)
        self.sizes = None

    def _record_sizes(self, stats):
        sizes = self._sizes(stats)
        if self.sizes is None:
            self.sizes = sizes.new_zeros(self.active.numel(), sizes.shape[1])
        self.sizes[self.active] = sizes

    @staticmethod
    def _sizes(stats):
        """Σ_n r_nk (r, K) from a pass's statistics."""
        return stats["S"][..., -1]

    def keep(self, mask):
        """Problems ``mask`` (bool over the current ones) go on iterating."""
        self.active = self.active[mask]
        self.xa, self.ya = self.xa[mask], self.ya[mask]
        self.stats = {k: v[mask] for k, v in self.stats.items()}

    def evaluate_extrapolated(self, ext: State, plain: State, ll_min, same=None):
        """The pass at the extrapolated ``ext`` (:mod:`moelab.acceleration`); where its log-likelihood
        is not finite or below ``ll_min`` (r,), the pass at the plain EM point ``plain`` instead, checked
        as :meth:`evaluate` checks it. ``same`` (r,) bool: problems whose ``ext`` *is* ``plain`` (step
        length 1): this pass is already their plain pass, so it is redone only where the plain point's
        pending gate step fails its check from this pass (as :meth:`evaluate` would). Returns (state,
        loglik (r,), accepted (r,) bool: the extrapolation test, also where the plain pass was kept)."""
        pending = self._suspend()
        st, ll = self.evaluate(ext)
        ok = torch.isfinite(ll) & (ll >= ll_min)
        redo = ~ok
        if same is not None:  # the plain pass: kept where its pending gate step passes the check
            redo = torch.where(same, ~torch.as_tensor(self._step_ok(pending), device=ok.device), redo)
        if not bool(redo.any()):
            return st, ll, ok
        idx = redo.nonzero().squeeze(-1)
        sub, stats = self._evaluate_subset(plain.take(idx), idx, pending)
        for k, v in stats.items():
            self.stats[k][idx] = v
        self._record_sizes(self.stats)
        st = st.put(idx, sub)
        return st, self.stats["loglik"], ok

    def _suspend(self):
        return None

    def _step_ok(self, pending):
        """(r,) bool, or True: where the last pass, at the plain point, passes the check of its gate step ``pending``."""
        return True if pending is None else torch.zeros(self.ya.shape[0], dtype=torch.bool, device=self.ya.device)

    def _evaluate_subset(self, st: State, idx, pending):  # pragma: no cover - abstract
        raise NotImplementedError


class LinearStepper(_Stepper):
    """Softmax and temperature gates (:mod:`moelab._fused.linear`)."""

    def __init__(self, spec, x, y, var_floor, run):
        super().__init__(spec, x, y, var_floor, run)
        # one feature: |δ·[x, 1]| is largest at min or max x, no pass needed for the step cap
        self.x_range = (x[..., 0].amin(-1), x[..., 0].amax(-1)) if x.shape[-1] == 1 else None
        # a tensor, not a float: dynamo specialises a compiled function on float arguments, so every new floor
        # would compile the M-step again (measured: 2.6 CPU-s in the first fit after prepare_compiled)
        self.var_floor_t = torch.as_tensor(var_floor, dtype=x.dtype, device=x.device)
        self.pending = None

    def _pass(self, gth, theta, var, xa, ya):
        """The pass's sums (r, M) and views of the columns the loop reads (the M-step unpacks the rest)."""
        sums = self.run(linear.em_sums, gth, theta, var, xa, ya)
        K, q = gth.shape[1], len(linear.monomials(xa.shape[-1]))
        return dict(sums=sums, loglik=sums[:, 0], lse_gate=sums[:, 1], sizes=sums[:, 2 : 2 + K * q : q])

    @staticmethod
    def _sizes(stats):
        return stats["sizes"]

    def evaluate(self, st: State):
        """The pass at ``st``; returns (state, loglik (r,)), the state's gate corrected where the
        proposed step did not increase Q_gate."""
        gth = gate_theta(st.gate)
        stats = self._pass(gth, st.theta, st.var, self.xa, self.ya)
        if self.pending is not None:
            gth, redo = linear.gate_verify(stats["lse_gate"], self.pending, self.xa, self.run)
            self.pending = None
            if redo is not None:
                sub = self._pass(gth[redo], st.theta[redo], st.var[redo], self.xa[redo], self.ya[redo])
                for k, v in sub.items():
                    stats[k][redo] = v
                st = State(theta_gate(st.gate, gth), st.theta, st.var)
        self.stats, self.gth = stats, gth
        self._record_sizes(stats)
        return st, stats["loglik"]

    def _suspend(self):
        # the gate step proposed by the last M-step belongs to the plain point, not the extrapolated one
        pending, self.pending = self.pending, None
        return pending

    def _step_ok(self, pending):
        return True if pending is None else linear.gate_step_ok(self.stats["lse_gate"], pending)

    def _evaluate_subset(self, st: State, idx, pending):
        gth = gate_theta(st.gate)
        xa, ya = self.xa[idx], self.ya[idx]
        stats = self._pass(gth, st.theta, st.var, xa, ya)
        if pending is not None:
            gth, redo = linear.gate_verify(stats["lse_gate"], {k: v[idx] for k, v in pending.items()}, xa, self.run)
            if redo is not None:
                sub = self._pass(gth[redo], st.theta[redo], st.var[redo], xa[redo], ya[redo])
                for k, v in sub.items():
                    stats[k][redo] = v
                st = State(theta_gate(st.gate, gth), st.theta, st.var)
        self.gth = self.gth.index_put((idx,), gth)
        return st, stats

    def keep(self, mask):
        super().keep(mask)
        self.gth = self.gth[mask]
        if self.x_range is not None:
            self.x_range = (self.x_range[0][mask], self.x_range[1][mask])

    def m_step(self, st: State, checked: bool = False) -> State:
        # ``checked`` (the state is extrapolated from next) is not needed: an IRLS step rarely fails its check
        sums = self.stats["sums"]
        K, d = st.theta.shape[-2], self.xa.shape[-1]
        if self.x_range is not None:  # one feature: the whole M-step is one kernel call (compiled: one graph)
            theta, var, bad, gth, self.pending = self.run(linear.m_step_one_feature, sums, self.gth, st.theta, st.var,
                                                          *self.x_range, self.n, self.var_floor_t)
            if bool(bad.any()):  # a singular weighted least-squares system: those experts by least squares
                theta, var = linear.expert_lstsq(linear.unpack_sums(sums, K, d), st.theta, st.var, self.n, self.var_floor,
                                                 bad, theta, var)
        else:
            stats = linear.unpack_sums(sums, K, d)
            theta, var = linear.expert_update(stats, st.theta, st.var, self.n, self.var_floor)
            gth, self.pending = linear.gate_proposal(stats, self.gth, self.xa, self.run)
        return State(theta_gate(st.gate, gth), theta, var)


class NewtonStepper(_Stepper):
    """Activation and top-K gates (:mod:`moelab._fused.newton`).

    Activation gates: the M-step proposes the least damped Newton step (:func:`newton.propose`)
    and the next pass, given the responsibilities of the pass before, returns Q_gate at it
    (:func:`newton.newton_sums_resp`'s last column), so an iteration is one pass; problems whose
    step did not increase Q_gate take the more damped steps' best (:func:`newton.verify`, Q from
    those responsibilities) and redo their pass. Top-K checks at once (:func:`newton.m_step`).
    """

    def __init__(self, spec, x, y, var_floor, run):
        super().__init__(spec, x, y, var_floor, run)
        self.x_abs_max = x.abs().amax(-2).amax(-1)
        # activation gates keep the pass's responsibilities for the step check (no second E-step); top-K
        # recomputes them in newton_q (its routing test needs the eager E-step's zeros)
        self.keep_resp = spec[0] == "activation"
        self.pending = None

    def _pass(self, st: State, xa, ya, check=None):
        """The pass at ``st``; ``check`` (r, K, n): the responsibilities a pending gate step is checked with."""
        K, d = st.theta.shape[-2], xa.shape[-1]
        args = (*newton.gate_args(st.gate), st.theta, st.var, xa, ya)
        if not self.keep_resp:
            return newton.unpack_sums(self.run(newton.newton_sums, *args, self.spec), self.spec, K, d)
        if check is None:  # nothing pending: the Q_gate column is not read
            prev = self.stats["resp"] if self.stats is not None else None
            check = prev if prev is not None and prev.shape[0] == xa.shape[0] else xa.new_zeros(xa.shape[0], K, xa.shape[1])
        sums, resp = self.run(newton.newton_sums_resp, *args, check, self.spec)
        return dict(newton.unpack_sums(sums[:, :-1], self.spec, K, d), resp=resp, q_check=sums[:, -1])

    def _checked_pass(self, st: State, xa, ya, pending):
        """The pass at ``st`` with the gate steps of ``pending`` (:func:`newton.propose`) checked: (state, stats)."""
        if pending is None:
            return st, self._pass(st, xa, ya)
        stats = self._pass(st, xa, ya, pending["resp"])
        fix = newton.verify(stats["q_check"], pending, st.gate, xa, self.spec, self.run)
        if fix is None:
            return st, stats
        idx, theta = fix
        sub = st.take(idx)
        sub = State(sub.gate.replace(**GateParameters(sub.gate).unflatten(theta)), sub.theta, sub.var)
        for k, v in self._pass(sub, xa[idx], ya[idx]).items():
            stats[k][idx] = v
        return st.put(idx, sub), stats

    def evaluate(self, st: State):
        """The pass at ``st``; returns (state, loglik (r,)), the state's gate corrected where the
        proposed step did not increase Q_gate."""
        pending, self.pending = self.pending, None
        st, self.stats = self._checked_pass(st, self.xa, self.ya, pending)
        self._record_sizes(self.stats)
        return st, self.stats["loglik"]

    def _suspend(self):
        # the gate step proposed by the last M-step belongs to the plain point, not the extrapolated one
        pending, self.pending = self.pending, None
        return pending

    def _evaluate_subset(self, st: State, idx, pending):
        if pending is not None:
            pending = {k: v[idx] for k, v in pending.items()}
        return self._checked_pass(st, self.xa[idx], self.ya[idx], pending)

    def keep(self, mask):
        super().keep(mask)
        self.x_abs_max = self.x_abs_max[mask]
        if self.pending is not None:
            self.pending = {k: v[mask] for k, v in self.pending.items()}

    def _step_ok(self, pending):
        return True if pending is None else newton.step_ok(self.stats["q_check"], pending)

    def m_step(self, st: State, checked: bool = False) -> State:
        """The M-step from the last pass; ``checked``: the gate step is checked now, not by the next pass
        (SQUAREM extrapolates from the returned state: an unchecked, failed step would enter θ₂ — and τ,
        which is not extrapolated, with it: a sigmoid gate's Newton step to τ ≈ 1e-32 raised the
        log-likelihood once and then left the fit stuck at a hard gate, 1,000 below the optimum)."""
        if self.keep_resp and not checked:
            gate, theta, var, self.pending = newton.propose(self.stats, st.gate, st.theta, st.var, self.xa,
                                                            self.var_floor, self.x_abs_max)
        else:
            gate, theta, var = newton.m_step(self.stats, st.gate, st.theta, st.var, self.xa, self.ya, self.var_floor,
                                             self.spec, self.run, self.x_abs_max, resp=self.stats.get("resp"))
        return State(gate, theta, var)
