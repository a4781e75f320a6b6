"""Rate table (rates.csv) and log-log plots of a study's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.rates import fit_rate
from .config import Study

__all__ = ["rate_table", "write_report", "RATE_COLUMNS", "plot_setting", "plot_overview"]

RATE_COLUMNS = ("study", "gate", "setting", "n_experts", "quantity", "slope", "ci_low", "ci_high", "n_min", "n_max",
                "replicates", "n_fits", "n_failed", "n_not_converged", "n_degenerate")

QUANTITIES = ("loss", "hellinger", "tv", "err_gate_mass", "err_gate_slope", "err_temperature", "err_gate_slope_over_tau",
              "err_expert_slope", "err_expert_intercept", "err_variance")


def rate_table(results: pd.DataFrame, study_name: str = None, *, n_boot: int = 1000, random_state: int = 0) -> pd.DataFrame:
    """One row per (setting, quantity): empirical rate with a bootstrap interval.

    Failed fits have NaN losses and are left out of the slope but counted in
    ``n_failed``; fits that did not converge (or collapsed) are kept in the
    slope and counted in ``n_not_converged`` / ``n_degenerate``.
    The ``loss`` quantity is the setting's Voronoi loss (``loss_name``: D1 or D2).
    """
    rows = []
    for setting, df in results.groupby("setting", sort=False):
        first = df.iloc[0]
        counts = dict(n_fits=len(df), n_failed=int((df["status"] == "failed").sum()),
                      n_not_converged=int((df["status"] == "not_converged").sum()),
                      n_degenerate=int((df["status"] == "degenerate").sum()))
        for q in QUANTITIES:
            if q not in df or not np.isfinite(pd.to_numeric(df[q], errors="coerce")).any():
                continue
            r = fit_rate(df["n"].to_numpy(float), pd.to_numeric(df[q], errors="coerce").to_numpy(float), n_boot=n_boot, random_state=random_state)
            name = f"loss_{first['loss_name']}" if q == "loss" else q
            rows.append(dict(study=study_name or first["study"], gate=first["gate"], setting=setting, n_experts=int(first["n_experts"]),
                             quantity=name, slope=r.slope, ci_low=r.ci_low, ci_high=r.ci_high, n_min=r.n_min, n_max=r.n_max,
                             replicates=r.replicates, **counts))
    return pd.DataFrame(rows, columns=RATE_COLUMNS)


def _summary(df: pd.DataFrame, q: str):
    v = pd.to_numeric(df[q], errors="coerce")
    g = pd.DataFrame({"n": df["n"].astype(int), "v": v}).dropna().groupby("n")["v"]
    return g.mean(), g.quantile(0.1), g.quantile(0.9)


def plot_setting(df: pd.DataFrame, rates: pd.DataFrame, path, title: str) -> None:
    """Log-log panels (one per quantity): mean over replicates, 10–90% band, fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    qs = [q for q in QUANTITIES if q in df and np.isfinite(pd.to_numeric(df[q], errors="coerce")).any()]
    if not qs:  # every fit failed: nothing to plot
        return
    ncol = min(4, len(qs))
    nrow = int(np.ceil(len(qs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, q in zip(axes.flat, qs):
        mean, lo, hi = _summary(df, q)
        name = f"loss_{df['loss_name'].iloc[0]}" if q == "loss" else q
        ax.fill_between(mean.index, lo, hi, alpha=0.25, color="C0", lw=0)
        ax.plot(mean.index, mean.values, "o", color="C0", ms=4, label="mean (10–90% band)")
        med = pd.to_numeric(df[q], errors="coerce").groupby(df["n"].astype(int)).median()
        ax.plot(med.index, med.values, "x", color="0.3", ms=4, label="median")
        r = rates[rates["quantity"] == name]
        if len(r) and np.isfinite(r["slope"].iloc[0]) and (mean > 0).sum() >= 2:
            s, l, h = r[["slope", "ci_low", "ci_high"]].iloc[0]
            nn = np.array(mean.index, float)
            ok = mean.values > 0
            c = np.mean(np.log(mean.values[ok]) - s * np.log(nn[ok]))
            ax.plot(nn, np.exp(c) * nn**s, "-", color="C3", lw=1, label=f"slope {s:.2f} [{l:.2f}, {h:.2f}]")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("n", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def plot_overview(results: pd.DataFrame, rates: pd.DataFrame, path, title: str, quantities=None) -> None:
    """One panel per quantity, one line per setting (mean over replicates), slopes in the legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    quantities = quantities or ("loss", "hellinger", "err_gate_slope", "err_temperature", "err_gate_slope_over_tau", "err_expert_slope")
    qs = [q for q in quantities if q in results and np.isfinite(pd.to_numeric(results[q], errors="coerce")).any()]
    if not qs:
        return
    ncol = min(3, len(qs))
    nrow = int(np.ceil(len(qs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.0 * ncol, 3.0 * nrow), squeeze=False)
    for ax, q in zip(axes.flat, qs):
        for c, (setting, df) in enumerate(results.groupby("setting", sort=False)):
            if not np.isfinite(pd.to_numeric(df[q], errors="coerce")).any():
                continue
            mean, _, _ = _summary(df, q)
            name = f"loss_{df['loss_name'].iloc[0]}" if q == "loss" else q
            r = rates[(rates["setting"] == setting) & (rates["quantity"] == name)]
            lab = setting
            if len(r):
                lab += " {:.2f} [{:.2f}, {:.2f}]".format(*r[["slope", "ci_low", "ci_high"]].iloc[0])
            ax.plot(mean.index, mean.values, "o-", color=f"C{c % 10}", ms=3, lw=1, label=lab)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title("Voronoi loss (D1 exact / D2 over)" if q == "loss" else q, fontsize=9)
        ax.set_xlabel("n", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5.5, loc="best")
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    fig.suptitle(title + " — mean over replicates; legend: slope [95% CI]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def write_report(results: pd.DataFrame, study: Study, out, *, write_csv: bool = True) -> pd.DataFrame:
    """Write ``rates.csv``, ``results.parquet`` (and ``results.csv``) and one PNG per setting into ``out``.

    Returns the rate table.
    """
    out = Path(out)
    rates = rate_table(results, study.name)
    rates.to_csv(out / "rates.csv", index=False, float_format="%.4g")
    if write_csv and not (out / "results.csv").exists():
        results.to_csv(out / "results.csv", index=False)
    try:
        results.to_parquet(out / "results.parquet", index=False)
    except Exception:  # pragma: no cover - pyarrow missing or mixed dtypes: the CSV is the table of record
        pass
    plot_overview(results, rates, out / "overview.png", study.name)
    for setting, df in results.groupby("setting", sort=False):
        gate = df["gate"].iloc[0]
        plot_setting(df, rates[rates["setting"] == setting], out / f"rates-{setting}.png",
                     f"{study.name}: {setting} ({gate}, K={int(df['n_experts'].iloc[0])})")
    return rates
