"""``moelab select``: choose the number of experts K by BIC, AIC or ICL.

``moelab select DATA --x COL[,COL...] --y COL --experts 1-6 [--criterion bic|aic|icl]
[--format text|json] [--out DIR]`` fits one model per K
(:func:`moelab.select_n_experts`; K = 1 by least squares), prints the table
and the chosen K, and with ``--out DIR`` writes ``DIR/selection.json`` (the
JSON object of ``--format json``) and ``DIR/criteria.png`` (the criteria
against K). The gate, estimator and seed flags are those of ``moelab fit``,
so the row for K equals ``moelab fit --experts K`` with the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ._cli_errors import CLIError, user_errors

__all__ = ["register_select", "run_select", "format_selection"]


def register_select(sub) -> None:
    """Add the ``select`` subcommand to ``sub`` (an argparse subparsers object)."""
    from .cli import add_model_arguments

    p = sub.add_parser(
        "select",
        help="choose the number of experts by BIC, AIC or ICL",
        description="Fit one Gaussian mixture of experts per number of experts K (K = 1: linear regression by "
                    "least squares) and tabulate log-likelihood, free parameters, BIC, AIC, ICL (= BIC + 2 x the "
                    "entropy of the responsibilities; all three: lower is better), the smallest expert's effective "
                    "size and convergence; choose K by --criterion.",
        epilog="example: moelab select mcycle --x times --y accel --experts 1-6 --criterion bic --out out/select",
    )
    p.add_argument("data", metavar="DATA", help="CSV/TSV/Parquet file, or a bundled data set: mcycle, faithful, diamonds")
    p.add_argument("--x", required=True, action="append", metavar="COL[,COL...]",
                   help="input column(s), comma-separated (repeatable)")
    p.add_argument("--categorical", action="append", metavar="COL[,COL...]",
                   help="--x column(s) to treat as categories even if numeric (as in moelab fit)")
    p.add_argument("--y", required=True, metavar="COL", help="response column")
    p.add_argument("--experts", required=True, metavar="KS",
                   help="candidate numbers of experts: a range 1-6, a list 1,2,4, or both (2-4,6)")
    p.add_argument("--criterion", default="bic", choices=("bic", "aic", "icl"),
                   help="criterion that chooses K (default bic)")
    add_model_arguments(p)
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write DIR/selection.json and DIR/criteria.png (created if needed)")
    p.add_argument("--format", default="text", choices=("text", "json"),
                   help="stdout format: text table (default) or one JSON object")
    p.set_defaults(handler=run_select)


def _check_out(out: Path, data: str) -> tuple:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; give a directory path")
    table, png = out / "selection.json", out / "criteria.png"
    src = Path(data)
    for target in (table, png):
        if src.exists() and target.exists() and target.resolve() == src.resolve():
            raise CLIError(f"--out would overwrite the input file {data}; choose another directory")
    if table.exists():
        try:
            ours = json.loads(table.read_text(encoding="utf-8")).get("moelab") == "select"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise CLIError(f"{table} exists and was not written by moelab select; choose another --out directory")
    elif png.exists():
        raise CLIError(f"{png} exists and was not written by moelab select; choose another --out directory")
    return table, png


def format_selection(doc: dict) -> str:
    """The text report of ``moelab select`` from its JSON object."""
    import pandas as pd

    rows = pd.DataFrame(doc["table"])
    show = pd.DataFrame({
        "K": rows["n_experts"],
        "log-likelihood": rows["loglik"].map(lambda v: f"{v:.3f}"),
        "parameters": rows["n_params"],
        "BIC": rows["bic"].map(lambda v: f"{v:.3f}"),
        "AIC": rows["aic"].map(lambda v: f"{v:.3f}"),
        "ICL": rows["icl"].map(lambda v: f"{v:.3f}"),
        "smallest expert": rows["min_expert_size"].map(lambda v: f"{v:.1f}"),
        "converged": [("yes" if c else "NO") + (", collapsed" if d else "")
                      for c, d in zip(rows["converged"], rows["degenerate"])],
    })
    crit = doc["criterion"]
    chosen = doc["chosen"]
    marks = ["  <-" if k == chosen else "" for k in rows["n_experts"]]
    table = show.to_string(index=False).splitlines()
    lines = [
        f"data       {doc['data']}  ({doc['n_samples']} samples)",
        f"model      {doc['y']} ~ {' + '.join(doc['x'])}, {doc['gate_description']} gate",
        f"criterion  {crit.upper()} (BIC, AIC and ICL = BIC + 2 x entropy of the responsibilities: lower is better)",
        "",
        table[0],
        *[line + m for line, m in zip(table[1:], marks)],
        "",
        (f"chosen: {chosen} expert{'s' if chosen != 1 else ''} (lowest {crit.upper()})" if chosen is not None
         else "chosen: none (every fit collapsed)"),
        "smallest expert = effective number of samples of the smallest expert (sum of its responsibilities)",
    ]
    return "\n".join(lines)


def run_select(args) -> int:
    """Handler of ``moelab select``; returns the exit status."""
    from ._version import __version__
    from .cli import check_fit_flags, read_data, select_columns
    from .estimator import gate_options_from
    from .gates import gate_spec
    from .selection import parse_experts, select_n_experts

    with user_errors("--experts: "):
        ks = parse_experts(args.experts)
    for K in [k for k in ks if k > 1] or ks:  # the gate flags checked against every K >= 2 (K = 1 has no gate)
        gate_opts = check_fit_flags(argparse.Namespace(**{**vars(args), "experts": K}))
    paths = _check_out(args.out, args.data) if args.out is not None else None
    df = read_data(args.data)
    X_in, X, y, x_names = select_columns(df, args.x, args.y, args.categorical)
    params = dict(gate=args.gate, estimator=args.estimator, n_init=args.n_init, n_candidates=args.n_candidates,
                  max_iter=args.max_iter, tol=args.tol, random_state=args.seed,
                  compile={"auto": "auto", "on": True, "off": False}[args.compile],
                  accelerate=None if args.accelerate == "off" else args.accelerate, **gate_opts)
    with warnings.catch_warnings(record=True) as caught, user_errors("cannot fit: "):
        warnings.simplefilter("always")
        table = select_n_experts(X, y, ks, criterion=args.criterion, **params)
    messages = [str(w.message) for w in caught]
    for m in messages:
        print(f"moelab select: warning: {m}", file=sys.stderr)
    with user_errors():
        spec = gate_spec(args.gate, gate_options_from(args.gate, **gate_opts, n_experts=max(ks)), n_experts=max(ks))
    description = spec.template(max(ks), len(x_names)).describe() if max(ks) > 1 else "none (K = 1)"
    doc = {
        "moelab": "select",
        "version": __version__,
        "data": str(args.data),
        "x": x_names,
        "y": args.y,
        "n_samples": int(len(y)),
        "gate": args.gate,
        "gate_description": description,
        "criterion": args.criterion,
        "chosen": table.attrs["chosen"],
        "table": [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                  for row in table.to_dict(orient="records")],
        "seed": args.seed,
        "warnings": messages,
    }
    if paths is not None:
        doc["files"] = {"table": str(paths[0]), "plot": str(paths[1])}
        _write_outputs(table, doc, paths)
    if args.format == "json":
        print(json.dumps(doc, allow_nan=False))
    else:
        print(format_selection(doc))
        if paths is not None:
            print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


def _write_outputs(table, doc, paths) -> None:
    from .plotting import plot_criteria

    out_json, png = paths
    try:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        title = f"{doc['data']}: {doc['y']} ~ {' + '.join(doc['x'])}, {doc['gate_description']} gate"
        plot_criteria(table, criterion=doc["criterion"], title=title).savefig(png, dpi=150)
    except OSError as exc:
        raise CLIError(f"cannot write {exc.filename or out_json}: {exc.strerror or exc}; "
                       "choose a writable --out directory") from exc
