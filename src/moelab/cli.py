"""The ``moelab`` command line.

Subcommands are registered through :data:`COMMANDS`: a name maps to
``"module:function"``, and ``function(subparsers)`` adds its parser with
``subparsers.add_parser(name, ...)`` and sets ``handler=callable(args) -> int``
with ``set_defaults``. Modules are imported only when the parser is built, so
a subcommand lives in its own module. A handler reports a user error (bad
input, not a bug) by raising :class:`CLIError`, or by wrapping library calls in
:func:`user_errors` (both from :mod:`moelab._cli_errors`, which the subcommand
modules import instead of this one); :func:`main` prints it as one line on
stderr and exits 2.

``moelab fit DATA --x COL[,COL...] --y COL --experts K`` fits a Gaussian
mixture of experts to a CSV/Parquet file or a bundled data set and prints a
summary (``--format json``: one JSON object on stdout). With ``--out DIR`` it
also writes ``DIR/params.json``, ``DIR/model.json`` (the saved model, read by
``moelab predict``) and ``DIR/fit.png``; without it nothing is written.
``moelab select`` (:mod:`moelab.cli_select`) and ``moelab predict``
(:mod:`moelab.cli_predict`) share the model flags and the column checks of
``fit`` through :func:`add_model_arguments`, :func:`check_fit_flags`,
:func:`read_data` and :func:`select_columns`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from ._cli_errors import EXIT_USAGE, CLIError, user_errors

__all__ = ["main", "build_parser", "CLIError", "user_errors", "COMMANDS", "add_model_arguments", "check_fit_flags",
           "read_data", "select_columns"]

#: subcommand name -> "module:register function"
COMMANDS = {
    "fit": "moelab.cli:register_fit",
    "select": "moelab.cli_select:register_select",
    "predict": "moelab.cli_predict:register_predict",
    "run": "moelab.studies.cli:register_run",
    "merge": "moelab.studies.cli:register_merge",
    "reproduce": "moelab.studies.cli:register_reproduce",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``moelab`` parser with every subcommand of :data:`COMMANDS` registered."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="moelab", description="Mixture-of-experts models with any gating function."
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in COMMANDS.values():
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv=None) -> int:
    """Run the ``moelab`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 success, 2 usage or input error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # answered before the subcommands are registered (they import torch)
        from ._version import __version__

        print(f"moelab {__version__}")
        return 0
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    try:
        return int(args.handler(args) or 0)
    except CLIError as exc:
        print(f"moelab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------- fit
#: gate option -> its ``moelab fit`` flag
_OPTION_FLAGS = {"temperature": "--temperature", "learn_temperature": "--learn-temperature",
                 "activation": "--activation", "top_k": "--top-k"}


def _gate_help() -> str:
    """One clause per registered gate family, from the registry's descriptions."""
    from .gates import GATES

    return "; ".join(f"{name}: {cls.description}" for name, cls in GATES.items() if cls.description)


def _gates_taking(option: str) -> str:
    from .gates import families_taking

    return " or ".join(f"--gate {g}" for g in families_taking(option))


def register_fit(sub) -> None:
    """Add the ``fit`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "fit",
        help="fit a Gaussian mixture of experts to a table",
        description="Fit a Gaussian mixture of experts p(y|x) = sum_k g_k(x) N(y; a_k'x + b_k, sigma_k^2) "
        "by maximum likelihood and print a summary. Nothing is written unless --out is given.",
        epilog="example: moelab fit mcycle --x times --y accel --experts 3 --out out/mcycle",
    )
    p.add_argument("data", metavar="DATA", help="CSV/TSV/Parquet file, or a bundled data set: mcycle, faithful, diamonds")
    p.add_argument("--x", required=True, action="append", metavar="COL[,COL...]",
                   help="input column(s), comma-separated (repeatable)")
    p.add_argument("--categorical", action="append", metavar="COL[,COL...]",
                   help="--x column(s) to treat as categories even if numeric (text and true/false columns are "
                        "categorical already); one-hot encoded, first level (sorted) dropped, named COL[level]")
    p.add_argument("--y", required=True, metavar="COL", help="response column")
    p.add_argument("--experts", required=True, type=int, metavar="K", help="number of experts K >= 1")
    add_model_arguments(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write DIR/params.json, DIR/model.json and DIR/fit.png (created if needed)")
    p.add_argument("--format", default="text", choices=("text", "json"),
                   help="stdout format: text summary (default) or one JSON object")
    p.add_argument("--level", type=float, default=0.95, metavar="L",
                   help="level of the confidence intervals in the summary (default 0.95)")
    p.add_argument("--bootstrap", type=int, metavar="B",
                   help="also refit B bootstrap resamples (one batched EM call from the fit) for percentile intervals")
    p.add_argument("--bootstrap-kind", default="nonparametric", choices=("nonparametric", "parametric"),
                   help="resample rows (default) or draw y from the fitted model")
    p.add_argument("--quiet", action="store_true",
                   help="no progress display (it is shown on stderr only when stderr is a terminal and the fit "
                        "runs over ~2 s)")
    p.set_defaults(handler=run_fit)


def add_model_arguments(p) -> None:
    """The gate, estimator and seed flags of ``moelab fit`` (shared with ``moelab select``)."""
    from .activations import ACTIVATIONS
    from .gates import GATES
    from .gates.registry import fused_families

    p.add_argument("--gate", default="softmax", choices=list(GATES), help=f"gate family (default softmax). {_gate_help()}")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS),
                   help="activation for --gate activation (default tanh)")
    tau = p.add_mutually_exclusive_group()
    tau.add_argument("--temperature", type=float, metavar="TAU",
                     help="fixed temperature tau > 0 for --gate temperature/activation (default 1)")
    tau.add_argument("--learn-temperature", action="store_true",
                     help="estimate tau (--gate temperature/activation)")
    p.add_argument("--top-k", type=int, metavar="K'", help="experts kept per input for --gate topk (required there)")
    p.add_argument("--estimator", default="em", choices=("em", "mle"), help="EM (default) or L-BFGS maximum likelihood")
    p.add_argument("--n-init", type=int, metavar="N",
                   help="starts run to convergence, batched (default 160 for EM, 10 for MLE)")
    p.add_argument("--n-candidates", type=int, metavar="N",
                   help="EM: segment starts screened by their initial likelihood (default 2000)")
    p.add_argument("--max-iter", type=int, metavar="N", help="maximum iterations per start (default 2000 EM, 500 MLE)")
    p.add_argument("--tol", type=float, metavar="T",
                   help="convergence tolerance (default 1e-8 on the mean log-likelihood change per sample for EM)")
    fused = "/".join(fused_families())
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help=f"EM: run iterations as one fused pass compiled by torch.compile ({fused} gates; "
                        "auto = for large fits, default)")
    p.add_argument("--accelerate", default="squarem", choices=("squarem", "off"),
                   help="EM: SQUAREM extrapolation every third iteration, kept only where the log-likelihood "
                        "does not drop (default), or off for plain EM")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed for the starts and the bootstrap resamples (default 0)")


def check_fit_flags(args) -> dict:
    """Flag combinations → gate options for the estimator; CLIError naming the flag otherwise.

    ``args`` holds the flags of :func:`add_model_arguments` and ``experts`` (K).
    """
    gate = args.gate
    if args.experts < 1:
        raise CLIError(f"--experts must be >= 1, got {args.experts}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise CLIError(f"--temperature must be a number > 0, got {args.temperature}")
    from .gates import gate_family

    family = gate_family(gate)
    takes = {o.name for o in family.options}
    for option, flag in _OPTION_FLAGS.items():
        value = getattr(args, option)
        if (value is not None and value is not False) and option not in takes:
            raise CLIError(f"{flag} needs {_gates_taking(option)} (got --gate {gate})")
    for o in family.options:
        if o.required and getattr(args, o.name, None) is None:
            raise CLIError(f"--gate {gate} needs {_OPTION_FLAGS.get(o.name, o.name)} ({o.help})")
    if args.top_k is not None and not 1 <= args.top_k <= args.experts:
        raise CLIError(f"--top-k must be between 1 and --experts ({args.experts}), got {args.top_k}")
    for flag, v in (("--n-init", args.n_init), ("--n-candidates", args.n_candidates), ("--max-iter", args.max_iter)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be >= 1, got {v}")
    if args.n_candidates is not None and args.estimator != "em":
        raise CLIError("--n-candidates applies to --estimator em only")
    if args.tol is not None and not (math.isfinite(args.tol) and args.tol >= 0):
        raise CLIError(f"--tol must be a number >= 0, got {args.tol}")
    level, n_boot = getattr(args, "level", 0.95), getattr(args, "bootstrap", None)  # moelab fit's flags only
    if not (math.isfinite(level) and 0 < level < 1):
        raise CLIError(f"--level must be a number in (0, 1), e.g. 0.95, got {level}")
    if n_boot is not None and n_boot < 2:
        raise CLIError(f"--bootstrap must be >= 2 (resamples, e.g. 200), got {n_boot}")
    if args.compile != "auto" and args.estimator != "em":
        raise CLIError("--compile applies to --estimator em only")
    if args.compile == "on" and family.em_pass is None:
        from .gates.registry import fused_families

        fams = " or ".join(fused_families())
        raise CLIError(f"--compile on needs --gate {fams} (got --gate {gate}); use --compile auto")
    return dict(activation=args.activation, temperature=args.temperature,
                learn_temperature=args.learn_temperature, top_k=args.top_k)


def _split(specs) -> list:
    return [c.strip() for spec in specs or () for c in spec.split(",")]


def select_columns(df, x_specs, y_name, categorical_specs=None):
    """Split ``--x`` values, look the columns up, encode and check them.

    Returns (X as given to the estimator, with ``--categorical`` columns as pandas categories;
    its design matrix; y as float; the design column names). Rows in messages are data rows
    counted from 1 after the header (:mod:`moelab.encoding`, ``rows="file"``).
    """
    from .encoding import DesignEncoding, numeric_column

    x_names = _split(x_specs)
    if any(not c for c in x_names):
        raise CLIError(f"empty column name in --x {','.join(x_specs)!r}; give COL[,COL...]")
    dup = sorted({c for c in x_names if x_names.count(c) > 1})
    if dup:
        raise CLIError(f"--x lists {', '.join(dup)} more than once")
    if y_name in x_names:
        raise CLIError(f"column {y_name!r} is both an input (--x) and the response (--y)")
    by_name = {str(c): c for c in df.columns}
    missing = [c for c in x_names + [y_name] if c not in by_name]
    if missing:
        semi = any(";" in c for c in by_name)
        raise CLIError(f"no column(s) {', '.join(map(repr, missing))} in the data; available columns: "
                       f"{', '.join(by_name)}" + ("; the file looks semicolon-delimited but its header also has a "
                                                  "comma: save it with one delimiter" if semi else ""))
    cats = _split(categorical_specs)
    stray = [c for c in cats if c not in x_names]
    if stray:
        raise CLIError(f"--categorical {', '.join(stray)} must be among the --x columns ({', '.join(x_names)})")
    X_in = df[[by_name[c] for c in x_names]].copy()
    X_in.columns = x_names
    for c in cats:
        X_in[c] = X_in[c].astype("category")
    with user_errors():
        encoding = DesignEncoding.from_frame(X_in, rows="file")
        X = encoding.transform(X_in, rows="file")
        y = numeric_column(df[by_name[y_name]], y_name, rows="file", role="response")
    for name in list(X.columns) + [y_name]:
        v = (y if name == y_name else X[name]).to_numpy(dtype=float)
        bad = ~np.isfinite(v)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise CLIError(f"column {name!r} has {int(bad.sum())} missing or infinite value(s) (first in data row "
                           f"{first + 1}); drop or impute those rows first")
        if np.ptp(v) == 0:
            raise CLIError(f"column {name!r} is constant ({v[0]:g}); drop it "
                           + ("(the model already has intercepts)" if name != y_name else "— there is nothing to model"))
    return X_in, X, y, list(X.columns)


def _is_moelab_output(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("moelab") == "fit"
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, data: str) -> tuple[Path, Path, Path]:
    """Output paths DIR/params.json, DIR/fit.png, DIR/model.json; refuse to overwrite files moelab did not write."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; give a directory path")
    params, png, model = out / "params.json", out / "fit.png", out / "model.json"
    src = Path(data)
    for target in (params, png, model):
        if src.exists() and target.exists() and target.resolve() == src.resolve():
            raise CLIError(f"--out would overwrite the input file {data}; choose another directory")
    if params.exists() and not _is_moelab_output(params):
        raise CLIError(f"{params} exists and was not written by moelab fit; choose another --out directory")
    if png.exists() and not params.exists():
        raise CLIError(f"{png} exists and was not written by moelab fit; choose another --out directory")
    if model.exists() and not _is_model_file(model):
        raise CLIError(f"{model} exists and is not a moelab model file; choose another --out directory")
    return params, png, model


def _is_model_file(path: Path) -> bool:
    from .persistence import FORMAT

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_data(source: str):
    """The table DATA names (file or bundled data set); CLIError with the reader's message otherwise."""
    from .datasets import read_table

    with user_errors():
        try:
            return read_table(source)
        except ValueError as exc:
            msg = str(exc)
            raise CLIError(msg if source in msg else f"could not read {source!r}: {msg}") from exc


def run_fit(args) -> int:
    """Handler of ``moelab fit``; returns the exit status."""
    from .estimator import MixtureOfExpertsRegressor
    from .summary import fit_report, format_report

    gate_opts = check_fit_flags(args)
    paths = _check_out(args.out, args.data) if args.out is not None else None
    df = read_data(args.data)
    X_in, X, y, x_names = select_columns(df, args.x, args.y, args.categorical)
    est = MixtureOfExpertsRegressor(
        args.experts, gate=args.gate, estimator=args.estimator, n_init=args.n_init,
        n_candidates=args.n_candidates, max_iter=args.max_iter, tol=args.tol, random_state=args.seed,
        compile={"auto": "auto", "on": True, "off": False}[args.compile], bootstrap=args.bootstrap,
        accelerate=None if args.accelerate == "off" else args.accelerate,
        bootstrap_kind=args.bootstrap_kind, **gate_opts,
        progress=False if args.quiet or args.estimator != "em" else "auto",
    )
    with warnings.catch_warnings(record=True) as caught, user_errors("cannot fit: "):
        warnings.simplefilter("always")
        est.fit(X_in, y)
    messages = [" ".join(str(w.message).split()) for w in caught]  # one line each
    for m in messages:
        print(f"moelab fit: warning: {m}", file=sys.stderr)
    report = fit_report(est, data=args.data, feature_names=x_names, response=args.y, level=args.level)
    report["seed"] = args.seed
    report["warnings"] = messages
    if paths is not None:
        report["files"] = {"params": str(paths[0]), "plot": str(paths[1]), "model": str(paths[2])}
        _write_outputs(est, X, y, report, paths)
    if args.format == "json":
        print(json.dumps(report, allow_nan=False))
    else:
        print(format_report(report))
        if paths is not None:
            print(f"\nwrote {paths[0]}, {paths[2]} and {paths[1]}")
    return 0


def _write_outputs(est, X, y, report, paths) -> None:
    from .persistence import save_model
    from .plotting import plot_fit

    params, png, model = paths
    try:
        params.parent.mkdir(parents=True, exist_ok=True)
        params.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with user_errors(f"cannot save {model}: "):
            save_model(est, model, response_name=report["y"], x_train=X.to_numpy())  # with est.encoding_
    except OSError as exc:
        raise CLIError(f"cannot write {exc.filename or params}: {exc.strerror or exc}; "
                       "choose a writable --out directory") from exc
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    title = (f"{report['data']}: {report['y']} ~ {' + '.join(report['x'])}, {report['n_experts']} experts, "
             f"{report['gate_description']} gate\nlog-likelihood {fmt(report['loglik'])}, BIC {fmt(report['bic'])}")
    kinds = [c.kind for c in est.encoding_.columns for _ in c.feature_names] if est.encoding_ is not None else []
    column = kinds.index("numeric") if "numeric" in kinds else 0  # plot against a numeric input where there is one
    fig = plot_fit(est.model_, X.to_numpy(), y.to_numpy(), column=column, feature_names=report["x"],
                   response_name=report["y"], title=title)
    try:
        fig.savefig(png, dpi=150)
    except OSError as exc:
        raise CLIError(f"cannot write {png}: {exc.strerror or exc}") from exc

