"""Print a study's rates.csv as the Markdown tables of docs/studies/ (the pages are regenerated from runs).

    python scripts/rates_markdown.py OUT/rates.csv [--aggregate mean|median|both] [--sources]

One row per (setting, quantity): slope [95% CI] of the chosen aggregate(s), the theory's rate, the
verdict and the counts; ``--sources`` appends the numbered theory sources.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd


def _ci(row) -> str:
    return f"{row['slope']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def markdown(rates: pd.DataFrame, aggregate: str = "both", sources: bool = True) -> str:
    src = [v if isinstance(v, str) else "none" for v in rates["theory_source"]]
    names = [s for s in dict.fromkeys(src) if s != "none"]
    rates = rates.assign(_src=src)
    aggs = ("mean", "median") if aggregate == "both" else (aggregate,)
    head = ["setting", "quantity"] + [f"{a} slope [95% CI]" for a in aggs] + ["theory", "verdict" + (" (mean / median)" if len(aggs) > 1 else ""),
                                                                             "n", "reps", "not conv.", "degen."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (setting, q), df in rates.groupby(["setting", "quantity"], sort=False):
        by = {r["aggregate"]: r for _, r in df.iterrows()}
        r0 = by.get("mean", df.iloc[0])
        theory = r0["theory_rate"] if isinstance(r0["theory_rate"], str) and r0["theory_rate"] else "–"
        if r0["_src"] != "none":
            theory += f" [{names.index(r0['_src']) + 1}]"
        verdicts = " / ".join(str(by[a]["verdict"]) for a in aggs if a in by)
        if len(aggs) > 1 and len({by[a]["verdict"] for a in aggs if a in by}) == 1:
            verdicts = str(r0["verdict"])
        cells = [setting, q] + [_ci(by[a]) if a in by else "–" for a in aggs] + [
            theory, verdicts, f"{int(r0['n_min'])}–{int(r0['n_max'])}", str(int(r0["replicates"])),
            str(int(r0["n_not_converged"])), str(int(r0["n_degenerate"]))]
        lines.append("| " + " | ".join(cells) + " |")
    if sources and names:
        lines.append("")
        lines += [f"[{i}] {s}  " for i, s in enumerate(names, 1)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rates")
    p.add_argument("--aggregate", choices=("mean", "median", "both"), default="both")
    p.add_argument("--no-sources", action="store_true")
    a = p.parse_args(argv)
    print(markdown(pd.read_csv(a.rates), a.aggregate, not a.no_sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
