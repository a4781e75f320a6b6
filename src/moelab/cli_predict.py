"""``moelab predict``: apply a saved model (``DIR/model.json`` of ``moelab fit --out``) to new data.

``moelab predict MODEL DATA [--out preds.csv] [--level 0.9]`` writes one CSV
row per data row, in the data's order, with the columns of
:func:`moelab.predict_table`: ``mean``, ``sd``, ``lower``, ``upper`` (the
equal-tailed prediction interval of the mixture at ``--level``), ``expert``
(argmax of the gate g_k(x), 1..K) and ``gate_1`` … ``gate_K``. Without
``--out`` the CSV goes to stdout. Numbers are written at full float64
precision.

DATA needs the raw columns the model was fitted on (``inputs.columns`` of the
model file, e.g. ``carat`` and ``cut``; others are ignored): they are coded by
the model's saved encoding (:class:`moelab.encoding.DesignEncoding`), so a
categorical level the model was not fitted on, or a value that is not a
number, is an error naming its data rows (counted from 1 after the header).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ._cli_errors import CLIError, user_errors

__all__ = ["register_predict", "run_predict"]

_HEADER = "mean,sd,lower,upper,expert,gate_1"


def register_predict(sub) -> None:
    """Add the ``predict`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "predict",
        help="predict with a saved model (model.json of moelab fit --out)",
        description="Apply a saved mixture of experts to new data: per row the predictive mean and sd, the "
                    "equal-tailed prediction interval of the mixture at --level (quantiles of the mixture CDF by "
                    "root-finding; where the experts are far apart the mixture's highest-density region is a "
                    "union of intervals, and the equal-tailed interval also covers the gap between them), the "
                    "expert the gate favours (argmax g_k(x), 1..K) and the gate weights gate_1..gate_K.",
        epilog="example: moelab predict out/mcycle/model.json new.csv --out preds.csv --level 0.9",
    )
    p.add_argument("model", metavar="MODEL", type=Path, help="model file written by moelab fit --out DIR (DIR/model.json)")
    p.add_argument("data", metavar="DATA",
                   help="CSV/TSV/Parquet file or bundled data set with the model's input columns (others are ignored)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the predictions to FILE (CSV) instead of stdout")
    p.add_argument("--level", type=float, default=0.9, metavar="L",
                   help="probability of the prediction interval, 0 < L < 1 (default 0.9)")
    p.set_defaults(handler=run_predict)


def _check_out(out: Path, data: str, model: Path) -> None:
    if out.exists() and out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file name such as {out / 'predictions.csv'}")
    for src in (Path(data), model):
        if src.exists() and out.exists() and out.resolve() == src.resolve():
            raise CLIError(f"--out would overwrite the input file {src}; choose another file")
    if out.exists():
        try:
            with open(out, encoding="utf-8") as fh:
                ours = fh.readline().startswith(_HEADER)
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise CLIError(f"{out} exists and was not written by moelab predict; choose another --out file")


def run_predict(args) -> int:
    """Handler of ``moelab predict``; returns the exit status."""
    from .cli import read_data
    from .persistence import encode_inputs, read_model_file
    from .prediction import predict_table

    if not (math.isfinite(args.level) and 0 < args.level < 1):
        raise CLIError(f"--level must be a probability strictly between 0 and 1 (e.g. 0.9), got {args.level}")
    if args.out is not None:
        _check_out(args.out, args.data, args.model)
    with user_errors():
        mf = read_model_file(args.model)
    df = read_data(args.data)
    with user_errors(f"{args.data}: "):
        X = encode_inputs(df, mf, rows="file")
    if mf.training is not None and mf.training.get("min") is not None:
        lo, hi = np.asarray(mf.training["min"]), np.asarray(mf.training["max"])
        outside = ((X < lo) | (X > hi)).any(1)
        if outside.any():
            cols = [mf.features[j] for j in np.flatnonzero(((X < lo) | (X > hi)).any(0))]
            print(f"moelab predict: warning: {int(outside.sum())} of {len(X)} row(s) (first: row "
                  f"{int(np.flatnonzero(outside)[0]) + 1}) lie outside the training range of {', '.join(cols)}; "
                  "the gate and the experts' lines are extrapolated there", file=sys.stderr)
    with user_errors("cannot predict: "):
        table = predict_table(mf.model, X, args.level)
    if args.out is None:
        try:
            table.to_csv(sys.stdout, index=False)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    except OSError as exc:
        raise CLIError(f"cannot write {args.out}: {exc.strerror or exc}; choose a writable --out file") from exc
    print(f"wrote {args.out} ({len(table)} rows; {100 * args.level:g}% equal-tailed prediction intervals)",
          file=sys.stderr)
    return 0
