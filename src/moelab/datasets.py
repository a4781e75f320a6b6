"""Real data sets bundled with moelab, and reading tables from CSV/Parquet.

=========  ======  ==============================================================
name       rows    columns (source)
=========  ======  ==============================================================
mcycle     133     times (ms after impact), accel (g). R MASS; Silverman (1985),
                   J. R. Stat. Soc. B 47:1-52.
faithful   272     eruptions (min), waiting (min). R datasets; Härdle (1991);
                   Azzalini & Bowman (1990).
diamonds   53,940  carat, cut, color, clarity, depth, table, price (USD), x, y,
                   z (mm). R ggplot2.
=========  ======  ==============================================================
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pandas as pd

__all__ = ["DATASETS", "load_dataset", "read_table", "csv_dialect"]

DATASETS = {
    "mcycle": "Motorcycle crash head acceleration (accel ~ times); Silverman 1985, R MASS",
    "faithful": "Old Faithful geyser eruptions and waiting times; Azzalini & Bowman 1990, R datasets",
    "diamonds": "Prices and attributes of 53,940 diamonds; R ggplot2",
}


def load_dataset(name: str) -> pd.DataFrame:
    """Load a bundled data set by name as a DataFrame (a fresh copy each call).

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`DATASETS`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; bundled data sets are {', '.join(DATASETS)}")
    with resources.files("moelab").joinpath("data", f"{name}.csv").open("rb") as fh:
        return pd.read_csv(fh)


#: a field that is a number with a decimal comma (European CSV), e.g. "-1,25" or "3,5e-2"
_DECIMAL_COMMA_FIELD = re.compile(r"(?:^|;)\s*\"?[+-]?\d+,\d+(?:[eE][+-]?\d+)?\"?\s*(?=;|$)", re.M)


def csv_dialect(path, n_lines: int = 200) -> dict:
    """``pandas.read_csv`` options for a .csv file: ``{}``, or semicolon-delimited (European CSV).

    A file is semicolon-delimited when its header line has a ``;`` and no ``,``;
    it then uses decimal commas (``decimal=","``) when one of the first ``n_lines`` data
    lines has a field like ``1,5`` (digits, comma, digits), else decimal points.
    """
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line for _, line in zip(range(n_lines + 1), fh)]
    header = lines[0] if lines else ""
    if ";" not in header or "," in header:
        return {}
    body = "".join(line.rstrip("\r\n") + "\n" for line in lines[1:])
    return {"sep": ";", "decimal": "," if _DECIMAL_COMMA_FIELD.search(body) else "."}


def read_table(source: str) -> pd.DataFrame:
    """Read ``source``: a bundled data set name, or a path to a .csv/.tsv/.parquet file.

    CSV files may be semicolon-delimited with decimal commas (detected, :func:`csv_dialect`).

    Raises
    ------
    ValueError
        If the file does not exist, has an unknown extension, cannot be parsed,
        or has no rows.
    """
    if source in DATASETS and not Path(source).exists():
        return load_dataset(source)
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"no such file {source!r} and no bundled data set of that name; "
            f"give a CSV/Parquet path or one of {', '.join(DATASETS)}"
        )
    if path.is_dir():
        raise ValueError(f"{source!r} is a directory; give a CSV or Parquet file")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ValueError(f"{source!r} is empty (0 bytes); give a file with a header row and at least one data row")
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".txt"):
            df = pd.read_csv(path, **csv_dialect(path))
        elif suffix == ".tsv":
            df = pd.read_csv(path, sep="\t")
        else:
            raise ValueError(f"unknown file type {suffix!r} for {source!r}; use .csv, .tsv or .parquet")
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"could not read {source!r} as {suffix.lstrip('.') or 'a table'}: {exc}") from None
    if df.shape[0] == 0:
        raise ValueError(f"{source!r} has no data rows")
    return df
