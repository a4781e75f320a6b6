"""``compile="auto"``: when the fused, compiled EM pass (:mod:`moelab._fused`) pays for its compilation.

The rule weighs the one-off compile cost against the EM time it saves:

    use the fused pass  ⇔  (t_eager − t_fused) · starts · n · K · iterations  >  compile cost

with per-(sample · expert · iteration) costs eager ≈ :data:`EAGER_NS` ns and
fused ≈ :data:`FUSED_NS` ns, a saving of ≈ 50 ns. Measured on the 2-core
development machine, float64, K = 3: on the idle machine the README's
throughput table gives 45 ns eager vs 4.5 ns fused for d = 1 (40 starts,
n = 10⁴), and a stage profile of diamonds 6k × 3 inputs gives ≈ 20 ns for the
fused pass at d = 3 (160 starts); under load 13, ``benchmarks/multi_input.py
--per-iteration`` (40 starts, 6,000 rows, d = 1) measured 2,585 vs 203 ns — the
ratio (≈ 10×) holds, the absolute cost grows with the load, so the constants
are the idle machine's (a loaded machine compiles less often than it should).
``iterations`` is the expected number per start, min(max_iter,
:data:`TYPICAL_ITERS`) (the median start ran 310 iterations on diamonds 6k × 3), or
:data:`TYPICAL_ITERS_ACCELERATED` with SQUAREM (89 per start there). Where the uncompiled
iteration would be the textbook loop with few samples (see :func:`pass_mode`) the saving is
:data:`TEXTBOOK_SAVING_NS` instead of eager − fused. Linear logits with d > 1 are never compiled
by ``"auto"``: since the textbook loop keeps one fit's data once for all its starts, it is faster
than the fused pass even with the kernels compiled (diamonds 6k × 3, 160 starts, SQUAREM, idle:
11.1 s vs 15.2 s in-process; the full diamonds CLI 128.5 s vs 142.5 s).

The compile cost depends on what is cached:

* kernels already compiled and checked in this process: 0 — then the fused
  pass is used from starts · n · K ≥ :data:`WARM_MIN` (where it is already
  faster per iteration, measured);
* compiled before on this machine with this torch (a marker file in the
  user cache directory, :func:`marker_path`, written after each successful
  compile, and Inductor's on-disk cache still present): :data:`WARM_COMPILE_S`
  (7.8 s measured for K = 3, d = 3 with Inductor's FX-graph cache warm);
* otherwise a cold compile, :data:`COLD_COMPILE_S` (20–60 s measured).

A compile's seconds are recorded as cold or warm by what Inductor's FX-graph cache did
(a miss during the compile makes it cold, whatever was predicted: a marker from another
checkout of the code, or an Inductor cache holding other graphs, predicts warm). The
warm figure read back is never above the recorded cold one (found on a fresh machine: a
compile predicted warm but cold, 52 s, recorded as warm, then kept ``"auto"`` from compiling
5 problems of 10⁵ samples that it would have paid for).

The marker directory is ``$MOELAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/moelab``
(default ``~/.cache/moelab``); a marker that cannot be written is ignored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from . import _fused
from .gates import Gate, gate_spec

__all__ = ["pass_mode", "use_fused", "prepare_compiled", "gate_pass_spec", "compile_cost", "predicted_saving", "marker_path", "cache_dir",
           "EAGER_NS", "FUSED_NS", "TYPICAL_ITERS", "TYPICAL_ITERS_ACCELERATED", "TEXTBOOK_SAVING_NS", "WARM_MIN", "WARM_COMPILE_S", "COLD_COMPILE_S", "SMALL_N"]

#: eager EM, seconds·1e-9 per sample·expert·iteration (batched starts, 2 threads, float64)
EAGER_NS = 65.0
#: fused pass, seconds·1e-9 per sample·expert·iteration (same setting)
FUSED_NS = 15.0
#: expected EM iterations per start when max_iter is larger
TYPICAL_ITERS = 300
#: the same with SQUAREM (``accelerate="squarem"``; diamonds 6k × 3: 14,227 start-iterations over 160 starts)
TYPICAL_ITERS_ACCELERATED = 90
#: where the alternative is the textbook loop (linear logits, n < SMALL_N; d > 1 is never compiled by "auto"): its
#: cost over the fused pass, ns per sample·expert·iteration (measured before the loop shared one fit's data:
#: diamonds 6k × 3, K = 3, SQUAREM, load 1.5, 69 ns textbook vs 41 ns fused)
TEXTBOOK_SAVING_NS = 27.0
#: with the kernels ready in this process, the fused pass from this starts·n·K on (measured crossover)
WARM_MIN = 10_000
#: seconds to load the kernels from Inductor's warm disk cache (K = 3, d = 3, measured 7.8 s)
WARM_COMPILE_S = 8.0
#: seconds of a cold compile (measured 20–60 s; 44 CPU-s per process in issue 11)
COLD_COMPILE_S = 40.0
#: below this many samples the uncompiled linear-logit pass runs the textbook loop (see :func:`pass_mode`)
SMALL_N = 256


def cache_dir() -> Path:
    """moelab's user cache directory (``$MOELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/moelab``, ``~/.cache/moelab``)."""
    if os.environ.get("MOELAB_CACHE_DIR"):
        return Path(os.environ["MOELAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moelab"


def marker_path(K: int, d: int, dtype=torch.float64, device="cpu", spec=_fused.LINEAR) -> Path:
    """The marker file recording that the kernels for (pass spec, K, d, dtype, device type) compiled with this torch."""
    key = _fused.kernel_key(K, d, dtype, device, spec)
    name = "-".join(str(k).replace("torch.", "") for k in key) + ".json"
    return cache_dir() / "compiled" / f"torch-{torch.__version__}" / name


def _inductor_cache_present() -> bool:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_dir

        d = Path(inductor_dir())
        return d.is_dir() and any(d.iterdir())
    except Exception:  # private torch API moved: assume cold
        return False


def compile_cost(K: int, d: int, dtype=torch.float64, device="cpu", spec=_fused.LINEAR) -> float:
    """Predicted seconds until the fused kernels for this pass spec and shape are usable in this process.

    ``spec`` is the gate's one-pass kernel spec (:func:`moelab._fused.pass_spec`; default the
    linear-logit pass of softmax and temperature gates). See the module doc for the rule.
    """
    if _fused.kernels.is_ready(_fused.kernel_key(K, d, dtype, device, spec)):
        return 0.0
    path = marker_path(K, d, dtype, device, spec)
    if path.is_file() and _inductor_cache_present():
        try:
            rec = json.loads(path.read_text())
            warm = float(rec.get("warm_seconds", WARM_COMPILE_S))
            return min(warm, float(rec["cold_seconds"])) if "cold_seconds" in rec else warm
        except (OSError, ValueError, AttributeError, TypeError):
            return WARM_COMPILE_S
    return COLD_COMPILE_S


def _fx_graph_cache_misses() -> Optional[int]:
    """Inductor's FX-graph cache misses so far in this process (None where torch no longer counts them)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_miss"])
    except Exception:  # private torch API moved: fall back to the prediction
        return None


def predicted_saving(R: int, n: int, K: int, max_iter: int, accelerated: bool = False, textbook: bool = False) -> float:
    """Seconds of EM the fused pass is predicted to save over the uncompiled iteration for R starts of n samples.

    ``accelerated``: SQUAREM runs (fewer iterations, :data:`TYPICAL_ITERS_ACCELERATED`); ``textbook``: the
    uncompiled alternative is the textbook loop (:data:`TEXTBOOK_SAVING_NS`), else the eager one-pass.
    """
    iters = min(max_iter, TYPICAL_ITERS_ACCELERATED if accelerated else TYPICAL_ITERS)
    per = TEXTBOOK_SAVING_NS if textbook else EAGER_NS - FUSED_NS
    return per * 1e-9 * R * n * K * iters


def _compile(K: int, d: int, dtype, device, strict: bool = False, spec=_fused.LINEAR) -> bool:
    """:func:`moelab._fused.available`, recording a successful compile's seconds in the marker file."""
    key = _fused.kernel_key(K, d, dtype, device, spec)
    if _fused.kernels.is_ready(key):
        return True
    cold = compile_cost(K, d, dtype, device, spec) >= COLD_COMPILE_S
    misses = _fx_graph_cache_misses()
    t0 = time.perf_counter()
    ok = _fused.available(K, d, dtype, device, strict=strict, spec=spec)
    if ok:
        seconds = time.perf_counter() - t0
        after = _fx_graph_cache_misses()
        if misses is not None and after is not None:  # what the cache did, not what was predicted
            cold = after > misses
        path = marker_path(K, d, dtype, device, spec)
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
            rec = dict(old, K=K, d=d, torch=torch.__version__)
            rec["cold_seconds" if cold else "warm_seconds"] = round(seconds, 2)
            rec.setdefault("warm_seconds", WARM_COMPILE_S)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec) + "\n")
        except (OSError, ValueError, AttributeError):
            pass  # a read-only home: the rule just assumes a cold compile next time
    return ok


def pass_mode(opts, gate: Gate, R: int, n: int, device, progress=None) -> tuple:
    """See :func:`_pass_mode`; where the pass is not compiled, the linear-logit pass (softmax,
    temperature) with d > 1 features runs as the textbook loop instead: eager, its unrolled
    K²(d+1)² sums cost more than the loop's batched matrix products (measured, diamonds
    6,000 × 3, K = 3, 20 starts, idle 2-core machine: 12.3–14.5 s one-pass against 7.7–8.2 s,
    identical fits). So does the uncompiled linear-logit pass with fewer than :data:`SMALL_N`
    samples, where its many small operations cost more than the loop's few (measured, d = 1,
    K = 3, 1 thread, CPU seconds, median of 3 interleaved: mcycle n = 133 with 160 starts
    0.999 loop vs 1.078 one-pass, with 10 starts 0.264 vs 0.303; from n = 300 the one-pass
    is the faster, 4.67 vs 3.03 with 160 starts). The Newton pass (activation, top-K) stays
    one-pass: eager it beats the autograd gate step at every d."""
    one_pass, compiled = _pass_mode(opts, gate, R, n, device, progress)
    if one_pass and not compiled and _fused.pass_spec(gate) == _fused.LINEAR and (gate.n_features > 1 or n < SMALL_N):
        return False, False
    return one_pass, compiled


def _pass_mode(opts, gate: Gate, R: int, n: int, device, progress=None) -> tuple:
    """(one-pass iteration?, compiled?) for a fit of R starts of n samples (see :func:`moelab.fit_em`'s ``compile``).

    The one-pass iteration (:mod:`moelab._fused`) runs wherever the gate's family declares it
    (``Gate.em_pass``) for these options, with ``gate_steps=1`` and float64; compiled where
    ``compile=True``, or with ``"auto"`` where the kernels for its pass spec are ready in this
    process (from starts · n · K ≥ :data:`WARM_MIN`) or the predicted saving exceeds the
    compile cost (module doc); eager (blocked over samples) otherwise. ``opts`` is the fit's
    :class:`~moelab.options.FitOptions`; ``progress`` a :class:`~moelab.progress.FitProgress`
    told about the compile stage.

    Raises
    ------
    ValueError
        compile=True for a model the kernel does not cover.
    RuntimeError
        compile=True and compilation fails.
    """
    compile, dtype, max_iter = opts.compile, opts.dtype, opts.max_iter
    K, d = gate.n_experts, gate.n_features
    ok = _fused.supported(gate, K, d) and opts.gate_steps == 1 and dtype == torch.float64
    spec = _fused.pass_spec(gate)
    if compile is True and not ok:
        raise ValueError(
            f"compile=True (CLI --compile on) runs a fused kernel for models with 2 or more experts and at most "
            f"{_fused.MAX_SUMS} sums per pass ({K} experts, {d} features need "
            f"{_fused.n_sums(K, d, spec) if spec is not None else '?'}); use compile='auto' or False (--compile auto|off)"
        )
    if not ok or compile is False:
        return ok, False
    if spec == _fused.LINEAR and d > 1 and compile is not True:
        # the textbook loop (what pass_mode runs uncompiled) beats even the warm fused pass here: diamonds
        # 6k x 3, K = 3, 160 starts, SQUAREM, idle 2-core machine, in-process: 11.1 s textbook vs 15.2 s
        # with the kernels already compiled; the full diamonds (53,940 rows) CLI: 128.5 s vs 142.5 s
        return True, False
    if _fused.kernels.is_ready(_fused.kernel_key(K, d, dtype, device, spec)):
        return True, compile is True or R * n * K >= WARM_MIN
    cost = compile_cost(K, d, dtype, device, spec)
    accelerated = opts.accelerate == "squarem" and bool(getattr(gate, "em_extrapolation", False))
    textbook = spec == _fused.LINEAR and (d > 1 or n < SMALL_N)  # what pass_mode runs uncompiled
    if compile is True or predicted_saving(R, n, K, max_iter, accelerated, textbook) > cost:
        if progress is not None:
            progress.stage("compiling", expected_s=cost, detail=f"fused EM kernels for {K} experts, {d} features")
        return True, _compile(K, d, dtype, device, strict=compile is True, spec=spec)
    return True, False


def use_fused(opts, gate: Gate, R: int, n: int, device, progress=None) -> bool:
    """Whether the EM loop runs the *compiled* one-pass kernel: ``pass_mode(...)[1]`` (same arguments, errors)."""
    return pass_mode(opts, gate, R, n, device, progress)[1]


def gate_pass_spec(n_experts: int, n_features: int, gate: str = "softmax", gate_options: Optional[dict] = None,
                   dtype=torch.float64, device="cpu"):
    """The one-pass kernel spec for fits of this gate family and shape, or None where no kernel covers them.

    Raises
    ------
    ValueError
        Unknown gate or options.
    """
    spec = gate_spec(gate, gate_options, n_experts=n_experts)
    template = spec.template(n_experts, n_features, (1,), dtype=dtype, device=device)
    if dtype != torch.float64 or not _fused.supported(template, n_experts, n_features):
        return None
    return _fused.pass_spec(template)


def prepare_compiled(n_experts: int, n_features: int, *, gate: str = "softmax", gate_options: Optional[dict] = None,
                     dtype=torch.float64, device="cpu") -> bool:
    """Compile and check the fused EM kernels for this model shape now (a one-off cost).

    Afterwards ``fit_em(compile="auto")`` uses them in this process for every fit
    with starts × n_samples × n_experts ≥ 10^4 (see ``compile`` in :func:`moelab.fit_em`).
    Batched callers that know their total work in advance (the study runner)
    call it once instead of leaving every mid-size fit on the eager loop.

    Parameters
    ----------
    n_experts, n_features : int
        K ≥ 2 and d of the fits to come.
    gate : str, default "softmax"
        A registered family; only families declaring the fused kernel are compiled.
    gate_options : dict, optional
    dtype, device
        The fused pass is float64 only.

    Returns
    -------
    bool
        True if the kernels are ready; False for a model the kernel does not
        cover, a non-float64 dtype, or a failed compilation (then with a
        RuntimeWarning, as ``compile="auto"``).

    Raises
    ------
    ValueError
        Unknown gate or options.
    """
    spec = gate_pass_spec(n_experts, n_features, gate, gate_options, dtype, device)
    if spec is None:
        return False
    return _compile(n_experts, n_features, dtype, device, spec=spec)
