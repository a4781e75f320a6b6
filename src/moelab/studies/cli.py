"""Command-line entry points ``moelab run``, ``moelab merge`` and ``moelab reproduce``.

Registered in :data:`moelab.cli.COMMANDS` as ``"moelab.studies.cli:register_run"``
(and ``register_merge``, ``register_reproduce``). Until then they also run as
``python -m moelab.studies.cli {run,merge,reproduce} ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .._cli_errors import EXIT_USAGE, CLIError, user_errors

__all__ = ["register_run", "register_merge", "register_reproduce", "main", "EXIT_INTERRUPTED"]

#: exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130


def _shard(text: str):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/8), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return (i, n)


def _print_rates(rates, stream=None) -> None:
    """The verdict table: every slope beside the theory's rate, its source and the verdict."""
    import pandas as pd

    stream = stream or sys.stdout
    t = rates.copy()
    t["theory"] = [v if isinstance(v, str) and v else "-" for v in t["theory_rate"]]
    t["CI"] = [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(t["ci_low"], t["ci_high"])]
    src = [v if isinstance(v, str) else "none" for v in t["theory_source"]]
    sources = [s for s in dict.fromkeys(src) if s != "none"]
    t["src"] = [f"[{sources.index(s) + 1}]" if s in sources else "" for s in src]
    cols = ["setting", "quantity", "aggregate", "slope", "CI", "theory", "src", "verdict", "n_min", "n_max", "replicates",
            "n_failed", "n_not_converged"]
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 2000,
                           "display.max_colwidth", 40):
        print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"), file=stream)
    for i, s in enumerate(sources, 1):
        print(f"[{i}] {s}", file=stream)
    counts = t["verdict"].value_counts()
    print("verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=stream)


def _threads(text: str) -> int:
    try:
        t = int(text)
    except ValueError:
        t = 0
    if t < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return t


def _add_scheduler(p) -> None:
    p.add_argument("--scheduler", metavar="auto|serial|local:N|tcp://HOST:PORT|FILE.json", default="auto",
                   help="where the batches run: serial (in this process), or on Dask (pip install \"moelab[dask]\"): "
                   "local:N starts N single-threaded worker processes on this machine, tcp://HOST:PORT joins a "
                   "running `dask scheduler`, FILE.json is its --scheduler-file; default auto: local:CORES on a "
                   "machine with 2 or more cores for a run predicted to take over a minute (with dask installed), "
                   "else serial")
    p.add_argument("--torch-threads", type=_threads, metavar="T",
                   help="torch threads per Dask worker process (default 1), or of this process in a serial run "
                   "(default: torch's, one per core)")


def _client(args, runs):
    """A Dask client for ``--scheduler`` (closed, and a local cluster shut down, on leaving), or None (serial).

    ``runs``: the (study, out[, shard]) pairs of the run, whose predicted work decides ``auto``.
    """
    from .cluster import AUTO_MIN_S, dask_client, resolve_scheduler
    from .runner import plan_work

    spec = args.scheduler
    if spec in (None, "auto"):
        work = plan_work(runs)
        spec = resolve_scheduler(spec, work)
        if spec is not None and not args.no_progress:
            print(f"moelab: a long run (over {AUTO_MIN_S:.0f} s predicted serially): running on {spec}, a local "
                  "Dask cluster of single-threaded worker processes; --scheduler serial runs in this process",
                  file=sys.stderr)
    else:
        spec = resolve_scheduler(spec, 0.0)
    if spec is None:
        if args.torch_threads is not None:
            import torch

            torch.set_num_threads(args.torch_threads)
        return contextlib.nullcontext(None)
    return dask_client(spec)


def _interrupted(out) -> int:
    print(f"interrupted; every finished fit is in {out}; rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def register_run(sub) -> None:
    """Add ``run STUDY.toml --out DIR [--shard I/N] [--quick] [--scheduler local:N|tcp://HOST:PORT]``."""
    p = sub.add_parser("run", help="run a rate study from a TOML file (resumable)",
                       description="Fit every (n, replicate) cell of a study, batched over replicates, appending to "
                       "DIR/results.csv as fits finish (rerun the same command to resume); then write rates.csv and plots.",
                       epilog="examples: moelab run study.toml --out out/study --shard 0/8; "
                       "moelab run study.toml --out out/study --scheduler local:8")
    p.add_argument("study", type=Path, metavar="STUDY.toml")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N", help="run every N-th cell starting at I (job arrays)")
    p.add_argument("--quick", action="store_true", help="apply the study's [quick] overrides")
    _add_scheduler(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def register_merge(sub) -> None:
    """Add ``merge DIR... [--out DIR]``."""
    p = sub.add_parser("merge", help="merge shards of a study into one results table and rates.csv")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: the first DIR)")
    p.set_defaults(handler=_merge)


def register_reproduce(sub) -> None:
    """Add ``reproduce NAME [--quick] --out DIR``."""
    from .presets import PRESETS

    p = sub.add_parser("reproduce", help="run a named published study", description="Run a preset study: "
                       + ", ".join(PRESETS) + ". Resumable: rerun the same command to continue.")
    p.add_argument("name", choices=list(PRESETS), metavar="NAME", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="reduced grid and replicates (< 10 min on 2 cores)")
    _add_scheduler(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_reproduce)


def _run(args) -> int:
    from .config import load_study
    from .runner import run_study

    try:
        with user_errors():
            study = load_study(args.study, quick=args.quick)
            t0 = time.perf_counter()
            with _client(args, [(study, args.out, args.shard)]) as client:
                run_study(study, args.out, shard=args.shard, progress=not args.no_progress, client=client,
                          torch_threads=args.torch_threads or 1)
    except KeyboardInterrupt:
        return _interrupted(args.out)
    if args.shard[1] == 1:
        import pandas as pd

        _print_rates(pd.read_csv(args.out / "rates.csv"))
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {args.out}", file=sys.stderr)
    return 0


def _merge(args) -> int:
    import pandas as pd

    from .runner import merge_results

    with user_errors():
        merge_results(args.dirs, args.out)
    _print_rates(pd.read_csv((args.out or args.dirs[0]) / "rates.csv"))
    return 0


def _reproduce(args) -> int:
    from .presets import preset_runs, reproduce

    t0 = time.perf_counter()
    try:
        with user_errors(), _client(args, preset_runs(args.name, args.out, quick=args.quick)) as client:
            _, rates = reproduce(args.name, args.out, quick=args.quick, progress=not args.no_progress, client=client,
                                 torch_threads=args.torch_threads or 1)
    except KeyboardInterrupt:
        return _interrupted(args.out)
    _print_rates(rates)
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Standalone ``python -m moelab.studies.cli {run,merge,reproduce}`` (same handlers)."""
    parser = argparse.ArgumentParser(prog="moelab")
    sub = parser.add_subparsers(dest="command", required=True)
    for reg in (register_run, register_merge, register_reproduce):
        reg(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"moelab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
