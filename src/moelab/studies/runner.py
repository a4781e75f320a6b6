"""Run a study: batched fits over replicates, checkpointed, resumable and shardable.

For every sample size n and every fitted-model setting, the replicates still
to do are fitted as **one batched problem** (x of shape (R, n, d)); when the
batch finishes its rows are appended to the results CSV in ``out`` (one line
per (setting, n, replicate), written, flushed and fsynced together). A rerun
with the same ``out`` reads that file and skips every finished cell, so an
interrupted run loses at most the batch in flight (``study.batch_size`` bounds
it). A fit that raises or does not converge is recorded with its ``status``
(``ok``, ``not_converged``, ``degenerate``, ``failed``) and never dropped.

Sharding: ``shard=(I, N)`` runs the (n, replicate) cells ``I, I+N, I+2N, …``
of the list ordered by n then replicate (n over the union of the settings'
grids; a setting fits only the cells of its own grid), into
``results-shard-I-of-N.csv``;
:func:`merge_results` combines shards (any directories) into one table and
writes the report.

On a Dask cluster (``client=``, ``moelab run --scheduler``) every batch is one
task; the driver appends each task's rows as it finishes (so the file is in
completion order) and nothing else changes: the same batches, seeds and
numbers, the same resume (see :mod:`moelab.studies.cluster`).
"""

from __future__ import annotations

import csv
import json
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import pandas as pd
import torch

from ..em import fit_em
from ..gates import SoftmaxGate
from ..model import GaussianMoE
from ..metrics import (d1_loss, d2_loss, density_distances, gaussian_parameter_errors, gaussian_voronoi_loss,
                       parameter_errors)
from ..mle import fit_mle
from .config import FitSpec, Study, StudyError, fingerprint_of, study_from_json
from .lse import fit_batch as lse_fit_batch, truth_perturbed as lse_starts
from .simulate import cell_seed, loss_x_points, simulate_cells, study_x_points, true_model, truth_perturbed

__all__ = ["run_study", "run_studies", "plan_work", "batch_work", "merge_results", "RESULT_COLUMNS", "METRIC_COLUMNS", "gate_label", "read_results", "start_seeds"]

METRIC_COLUMNS = (
    "loss", "loss_D1", "loss_D2", "hellinger", "tv",
    "err_gate_mass", "err_gate_slope", "err_temperature", "err_gate_slope_over_tau",
    "err_expert_slope", "err_expert_intercept", "err_variance", "err_gate_mean", "err_gate_covariance", "regression_l2",
)
RESULT_COLUMNS = (
    "study", "setting", "gate", "n_experts", "estimator", "init", "loss_name", "n", "replicate",
    "status", "converged", "degenerate", "loglik", "n_iter", "seconds", "error",
) + METRIC_COLUMNS


def gate_label(fit: FitSpec) -> str:
    """Short description of a fitted gate, e.g. ``activation-tanh (tau estimated)``."""
    o = fit.gate_options
    name = fit.gate if fit.gate != "activation" else f"activation-{o.get('activation')}"
    from ..gates import gate_family

    if "top_k" in o:
        return f"{name} (top-{o['top_k']})"
    if not any(opt.name == "temperature" for opt in gate_family(fit.gate).options):
        return name
    if o.get("learn_temperature"):
        return f"{name} (tau estimated)"
    return f"{name} (tau={o.get('temperature', 'truth')} fixed)"


def _results_path(out: Path, shard: Tuple[int, int]) -> Path:
    i, n = shard
    return out / ("results.csv" if n == 1 else f"results-shard-{i}-of-{n}.csv")


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line left by an interrupted write."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def read_results(path) -> pd.DataFrame:
    """Read a results CSV written by :func:`run_study` (empty frame if absent)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    df = pd.read_csv(path, keep_default_na=True)
    return df[df["status"].notna() & df["replicate"].notna()]


def _append_rows(path: Path, rows: List[dict]) -> None:
    buf = io.StringIO()
    fields = RESULT_COLUMNS
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # a file started by an earlier version keeps its header (columns added later are left out)
        with open(path, newline="") as fh:
            fields = tuple(next(csv.reader(fh), RESULT_COLUMNS))
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    if new:
        w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k])) else r[k]) for k in fields})
    with open(path, "a") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def _check_out(out: Path, study: Study) -> None:
    """Create ``out`` and record the study; refuse a directory holding another study."""
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "study.json"
    if meta.exists() and fingerprint_of(meta.read_text()) != study.fingerprint():
        raise StudyError(
            f"{out} holds results of a different study (or of the same study with other settings, e.g. "
            "--quick); use a new --out directory, or delete it to start over"
        )
    meta.write_text(study.to_json())  # theory claims may be updated without invalidating finished fits


def start_seeds(study: Study, fi: int, n: int, r: int, tries: int) -> List[int]:
    """Seeds of the ``tries`` truth-perturbed starts of cell (setting fi, n, replicate r).

    Try 0 has the seed a single-try study uses, so a study with more tries
    contains its one-try start; the others are keyed by the try index too.
    None depends on batching or sharding.
    """
    return [cell_seed(study.seed, n, r, fi, 2) if t == 0 else cell_seed(study.seed, n, r, fi, 2, t) for t in range(tries)]


def _starts(study: Study, fi: int, fit: FitSpec, truth, n: int, reps: Sequence[int]):
    """Truth-perturbed starts of the replicates ``reps``: batch shape (R,), or (R, tries) with several tries."""
    seeds = [s for r in reps for s in start_seeds(study, fi, n, r, fit.tries)]
    model = lse_starts(truth, fit, seeds) if fit.estimator == "lse" else truth_perturbed(truth, fit, seeds, n)
    if fit.tries == 1:
        return model
    shape = lambda t: t.reshape(len(reps), fit.tries, *t.shape[1:])  # noqa: E731  replicate-major
    return type(model)(model.gate.map_tensors(shape), model.experts.map_tensors(shape))


def _base_row(study: Study, fit: FitSpec, truth, n: int) -> dict:
    return dict(study=study.name, setting=fit.name, gate=gate_label(fit), n_experts=fit.n_experts, estimator=fit.estimator,
                init=fit.init, loss_name=fit.loss_name(truth.n_experts), n=n)


def _failed_rows(base: dict, reps: Sequence[int], exc: BaseException, seconds: float) -> List[dict]:
    """Rows of cells whose fit raised (or whose task killed its workers): recorded, never dropped."""
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    return [dict(base, replicate=r, status="failed", converged=False, degenerate=False, error=msg, seconds=seconds)
            for r in reps]


def _fit_batch(study: Study, fi: int, fit: FitSpec, truth, n: int, reps: Sequence[int], xpts) -> List[dict]:
    """Fit replicates ``reps`` at sample size n as one batched problem; one row per replicate."""
    x, y = simulate_cells(study, truth, n, reps)
    K = fit.n_experts
    if fit.estimator == "lse":
        base = dict(study=study.name, setting=fit.name, gate=gate_label(fit), n_experts=K, estimator=fit.estimator,
                    init=fit.init, loss_name=fit.loss_name(truth.n_experts), n=n)
        starts = _starts(study, fi, fit, truth, n, reps) if fit.init == "truth-perturbed" else None
        return lse_fit_batch(x, y, truth, fit, starts, base, reps, xpts, cell_seed(study.seed, n, reps[0], fi, 1))
    kwargs = dict(gate=fit.gate, gate_options=fit.gate_options or None, max_iter=fit.max_iter, tol=fit.tol,
                  warn=False, random_state=cell_seed(study.seed, n, reps[0], fi, 1))
    if fit.estimator == "em":
        kwargs["convergence"] = fit.convergence
        kwargs["accelerate"] = None if fit.accelerate == "off" else fit.accelerate
    if fit.init == "truth-perturbed":
        start = _starts(study, fi, fit, truth, n, reps)
        if fit.estimator == "em" and start.gate.sparse_routing and (fit.routing_start or "dense-fit") == "dense-fit":
            # EM keeps each sample's routing set: read the start as a dense softmax model, which fit_em
            # fits first and sparsifies, so the routing comes from the data, not from the start
            start = GaussianMoE(SoftmaxGate(start.gate.slope, start.gate.intercept), start.experts)
        kwargs["init_model"] = start
    else:
        kwargs.update(init=fit.init, n_init=fit.n_init)
        if fit.estimator == "em" and fit.init != "auto":
            kwargs["n_candidates"] = fit.n_init
    base = _base_row(study, fit, truth, n)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = (fit_em if fit.estimator == "em" else fit_mle)(x, y, K, **kwargs)
        model = res.model
        with torch.no_grad():
            if truth.gate.models_x:  # Gaussian gate: the authors' D̄/D̃ (D2 column) and the all-ones loss (D1)
                d1, d2 = gaussian_voronoi_loss(model, truth, "exact"), gaussian_voronoi_loss(model, truth, "over")
                errs = gaussian_parameter_errors(model, truth)
            else:
                xl = loss_x_points(study, truth, xpts)  # a fine grid where the truth is routing-only (top-1)
                d1, d2 = d1_loss(model, truth, xl), d2_loss(model, truth, xl)
                errs = parameter_errors(model, truth, xl)
            dens = density_distances(model, truth, xpts)
    except Exception as exc:  # recorded, never dropped
        return _failed_rows(base, reps, exc, (time.perf_counter() - t0) / len(reps))
    seconds = (time.perf_counter() - t0) / len(reps)
    rows = []
    for j, r in enumerate(reps):
        conv, degen = bool(res.converged[j]), bool(res.degenerate[j])
        row = dict(base, replicate=r, converged=conv, degenerate=degen,
                   status="degenerate" if degen else ("ok" if conv else "not_converged"),
                   loglik=float(res.loglik[j]), n_iter=int(res.n_iter[j]), seconds=seconds, error="",
                   loss_D1=float(d1[j]), loss_D2=float(d2[j]),
                   hellinger=float(dens["hellinger"][j]), tv=float(dens["tv"][j]))
        row["loss"] = row["loss_D1"] if row["loss_name"] == "D1" else row["loss_D2"]
        for k, v in errs.items():
            row["err_" + k] = float(v[j])
        rows.append(row)
    return rows


def _compile_keys(todo, d: int) -> set:
    """The EM settings (K, gate, options) whose remaining work pays for compiling the fused kernels up front.

    ``fit_em(compile="auto")`` decides per call, so in a study the mid sizes (run
    before the large ones) would stay eager; summed over the study, the EM work
    of a setting (replicates × tries × n × K, each start ~min(max_iter, typical)
    iterations) is known in advance: where its predicted saving exceeds the
    compile cost (:mod:`moelab.autocompile`), the kernels are compiled once (in
    the driver, or in each worker process) and every batch with
    starts × n × K ≥ 10^4 takes the fused pass.
    """
    from .. import autocompile

    work = {}
    for n, _fi, fit, reps in todo:
        if fit.estimator == "em":
            key = _kernel_setting(fit)
            saving = autocompile.predicted_saving(len(reps) * fit.tries, n, fit.n_experts, fit.max_iter,
                                                  accelerated=fit.accelerate == "squarem")
            work[key] = work.get(key, 0.0) + saving
    keys = set()
    for (K, gate, opts), saving in work.items():
        spec = autocompile.gate_pass_spec(K, d, gate, json.loads(opts) or None)
        if spec is not None and saving > autocompile.compile_cost(K, d, spec=spec):
            keys.add((K, gate, opts))
    return keys


def _kernel_setting(fit: FitSpec) -> tuple:
    return (fit.n_experts, fit.gate, json.dumps(fit.gate_options, sort_keys=True, default=str))


def _prepare_kernels(keys, d: int) -> None:
    from .. import autocompile

    for K, gate, opts in sorted(keys):
        autocompile.prepare_compiled(K, d, gate=gate, gate_options=json.loads(opts) or None)


def _fit_task(study: Study, fi: int, n: int, reps: Sequence[int], truth, xpts, compile_keys, torch_threads: int) -> List[dict]:
    """One batch on a Dask worker: torch threads set, then the fit.

    Before it, the worker process holds the fused kernels of *every* setting
    the serial driver compiles up front (a no-op once done): ``compile="auto"``
    uses the kernels a process has for (K, d), whichever setting compiled them,
    so this keeps each fit's eager/fused choice, and its numbers, those of the
    serial run, whatever ran on the worker before.
    """
    if torch_threads and torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _prepare_kernels(compile_keys, truth.n_features)
    return _fit_batch(study, fi, study.fits[fi], truth, n, reps, xpts)


#: a batch predicted to take longer than this (serial seconds, :func:`batch_work`) may be split across workers
SPLIT_MIN_S = 30.0


def batch_work(fit: FitSpec, n: int, n_reps: int) -> float:
    """Predicted serial seconds of one batch: ``n_reps`` replicates of setting ``fit`` at sample size n.

    The eager per-(sample, expert, iteration) cost of :mod:`moelab.autocompile`
    (:data:`~moelab.autocompile.EAGER_NS`) times replicates × tries × n × K ×
    typical iterations (capped at ``max_iter``; fewer with SQUAREM). A rough
    scale, not a forecast: it orders a cluster's tasks (largest first), decides
    which batches to split across workers and whether ``--scheduler auto``
    starts worker processes.
    """
    from .. import autocompile

    iters = min(fit.max_iter, autocompile.TYPICAL_ITERS_ACCELERATED if fit.accelerate == "squarem"
                else autocompile.TYPICAL_ITERS)
    return autocompile.EAGER_NS * 1e-9 * n_reps * fit.tries * n * fit.n_experts * iters


class _Plan:
    """One study's run in ``out``: the results file, the batches still to fit, the kernels to compile."""

    def __init__(self, study: Study, out, shard: Tuple[int, int] = (0, 1)):
        i, N = shard
        if not (isinstance(i, int) and isinstance(N, int) and N >= 1 and 0 <= i < N):
            raise StudyError(f"--shard: expected I/N with 0 <= I < N, got {i}/{N}")
        self.study, self.out, self.shard = study, Path(out), shard
        _check_out(self.out, study)
        self.path = _results_path(self.out, shard)
        _repair_tail(self.path)
        done_df = read_results(self.path)
        done = set(zip(done_df["setting"], done_df["n"].astype(int), done_df["replicate"].astype(int)))
        cells = [(n, r) for n in study.all_n() for r in range(study.replicates)][i::N]
        self.truth = true_model(study.truth)
        self.xpts = study_x_points(study, self.truth)
        self.todo = []
        grids = [set(study.grid(f)) for f in study.fits]
        for n in study.all_n():
            for fi, fit in enumerate(study.fits):
                if n not in grids[fi]:
                    continue
                reps = [r for (nn, r) in cells if nn == n and (fit.name, n, r) not in done]
                bs = study.batch_size or len(reps) or 1
                for s in range(0, len(reps), bs):
                    self.todo.append((n, fi, fit, reps[s : s + bs]))
        self.compile_keys = _compile_keys(self.todo, self.truth.n_features)

    def work(self) -> float:
        """Predicted serial seconds of the batches still to fit (:func:`batch_work`)."""
        return sum(batch_work(fit, n, len(reps)) for n, _fi, fit, reps in self.todo)

    def write(self, rows: List[dict]) -> None:
        _append_rows(self.path, rows)

    def finish(self, report: bool, complete: bool) -> pd.DataFrame:
        """The results in the serial order; the report written when the whole unsharded study is done."""
        results = _in_study_order(read_results(self.path), self.study)
        if report and self.shard[1] == 1 and complete:
            from .report import write_report

            write_report(results, self.study, self.out)
        return results


def plan_work(runs) -> float:
    """Predicted serial seconds of what is still to fit in ``runs`` (a sequence of (study, out) pairs).

    Reads (and creates) each ``out`` as a run would; raises :class:`StudyError` like :func:`run_studies`.
    """
    return sum(_Plan(*run).work() for run in runs)


def _balanced(todo, n_workers: int):
    """``todo`` with the batches too large for an even spread over ``n_workers`` split in two, recursively.

    A batch is split while its predicted work (:func:`batch_work`) exceeds both
    :data:`SPLIT_MIN_S` and the run's total over 3·n_workers, and only where its
    fits start from truth-perturbed starts: each replicate's start has its own
    seed there, so a split batch fits the same problems (numbers equal to the
    unsplit batch's up to the order of the blocked sums).
    """
    total = sum(batch_work(fit, n, len(reps)) for _p, (n, _fi, fit, reps) in todo)
    cap = max(SPLIT_MIN_S, total / (3 * max(1, n_workers)))
    out = []
    stack = list(reversed(todo))
    while stack:
        plan, (n, fi, fit, reps) = stack.pop()
        if len(reps) > 1 and fit.init == "truth-perturbed" and batch_work(fit, n, len(reps)) > cap:
            h = (len(reps) + 1) // 2
            stack.extend([(plan, (n, fi, fit, reps[h:])), (plan, (n, fi, fit, reps[:h]))])
        else:
            out.append((plan, (n, fi, fit, reps)))
    return out


def _run_on_client(client, batches, torch_threads: int, bar) -> None:
    """Every (plan, batch) as one task on ``client``, the largest first; rows written by the driver as each finishes."""
    import uuid

    from .cluster import run_tasks

    run_id = uuid.uuid4().hex[:8]
    n_workers = len(client.scheduler_info().get("workers", {}))
    batches = sorted(_balanced(batches, n_workers), key=lambda b: -batch_work(b[1][2], b[1][0], len(b[1][3])))
    tasks = []
    for plan, (n, fi, fit, reps) in batches:
        study = plan.study
        key = f"moelab-{study.name}-{fit.name}-n{n}-r{reps[0]}-{run_id}"
        args = (study, fi, n, list(reps), plan.truth, plan.xpts, tuple(sorted(plan.compile_keys)), torch_threads)
        tasks.append((key, _fit_task, args, (plan, n, fi, fit, reps)))
    if bar is not None and not bar.disable and not n_workers:
        bar.write(f"no Dask workers at {client.scheduler.address} yet; the run starts when workers join")

    def handle(info, result):
        plan, n, fi, fit, reps = info
        if isinstance(result, BaseException):  # KilledWorker: the task took down every worker it ran on
            result = _failed_rows(_base_row(plan.study, fit, plan.truth, n), reps, result, float("nan"))
        plan.write(result)
        bar.set_postfix_str(f"{plan.study.name}: {fit.name} n={n}")
        bar.update(len(reps))

    run_tasks(client, tasks, handle)


def run_study(study: Study, out, *, shard: Tuple[int, int] = (0, 1), progress: bool = True,
              report: bool = True, max_batches: Optional[int] = None, client=None,
              torch_threads: int = 1) -> pd.DataFrame:
    """Run (or resume) a study into directory ``out``.

    Parameters
    ----------
    study : Study
        A validated study (:func:`moelab.studies.load_study`).
    out : path
        Output directory (created). Holds ``study.json``, the results CSV and,
        when not sharded and ``report`` is True, ``rates.csv``,
        ``results.parquet`` and PNG plots.
    shard : (int, int), default (0, 1)
        Run cells I, I+N, … of the (n, replicate) list.
    progress : bool, default True
        Show a tqdm progress bar (on stderr).
    report : bool, default True
        Write rates and plots at the end (unsharded runs only).
    max_batches : int, optional
        Stop after this many batches (tests use it to simulate an interruption).
    client : distributed.Client, optional
        Run the batches on this Dask cluster (:func:`moelab.studies.dask_client`
        makes one from ``local:N`` or an address): one task per batch, the
        largest first (:func:`batch_work`), a batch too large for an even
        spread over the workers split in two (truth-perturbed starts only;
        see :func:`run_studies`), the rows appended here in the driver as tasks
        finish (so in completion order), a task lost with its worker
        resubmitted by Dask. Cells and seeds are those of the serial run, and
        so is every fitted number (a split batch: up to rounding). Default:
        serial, in this process.
    torch_threads : int, default 1
        With ``client``: torch's intra-op threads in each worker process (set
        by every task; one per single-threaded worker process uses one core
        each). Ignored without ``client``.

    Returns
    -------
    pandas.DataFrame
        This run's (shard's) full results table, resumed rows included, in the
        serial run's order (n, setting as in the study, replicate) whatever the
        order the rows were appended in.

    Raises
    ------
    StudyError
        Bad shard or torch_threads, or ``out`` holds a different study.
    Exception
        With ``client``, an error raised inside a task (not a fit's own
        failure, which is a ``failed`` row) after the finished batches are written.
    """
    return run_studies([(study, out, shard)], progress=progress, report=report, max_batches=max_batches,
                       client=client, torch_threads=torch_threads)[0]


def run_studies(runs, *, progress: bool = True, report: bool = True, max_batches: Optional[int] = None,
                client=None, torch_threads: int = 1, desc: Optional[str] = None) -> List[pd.DataFrame]:
    """Run (or resume) several studies, each into its own directory, as one pool of batches.

    Serial (no ``client``): the studies one after the other, as
    :func:`run_study` each. With a ``client`` every study's batches are
    submitted together, largest first (:func:`batch_work`: longest-processing-
    time-first keeps the workers busy to the end, where the batches in study
    order left one worker on the last large cell), and a batch whose
    predicted work exceeds the total over 3 × workers is split in two,
    recursively, where its starts are truth-perturbed (one seed per replicate,
    so the same problems are fitted). Every task compiles the fused kernels
    its study compiles serially (see :func:`run_study`).

    Parameters
    ----------
    runs : sequence of (Study, path) or (Study, path, (I, N))
        Each study, its output directory and optionally its shard.
    progress, report, max_batches, client, torch_threads
        As in :func:`run_study` (``max_batches`` counts over all the studies).
    desc : str, optional
        Progress bar label (default: the study's name, or "N studies").

    Returns
    -------
    list of pandas.DataFrame
        Each study's results table, in the order of ``runs``.

    Raises
    ------
    StudyError
        Bad shard or torch_threads, or an ``out`` holding a different study.
    Exception
        With ``client``, an error raised inside a task, after the finished batches are written.
    """
    if not (isinstance(torch_threads, int) and torch_threads >= 1):
        raise StudyError(f"torch_threads: expected an integer >= 1, got {torch_threads!r}")
    plans = [_Plan(*run) for run in runs]
    todo = [(plan, b) for plan in plans for b in plan.todo]
    batches = todo if max_batches is None else todo[:max_batches]
    from tqdm.auto import tqdm

    total = sum(len(b[3]) for _p, b in todo)
    label = desc or (plans[0].study.name if len(plans) == 1 else f"{len(plans)} studies")
    bar = tqdm(total=total, disable=not progress, unit="fit", desc=label)
    try:
        if client is not None:
            _run_on_client(client, batches, torch_threads, bar)
        else:
            prepared = set()
            for plan, (n, fi, fit, reps) in batches:
                if plan not in prepared:
                    _prepare_kernels(plan.compile_keys, plan.truth.n_features)
                    prepared.add(plan)
                bar.set_postfix_str(f"{fit.name} n={n}")
                plan.write(_fit_batch(plan.study, fi, fit, plan.truth, n, reps, plan.xpts))
                bar.update(len(reps))
    finally:
        bar.close()
    complete = max_batches is None or max_batches >= len(todo)
    return [plan.finish(report, complete) for plan in plans]


def _in_study_order(results: pd.DataFrame, study: Study) -> pd.DataFrame:
    """Rows in the serial run's order (n, then setting as in the study, then replicate), whatever the file's order."""
    order = {f.name: i for i, f in enumerate(study.fits)}
    key = results["setting"].map(order).fillna(len(order))
    return (results.assign(_setting_order=key).sort_values(["n", "_setting_order", "replicate"], kind="stable")
            .drop(columns="_setting_order").reset_index(drop=True))


def merge_results(dirs: Iterable, out=None, *, study: Optional[Study] = None) -> pd.DataFrame:
    """Combine the results of shards (or of interrupted runs) and write the report.

    Parameters
    ----------
    dirs : iterable of paths
        Directories holding ``study.json`` and ``results*.csv``; every
        ``study.json`` must be identical.
    out : path, optional
        Where to write the merged ``results.csv``, ``results.parquet``,
        ``rates.csv`` and plots (default: the first directory).

    Returns
    -------
    pandas.DataFrame
        The merged table, one row per (setting, n, replicate) (first copy kept).

    Raises
    ------
    StudyError
        No directories, a missing ``study.json``, or different studies.
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise StudyError("merge: give at least one results directory")
    fps = []
    for d in dirs:
        meta = d / "study.json"
        if not meta.exists():
            raise StudyError(f"merge: {d} has no study.json; is it an output directory of `moelab run`?")
        fps.append(meta.read_text())
    if len({fingerprint_of(f) for f in fps}) > 1:
        raise StudyError("merge: the directories hold different studies (their study.json differ); merge slices of one study only")
    frames = [read_results(p) for d in dirs for p in sorted(d.glob("results*.csv"))]
    merged = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame(columns=RESULT_COLUMNS)
    merged = merged.drop_duplicates(["setting", "n", "replicate"]).sort_values(["setting", "n", "replicate"]).reset_index(drop=True)
    out = Path(out) if out is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(fps[0])
    merged.to_csv(out / "results.csv", index=False)
    from .report import write_report

    if study is None:
        study = study_from_json(fps[0])
    write_report(merged, study, out, write_csv=False)
    return merged
