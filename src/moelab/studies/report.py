"""Rate table (rates.csv) and log-log plots of a study's results.

rates.csv has one row per (setting, quantity, aggregate): the empirical
log-log slope of the per-n ``mean`` (the papers' plots) and of the per-n
``median`` (robust to rare far-off replicates), each with its bootstrap
interval, next to whether the quantity is identified, the theory's rate and
its source, and the verdict (:mod:`moelab.studies.theory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from ..metrics.rates import fit_rate
from .config import Study
from .theory import identified_quantities, verdict

__all__ = ["rate_table", "write_report", "RATE_COLUMNS", "AGGREGATES", "plot_setting", "plot_overview"]

RATE_COLUMNS = ("study", "gate", "setting", "n_experts", "quantity", "aggregate", "slope", "ci_low", "ci_high",
                "identified", "theory_slope", "theory_rate", "theory_source", "verdict",
                "n_min", "n_max", "replicates", "n_fits", "n_failed", "n_not_converged", "n_degenerate")

AGGREGATES = ("mean", "median")

QUANTITIES = ("loss", "hellinger", "tv", "regression_l2", "err_gate_mass", "err_gate_slope", "err_temperature",
              "err_gate_slope_over_tau", "err_expert_slope", "err_expert_intercept", "err_variance", "err_gate_mean",
              "err_gate_covariance")


def _identification(study: Optional[Study]) -> dict:
    """setting → {quantity: identified} from the study's truth on its x points (empty without a study)."""
    if study is None:
        return {}
    from .simulate import study_x_points, true_model

    truth = true_model(study.truth)
    xpts = study_x_points(study, truth)
    return {f.name: identified_quantities(truth, bool(f.gate_options.get("learn_temperature")), xpts) for f in study.fits}


def rate_table(results: pd.DataFrame, study: Union[Study, str, None] = None, *, n_boot: int = 1000,
               random_state: int = 0) -> pd.DataFrame:
    """One row per (setting, quantity, aggregate): empirical rate, bootstrap interval, theory and verdict.

    Parameters
    ----------
    results : DataFrame
        A study's results table (:func:`moelab.studies.run_study`).
    study : Study or str, optional
        The study (gives the name, which quantities are identified and the
        theory claims of its ``[fit.theory]`` tables), or just its name.
    n_boot, random_state : int
        Bootstrap resamples and seed of the intervals.

    Returns
    -------
    DataFrame with columns :data:`RATE_COLUMNS`.

    Notes
    -----
    The rates depend on the rows, not on their order (each setting's rows
    are sorted by n and replicate before the bootstrap). Failed fits have NaN losses and are left out of the slope but counted in
    ``n_failed``; fits that did not converge (or collapsed) are kept in the
    slope and counted in ``n_not_converged`` / ``n_degenerate``. The ``loss``
    quantity is the setting's Voronoi loss (``loss_name``: D1 or D2).
    """
    st = study if isinstance(study, Study) else None
    name = st.name if st is not None else study
    ident = _identification(st)
    claims = {f.name: f.theory for f in st.fits} if st is not None else {}
    rows = []
    for setting, df in results.groupby("setting", sort=False):
        # the bootstrap resamples rows within each n: fix their order, so the intervals depend on the
        # table's contents only (a run on a cluster appends rows in the order its tasks finish)
        df = df.sort_values([c for c in ("n", "replicate") if c in df], kind="stable")
        first = df.iloc[0]
        counts = dict(n_fits=len(df), n_failed=int((df["status"] == "failed").sum()),
                      n_not_converged=int((df["status"] == "not_converged").sum()),
                      n_degenerate=int((df["status"] == "degenerate").sum()))
        for q in QUANTITIES:
            vals = pd.to_numeric(df[q], errors="coerce") if q in df else None
            if vals is None or not np.isfinite(vals).any():
                continue
            qname = f"loss_{first['loss_name']}" if q == "loss" else q
            ok = ident.get(setting, {}).get(qname, True)
            claim = claims.get(setting, {}).get(qname)
            finite = np.isfinite(vals.to_numpy(float)) & (vals.to_numpy(float) > 0)
            levels = np.unique(df["n"].to_numpy(float)[finite])
            for agg in AGGREGATES:
                r = fit_rate(df["n"].to_numpy(float), vals.to_numpy(float), n_boot=n_boot, statistic=agg,
                             random_state=random_state)
                rows.append(dict(study=name or first["study"], gate=first["gate"], setting=setting,
                                 n_experts=int(first["n_experts"]), quantity=qname, aggregate=agg, slope=r.slope,
                                 ci_low=r.ci_low, ci_high=r.ci_high, identified=ok,
                                 **verdict(r.slope, r.ci_low, r.ci_high, identified=ok, claim=claim, n_levels=levels),
                                 n_min=r.n_min, n_max=r.n_max, replicates=r.replicates, **counts))
    return pd.DataFrame(rows, columns=RATE_COLUMNS)


def _summary(df: pd.DataFrame, q: str):
    v = pd.to_numeric(df[q], errors="coerce")
    g = pd.DataFrame({"n": df["n"].astype(int), "v": v}).dropna().groupby("n")["v"]
    return g.mean(), g.quantile(0.1), g.quantile(0.9)


#: figure resolution and sizes: ≥ 1600 px wide, text legible when the PNG is shown at half size
DPI = 100
FONT = {"title": 17, "label": 15, "tick": 13, "legend": 12, "suptitle": 19}


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    return plt, matplotlib.ticker


def _rate_row(rates: pd.DataFrame, setting, qname: str, agg: str = "mean"):
    r = rates[(rates["quantity"] == qname) & (rates["aggregate"] == agg)]
    if setting is not None:
        r = r[r["setting"] == setting]
    return r.iloc[0] if len(r) else None


def _theory_line(ax, nn: np.ndarray, yref: np.ndarray, row) -> None:
    """Dashed theory line through the data's geometric centre: n^s, or c/log n for sub-polynomial claims."""
    if row is None or not isinstance(row.get("theory_rate"), str) or not row["theory_rate"]:
        return
    ok = np.isfinite(yref) & (yref > 0)
    if ok.sum() < 2:
        return
    lx, ly = np.log(nn[ok]), np.log(yref[ok])
    if np.isfinite(row["theory_slope"]) and row["theory_rate"].startswith("n^"):
        c = np.mean(ly - row["theory_slope"] * lx)
        ax.plot(nn, np.exp(c) * nn ** row["theory_slope"], "--", color="k", lw=1.6, label=f"theory {row['theory_rate']}")
    elif "slower" in row["theory_rate"]:
        c = np.mean(ly + np.log(lx))
        ax.plot(nn, np.exp(c) / np.log(nn), "--", color="k", lw=1.6, label="theory: as slow as 1/log n")


def _style(ax, ticker, title: str, identified: bool) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if not identified:
        title += " — NOT IDENTIFIED"
        ax.set_facecolor("0.92")
    ax.set_title(title, fontsize=FONT["title"], color="0.35" if not identified else "k")
    ax.set_xlabel("n", fontsize=FONT["label"])
    ax.tick_params(which="both", labelsize=FONT["tick"])
    ax.grid(True, which="major", alpha=0.3)


def plot_setting(df: pd.DataFrame, rates: pd.DataFrame, path, title: str) -> None:
    """Log-log panels (one per quantity): mean (10–90% band) and median over replicates, the fitted
    mean line with its slope, the theory's rate as a dashed line; non-identified quantities greyed."""
    plt, ticker = _mpl()
    qs = [q for q in QUANTITIES if q in df and np.isfinite(pd.to_numeric(df[q], errors="coerce")).any()]
    if not qs:  # every fit failed: nothing to plot
        return
    ncol = min(4, len(qs))
    nrow = int(np.ceil(len(qs) / ncol))
    width = max(16.5, 4.6 * ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width, 4.4 * nrow), squeeze=False)
    for ax, q in zip(axes.flat, qs):
        mean, lo, hi = _summary(df, q)
        name = f"loss_{df['loss_name'].iloc[0]}" if q == "loss" else q
        ax.fill_between(mean.index, lo, hi, alpha=0.25, color="C0", lw=0)
        ax.plot(mean.index, mean.values, "o", color="C0", ms=7, label="mean (10–90% band)")
        med = pd.to_numeric(df[q], errors="coerce").groupby(df["n"].astype(int)).median()
        ax.plot(med.index, med.values, "x", color="0.25", ms=8, mew=2, label="median")
        r = _rate_row(rates, None, name)
        nn = np.array(mean.index, float)
        if r is not None and np.isfinite(r["slope"]) and (mean > 0).sum() >= 2:
            ok = mean.values > 0
            c = np.mean(np.log(mean.values[ok]) - r["slope"] * np.log(nn[ok]))
            ax.plot(nn, np.exp(c) * nn ** r["slope"], "-", color="C3", lw=2,
                    label=f"mean slope {r['slope']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
        rm = _rate_row(rates, None, name, "median")
        if rm is not None and np.isfinite(rm["slope"]):
            ax.plot([], [], " ", label=f"median slope {rm['slope']:.2f} [{rm['ci_low']:.2f}, {rm['ci_high']:.2f}]")
        _theory_line(ax, nn, mean.values, r)
        ident = bool(r["identified"]) if r is not None else True
        verdict_txt = f"  ({r['verdict']})" if r is not None and isinstance(r["verdict"], str) else ""
        _style(ax, ticker, name + verdict_txt if ident else name, ident)
        ax.legend(fontsize=FONT["legend"], loc="best")
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=FONT["suptitle"])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_overview(results: pd.DataFrame, rates: pd.DataFrame, path, title: str, quantities=None) -> None:
    """One panel per quantity, one line per setting (mean over replicates), slopes and verdicts in the
    legends, each setting's theory rate dashed in its colour; non-identified curves dotted and marked."""
    plt, ticker = _mpl()
    quantities = quantities or ("loss", "hellinger", "err_gate_slope", "err_temperature", "err_gate_slope_over_tau", "err_expert_slope")
    qs = [q for q in quantities if q in results and np.isfinite(pd.to_numeric(results[q], errors="coerce")).any()]
    if not qs:
        return
    ncol = min(3, len(qs))
    nrow = int(np.ceil(len(qs) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(16.5, 6.2 * ncol), 5.2 * nrow), squeeze=False)
    for ax, q in zip(axes.flat, qs):
        any_ident = False
        for c, (setting, df) in enumerate(results.groupby("setting", sort=False)):
            if not np.isfinite(pd.to_numeric(df[q], errors="coerce")).any():
                continue
            mean, _, _ = _summary(df, q)
            name = f"loss_{df['loss_name'].iloc[0]}" if q == "loss" else q
            r = _rate_row(rates, setting, name)
            ident = bool(r["identified"]) if r is not None else True
            any_ident |= ident
            lab = setting
            if r is not None:
                lab += " {:.2f} [{:.2f}, {:.2f}]".format(r["slope"], r["ci_low"], r["ci_high"])
                lab += f" {r['verdict']}" if ident else " NOT IDENTIFIED"
            ax.plot(mean.index, mean.values, "o-" if ident else "o:", color=f"C{c % 10}", ms=5, lw=1.8, label=lab)
            if r is not None and ident and isinstance(r["theory_rate"], str) and r["theory_rate"].startswith("n^"):
                nn, yy = np.array(mean.index, float), mean.values
                ok = np.isfinite(yy) & (yy > 0)
                if ok.sum() >= 2:
                    k = np.mean(np.log(yy[ok]) - r["theory_slope"] * np.log(nn[ok]))
                    ax.plot(nn, np.exp(k) * nn ** r["theory_slope"], "--", color=f"C{c % 10}", lw=1.2, alpha=0.8)
        _style(ax, ticker, "Voronoi loss (D1 exact / D2 over)" if q == "loss" else q, any_ident)
        ax.legend(fontsize=FONT["legend"] - 1, loc="best")
    for ax in list(axes.flat)[len(qs):]:
        ax.axis("off")
    fig.suptitle(title + " — mean over replicates; legend: slope [95% CI] verdict; dashed: theory", fontsize=FONT["suptitle"])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_report(results: pd.DataFrame, study: Study, out, *, write_csv: bool = True) -> pd.DataFrame:
    """Write ``rates.csv``, ``results.parquet`` (and ``results.csv``) and one PNG per setting into ``out``.

    Returns the rate table.
    """
    out = Path(out)
    rates = rate_table(results, study)
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
