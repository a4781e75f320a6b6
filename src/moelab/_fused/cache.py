"""Running the one-pass kernels: compiled once per process (:class:`KernelCache`) or eagerly in blocks.

Every kernel of :mod:`moelab._fused` reduces over the samples (a sum, or a
max for :func:`~moelab._fused.linear.logit_range`), so it can run

* **compiled** — ``torch.compile`` (Inductor) fuses the whole pass into few
  loops over the samples with the sums as accumulators: no per-sample
  temporaries at all;
* **eagerly, blocked** (:func:`run_blocked`) — the same function on blocks of
  (problems, samples), so each of its temporaries stays in the CPU cache
  (about 256 KiB each) whatever R·n is; sample blocks are summed. A batch of
  R problems then costs per problem at most what one problem costs (the same
  elementwise work per sample, no more calls per problem).

:data:`KERNELS` declares, per kernel, which argument dimension is the problem
batch, which is the sample axis, and how blocks combine.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from types import MappingProxyType

import torch

__all__ = ["KernelSpec", "KERNELS", "KernelCache", "run_blocked", "run_blocked_one_thread", "Runner", "MIN_SPLIT_SAMPLES", "BLOCK_ELEMENTS", "INDUCTOR_OPTIONS"]

#: Inductor settings: fuse a pass's sums into as few loops over the samples as it allows instead of
#: materialising per-sample intermediates (the defaults cap horizontal fusion at 16 nodes and realise
#: any value read by more than 8 sums). Measured on the benchmark problem (R = 40, n = 10^5, 2 threads):
#: 59 → 35–40 ms per pass.
INDUCTOR_OPTIONS = MappingProxyType({"max_fusion_size": 1024, "realize_reads_threshold": 1000,
                                     "realize_opcount_threshold": 10000, "realize_acc_reads_threshold": 1000,
                                     "aggressive_fusion": True, "cpp.max_horizontal_fusion_size": 512})

#: graphs per kernel before dynamo stops recompiling (one per pass spec, K, d, dtype, device; dynamo's default is 8)
_RECOMPILE_LIMIT = 64

#: eager blocks hold about this many (problem, sample) elements per temporary: 32768 float64 = 256 KiB
BLOCK_ELEMENTS = 32768
#: but at least this many samples per block (fewer calls for large batches of small problems)
_MIN_BLOCK = 256


class KernelSpec:
    """How one kernel's arguments and result are laid out.

    ``rows``: per positional argument, its problem-batch dimension (None: not a tensor
    with one); ``out_row``: the result's. ``samples``: per argument, its sample
    dimension (None: no sample axis). ``reduce``: "sum" or "max" over samples, or None for a kernel
    with no sample axis at all (an M-step on the sums: it runs whole, eager or compiled, and its
    results — tensors, tuples and dicts of them — have the problem batch first).
    ``cands``: per argument, its dimension of candidate parameters (None: none);
    ``out_cand``: the result's (kernels that evaluate several candidates at once).
    ``per_sample``: the sample dimension of a second, per-sample result (kernels that
    return (sums, per-sample values), e.g. the responsibilities; blocks over samples are
    concatenated along it), or None for kernels with one result.
    ``pad_one_cand``: whether the compiled kernel sees one candidate padded to two (no graph of
    its own for one candidate, at twice the candidate work) — False where one candidate is the
    common call and worth its own graph.
    """

    __slots__ = ("rows", "out_row", "samples", "reduce", "cands", "out_cand", "per_sample", "pad_one_cand")

    def __init__(self, rows, out_row, samples, reduce="sum", cands=None, out_cand=None, per_sample=None,
                 pad_one_cand=True):
        self.rows, self.out_row, self.samples, self.reduce = tuple(rows), out_row, tuple(samples), reduce
        self.per_sample, self.pad_one_cand = per_sample, pad_one_cand
        self.cands = tuple(cands) if cands is not None else (None,) * len(self.rows)
        self.out_cand = out_cand


#: kernel name -> layout (the kernels live in moelab._fused.linear and moelab._fused.newton)
KERNELS = MappingProxyType({
    # gate θ, expert θ, var, x, y
    "em_sums": KernelSpec((0, 0, 0, 0, 0), 0, (None, None, None, 1, 1)),
    # candidate θ (A, R, K, p), x
    "gate_lse_sum": KernelSpec((1, 0), 1, (None, 1), cands=(0, None), out_cand=0),
    "logit_range": KernelSpec((0, 0), 0, (None, 1), "max"),
    # slope, intercept, tau, expert θ, var, x, y, pass spec
    "newton_sums": KernelSpec((0, 0, 0, 0, 0, 0, 0, None), 0, (None,) * 5 + (1, 1, None)),
    # candidate slope (A, R, K, d), intercept (A, R, K), tau (A, R); then as newton_sums
    "newton_q": KernelSpec((1, 1, 1) + (0,) * 7 + (None,), 1, (None,) * 8 + (1, 1, None), cands=(0, 0, 0) + (None,) * 8,
                           out_cand=0),
    # as newton_sums with the previous pass's responsibilities (R, K, n) before the spec; second result this pass's
    "newton_sums_resp": KernelSpec((0,) * 8 + (None,), 0, (None,) * 5 + (1, 1, 2, None), per_sample=2),
    # candidate slope, intercept, tau as newton_q; responsibilities (R, K, n), x, pass spec. One candidate (the
    # Newton step; the damping ladder only where it fails) gets its own graph: padded to two it cost 18 ms
    # against 11.6 ms (R = 40, n = 10^4, K = 3, tanh, 2 threads)
    "newton_q_resp": KernelSpec((1, 1, 1, 0, 0, None), 1, (None, None, None, 2, 1, None), cands=(0, 0, 0, None, None, None),
                                out_cand=0, pad_one_cand=False),
    # sums (R, M), gate θ, expert θ, var, x min, x max, n, variance floor: the one-feature M-step (no samples)
    "m_step_one_feature": KernelSpec((0, 0, 0, 0, 0, 0, None, None), 0, (None,) * 8, reduce=None),
})


def run_blocked(fn, args, block_elements=None):
    """``fn(*args)`` evaluated on blocks of (problems, samples) and combined, as :data:`KERNELS` says.

    A block holds nb = min(n, block_elements) samples of rb = max(1, block_elements // nb)
    problems (default block_elements: :data:`BLOCK_ELEMENTS`), so its temporaries are the same
    size whatever the batch: at large n every problem is done on its own, exactly as a single
    fit would be, and a batch costs per problem no more than one problem. Blocks over samples are
    summed (or maxed), blocks over problems concatenated. Equal to ``fn(*args)`` up to the
    rounding of the summation order.
    """
    spec = KERNELS[fn.__name__]
    if spec.reduce is None:  # no samples to block
        return fn(*args)
    block_elements = BLOCK_ELEMENTS if block_elements is None else block_elements
    i = next(k for k, s in enumerate(spec.samples) if s is not None)
    n = args[i].shape[spec.samples[i]]
    R = args[i].shape[spec.rows[i]]
    nb = max(_MIN_BLOCK, min(n, block_elements))
    rb = max(1, block_elements // nb)
    if n <= nb and R <= rb:
        return fn(*args)
    rows, per_rows = [], []
    for r0 in range(0, R, rb):
        rl = min(rb, R - r0)
        sub = [a.narrow(dim, r0, rl) if dim is not None else a for a, dim in zip(args, spec.rows)]
        out, per = None, []
        for s in range(0, n, nb):
            part = fn(*(a.narrow(dim, s, min(nb, n - s)) if dim is not None else a for a, dim in zip(sub, spec.samples)))
            if spec.per_sample is not None:
                part, p = part
                per.append(p)
            out = part if out is None else (out + part if spec.reduce == "sum" else torch.maximum(out, part))
        rows.append(out)
        if per:
            per_rows.append(per[0] if len(per) == 1 else torch.cat(per, spec.per_sample))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, spec.out_row)
    if spec.per_sample is None:
        return out
    return out, (per_rows[0] if len(per_rows) == 1 else torch.cat(per_rows, spec.out_row))


class KernelCache:
    """What this process knows about the compiled kernels, in one object with explicit methods.

    * :meth:`get` — a kernel compiled once (per cache) and wrapped;
    * :meth:`is_ready` / :meth:`mark_ready` — kernel keys (pass spec, K, d, dtype, device type)
      compiled and checked, so "auto" uses them without a new check;
    * :meth:`is_broken` / :meth:`mark_broken` — keys whose start-up check failed, so "auto"
      does not retry them;
    * failed calls — kernels whose compiled call failed after the check, run eagerly from then on;
    * :meth:`clear` — forget all of it (tests; a new torch.compile setting).

    The package owns one instance, ``moelab._fused.kernels``; dynamo's recompile
    limit is raised only around the compiled calls, never patched globally.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._compiled: dict = {}
        self._broken: dict = {}
        self._failed_calls: dict = {}
        self._ready: dict = {}

    def clear(self) -> None:
        with self._lock:
            self._compiled.clear()
            self._broken.clear()
            self._failed_calls.clear()
            self._ready.clear()

    def is_ready(self, key) -> bool:
        """Whether the kernels for ``key`` compiled and passed the check."""
        return key in self._ready and key not in self._broken

    def mark_ready(self, key) -> None:
        self._ready[key] = True

    def is_broken(self, key) -> bool:
        return key in self._broken

    def mark_broken(self, key, why: str) -> None:
        self._broken[key] = why

    def failed(self, name: str) -> bool:
        """Whether the compiled kernel ``name`` failed after the start-up check (it runs eagerly)."""
        return name in self._failed_calls

    def get(self, fn):
        """``fn`` compiled once, wrapped so that it

        * never sees a batch of one problem or (unless :attr:`KernelSpec.pad_one_cand` is False)
          one candidate (dynamo specialises sizes 0 and 1 and would compile them separately):
          one problem becomes two rows of half its samples (:func:`_two_rows`; repeated where
          n is odd), one candidate is repeated;
        * takes contiguous copies of strided arguments (dynamo guards on strides);
        * keeps its own recompile limit (a graph per pass spec, K, d, dtype and device);
        * mutes torch's own compile-time DeprecationWarnings and dynamo's warning about the kernels' lru_cache helpers;
        * runs the eager ``fn`` (blocked, same result) with a RuntimeWarning if the
          compiled call fails after the start-up check (``moelab._fused.available``,
          which calls it with ``fallback=False`` so that failures surface there).
        """
        with self._lock:
            c = self._compiled.get(fn.__name__)
            if c is None:
                c = self._compiled[fn.__name__] = self._wrap(fn)
            return c

    @staticmethod
    def _compile_scope():
        # dynamo's recompile limit has no public setter; raise it only around our own calls
        return _recompile_limit_raised()

    def _wrap(self, fn):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=dict(INDUCTOR_OPTIONS))
        spec = KERNELS[fn.__name__]
        name = fn.__name__
        first = next(i for i, r in enumerate(spec.rows) if r is not None)

        cfirst = next((i for i, r in enumerate(spec.cands) if r is not None), None)

        def c(*args, fallback=True):
            one = args[first].shape[spec.rows[first]] == 1
            split = False
            if one:
                args, split = _two_rows(args, spec)
            one_cand = cfirst is not None and spec.pad_one_cand and args[cfirst].shape[spec.cands[cfirst]] == 1
            if one_cand:
                args = tuple(a if dim is None else torch.cat([a, a], dim) for a, dim in zip(args, spec.cands))
            # dynamo guards on strides: an expanded τ (stride 0) or a sliced slope would compile anew
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
            if not self.failed(name) or not fallback:
                try:
                    with warnings.catch_warnings(), self._compile_scope():
                        # torch.compile imports torch.jit helpers that warn (not actionable by a user)
                        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                        # the kernels' lru_cache helpers (moment_index, _pair_index, _eye) map sizes to constant
                        # index tensors: tracing through their cache, as dynamo does, gives the same graph
                        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`")
                        out = compiled(*args)
                except Exception as exc:  # e.g. a recompilation that fails mid-run
                    if not fallback:
                        raise
                    self._failed_calls[name] = repr(exc)
                    warnings.warn(f"compiled EM kernel {name} failed ({type(exc).__name__}); running it eagerly "
                                  "from now on in this process (same results, slower)", RuntimeWarning, stacklevel=2)
                    out = run_blocked(fn, args)
            else:
                out = run_blocked(fn, args)
            if spec.reduce is None:  # an M-step: its results are per problem, the first row is the problem's
                return _first_row(out) if one else out
            per = None
            if spec.per_sample is not None:
                out, per = out
            if one_cand:
                out = out.narrow(spec.out_cand, 0, 1)
            if split:  # the two halves' sums (or maxima) are the problem's; its per-sample values rejoined
                out = out.sum(spec.out_row, keepdim=True) if spec.reduce == "sum" else out.amax(spec.out_row, keepdim=True)
                if per is not None:
                    per = per.unsqueeze(spec.out_row + 1).movedim(spec.out_row, spec.per_sample).flatten(
                        spec.per_sample, spec.per_sample + 1)
            elif one:
                out = out.narrow(spec.out_row, 0, 1)
                per = per.narrow(spec.out_row, 0, 1) if per is not None else None
            return out if spec.per_sample is None else (out, per)

        return c


def _first_row(out):
    """The first row of every tensor in ``out`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out.narrow(0, 0, 1)
    if isinstance(out, dict):
        return {k: _first_row(v) for k, v in out.items()}
    return type(out)(_first_row(v) for v in out)


@contextlib.contextmanager
def _recompile_limit_raised():
    """dynamo's recompile limit at least :data:`_RECOMPILE_LIMIT` inside, restored on exit.

    Set and restored by hand: ``torch._dynamo.config.patch`` builds a context-manager class per use,
    measured 81 µs per call against 7 µs here, and the compiled pass is called once per EM iteration.
    """
    cfg = torch._dynamo.config
    old = cfg.recompile_limit
    if old >= _RECOMPILE_LIMIT:
        yield
        return
    cfg.recompile_limit = _RECOMPILE_LIMIT
    try:
        yield
    finally:
        cfg.recompile_limit = old


#: one problem is split into two rows of samples only from this many samples (smaller passes cost little,
#: and no half-size ever comes near the few sizes that dynamo specialises or might equate with K or d)
MIN_SPLIT_SAMPLES = 64


def _two_rows(args, spec):
    """Arguments of a one-problem call as a batch of two, for a kernel that never sees one (dynamo
    specialises size 1): ``(args, split)``.

    With an even number of samples n ≥ :data:`MIN_SPLIT_SAMPLES` the problem's samples become two
    rows of n/2 (its parameters repeated), so the pass does one problem's work, and ``split`` is
    True: the caller adds (or maxes) the two rows of the result and rejoins per-sample values.
    Otherwise the problem is repeated (twice the work) and ``split`` is False. Measured on a single
    fit (softmax gate, K = 3, n = 10⁴, one thread): the padded pass cost 1.57 ms.
    """
    i = next((k for k, s in enumerate(spec.samples) if s is not None), None)
    n = args[i].shape[spec.samples[i]] if i is not None else 1
    if n % 2 or n < MIN_SPLIT_SAMPLES:
        return tuple(a if dim is None else torch.cat([a, a], dim) for a, dim in zip(args, spec.rows)), False
    out = []
    for a, r, s in zip(args, spec.rows, spec.samples):
        if r is None:
            out.append(a)
        elif s is None:
            out.append(torch.cat([a, a], r))
        else:  # (.., 1 at r, .., n at s, ..) -> (.., 2 at r, .., n/2 at s, ..); the row axis precedes the samples
            out.append(a.unflatten(s, (2, n // 2)).movedim(s, r).squeeze(r + 1))
    return tuple(out), True


class Runner:
    """Calls the pass kernels compiled (through a :class:`KernelCache`) or eagerly blocked over samples
    (:func:`run_blocked_one_thread`)."""

    __slots__ = ("cache", "compiled")

    def __init__(self, cache: KernelCache, compiled: bool):
        self.cache, self.compiled = cache, bool(compiled)

    def __call__(self, fn, *args):
        if self.compiled:
            return self.cache.get(fn)(*args)
        return run_blocked_one_thread(fn, args)


def run_blocked_one_thread(fn, args):
    """:func:`run_blocked` on one intra-op thread (restored afterwards).

    Its operations are cache-sized blocks (~32k elements), too small to split
    across threads: measured on the 2-core machine under load ≈ 10, one pass
    (R = 40, n = 10⁴, K = 3, tanh gate) took 0.20 CPU-s on one thread and 1.2–4.5
    CPU-s on two (threads waiting on each other).
    """
    before = torch.get_num_threads()
    if before == 1:
        return run_blocked(fn, args)
    torch.set_num_threads(1)
    try:
        return run_blocked(fn, args)
    finally:
        torch.set_num_threads(before)
