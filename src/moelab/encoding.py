"""Tables → design matrices: numeric columns as they are, categorical columns one-hot encoded.

:class:`DesignEncoding` is learnt from the input columns of a table
(:meth:`DesignEncoding.from_frame`) and applied to any table with the same
columns (:meth:`DesignEncoding.transform`); the command line and
:class:`moelab.MixtureOfExpertsRegressor` use the same one, so a fit from
``moelab fit`` and one from Python on the same table agree to every digit.

Columns and their coding (treatment contrasts, R's ``contr.treatment`` and
patsy's ``C(x, Treatment)``):

* **numeric** (integer or float dtype, or text that parses as numbers): one
  design column, same name. A value that is not a number is an error naming
  its row and value.
* **categorical**: pandas ``category`` dtype (levels in the declared order,
  unused ones dropped), ``bool`` dtype (False, True), or text (levels
  sorted). The first level is the reference and is dropped; each other level
  L gives a 0/1 column named ``name[L]`` (``occupation[sales]``). A level
  not seen when the encoding was learnt is an error. Ordered categoricals are
  coded the same way (no polynomial contrasts).

A text column counts as numeric with bad entries when at least half of its
non-missing values parse as numbers (``"1.5", "2", "abc"``), and as
categorical otherwise; give it as ``category`` (CLI ``--categorical COL``)
to force categories.

Rows in messages: ``rows="index"`` names the DataFrame's index label
(``index 16``); ``rows="file"`` numbers data rows from 1, the first row after
the header being row 1 (``row 17``), which is what the command line uses.

The encoding is a small JSON-serialisable value: :meth:`DesignEncoding.to_dict`
/ :meth:`DesignEncoding.from_dict`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["ColumnEncoding", "DesignEncoding", "encoding_for", "numeric_column", "ROWS"]

#: how rows are named in messages: DataFrame index labels, or data rows of a file counted from 1
ROWS = ("index", "file")
_SHOWN = 5  # offending values listed per message
_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d+,\d+(?:[eE][+-]?\d+)?\s*$")


def _row_names(index: pd.Index, positions, rows: str) -> list:
    if rows == "file":
        return [f"row {int(p) + 1}" for p in positions]
    return [f"index {_plain(index[int(p)])!r}" for p in positions]


def _listing(series: pd.Series, positions, rows: str) -> str:
    names = _row_names(series.index, positions[:_SHOWN], rows)
    shown = ", ".join(f"{r}: {_plain(series.iloc[int(p)])!r}" for r, p in zip(names, positions[:_SHOWN]))
    shown += f" (and {len(positions) - _SHOWN} more)" if len(positions) > _SHOWN else ""
    return shown + (" (data rows counted from 1 after the header)" if rows == "file" else "")


def _is_text(s: pd.Series) -> bool:
    return pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s)


def _parse_numbers(s: pd.Series):
    """Text → float64 (NaN where missing or unparseable) and the positions of unparseable values."""
    missing = s.isna().to_numpy()
    num = pd.to_numeric(s.where(~missing), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(np.isnan(num) & ~missing)
    return num, bad, missing


def _numeric_error(s: pd.Series, name: str, bad, rows: str, role: str) -> ValueError:
    text = s.iloc[bad].astype(str)
    hint = ""
    if text.map(lambda v: bool(_DECIMAL_COMMA.match(v))).any():
        hint = (" Values like '1,5' use a decimal comma: save the file with decimal points, or as a semicolon-"
                "delimited CSV, which moelab reads with decimal commas.")
    fix = "fix or remove those rows"
    if role == "input":
        how = f"--categorical {name}" if rows == "file" else f"X[{name!r}].astype('category')"
        fix += f", or, if the column holds categories, declare it categorical ({how})"
    what = "1 value is not a number" if len(bad) == 1 else f"{len(bad)} values are not numbers"
    return ValueError(f"column {name!r} is numeric but {what}: "
                      f"{_listing(s, bad, rows)}; {fix}.{hint}")


def numeric_column(s: pd.Series, name: str, *, rows: str = "index", role: str = "response") -> pd.Series:
    """A column as float64, or a ``ValueError`` naming the rows and values that are not numbers.

    Parameters
    ----------
    s : pandas Series of length n_samples
    name : str
        The column's name, for the message.
    rows : {"index", "file"}, default "index"
        How rows are named (see the module docstring).
    role : {"response", "input", "model input"}
        What the column is, for the message. ``"input"`` (a column a model is being fitted on) gets the
        hint to declare the column categorical; ``"model input"`` (new data for a fitted model, whose
        coding is fixed) does not.

    Returns
    -------
    pandas Series of float64 (missing values stay NaN), same index.

    Raises
    ------
    ValueError
        Text that does not parse as numbers (most values: "is not numeric"), bool or
        categorical dtype (for the response), or another non-numeric dtype.
    """
    _check_rows(rows)
    if pd.api.types.is_bool_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype):
        raise ValueError(f"column {name!r} is not numeric (dtype {s.dtype}); the {role} must be numbers")
    if pd.api.types.is_numeric_dtype(s):
        return s.astype(np.float64)
    if not _is_text(s):
        raise ValueError(f"column {name!r} is not numeric (dtype {s.dtype}); convert it to numbers first")
    num, bad, missing = _parse_numbers(s)
    n_present = int((~missing).sum())
    if n_present and len(bad) * 2 > n_present:
        raise ValueError(f"column {name!r} is not numeric (it holds text such as {s.iloc[bad[0]]!r}); "
                         f"the {role} must be numbers")
    if len(bad):
        raise _numeric_error(s, name, bad, rows, role)
    return pd.Series(num, index=s.index, name=s.name)


def _check_rows(rows: str) -> None:
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {', '.join(map(repr, ROWS))}, got {rows!r}")


def _plain(v):
    """A level as a plain Python (JSON) value."""
    return v.item() if isinstance(v, np.generic) else v


def _sorted_levels(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types: by type name, then value
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


@dataclass(frozen=True)
class ColumnEncoding:
    """How one input column becomes design columns.

    Attributes
    ----------
    name : str
        The column's name in the table.
    kind : {"numeric", "categorical"}
    levels : tuple
        Categorical only: every level in order (str, int, float or bool); ``levels[0]`` is the
        reference, coded by zeros in every dummy.
    """

    name: str
    kind: str
    levels: tuple = ()

    @property
    def feature_names(self) -> tuple:
        """Design columns: ``(name,)`` or ``name[L]`` for each non-reference level L."""
        if self.kind == "numeric":
            return (self.name,)
        return tuple(f"{self.name}[{lv}]" for lv in self.levels[1:])

    @property
    def reference(self):
        return self.levels[0] if self.kind == "categorical" else None


@dataclass(frozen=True)
class DesignEncoding:
    """Encoding of a table's input columns into a float64 design matrix (see the module docstring).

    Attributes
    ----------
    columns : tuple of ColumnEncoding
        One per input column, in the table's order.
    """

    columns: tuple

    # ------------------------------------------------------------- learning
    @classmethod
    def from_frame(cls, X: pd.DataFrame, *, rows: str = "index") -> "DesignEncoding":
        """Learn the encoding from the input columns of ``X``.

        Parameters
        ----------
        X : pandas DataFrame of shape (n_samples, n_columns)
            String column names (the design columns are named from them).
        rows : {"index", "file"}, default "index"
            How rows are named in error messages.

        Returns
        -------
        DesignEncoding

        Raises
        ------
        TypeError
            If X is not a DataFrame.
        ValueError
            Non-string or duplicate column names; a numeric column with values that are not
            numbers (their rows and values); a categorical column with missing values or a
            single level; a column of another dtype (dates, ...).
        """
        _check_rows(rows)
        if not isinstance(X, pd.DataFrame):
            raise TypeError(f"X must be a pandas DataFrame to encode categorical columns, got {type(X).__name__}")
        names = list(X.columns)
        if not all(isinstance(c, str) for c in names):
            raise ValueError(f"column names must be strings to name the design columns, got {names!r}")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"X has duplicate column name(s) {', '.join(map(repr, dup))}; rename them")
        out = []
        for name in names:
            s = X[name]
            if isinstance(s.dtype, pd.CategoricalDtype):
                present = set(s.dropna().unique().tolist())
                levels = [c for c in s.cat.categories.tolist() if c in present]  # declared order, unused dropped
            elif pd.api.types.is_bool_dtype(s):
                levels = [lv for lv in (False, True) if lv in set(s.tolist())]
            elif pd.api.types.is_numeric_dtype(s):
                out.append(ColumnEncoding(name, "numeric"))
                continue
            elif _is_text(s) and len(s.dropna()) and all(isinstance(v, (bool, np.bool_)) for v in s.dropna()):
                levels = [lv for lv in (False, True) if lv in set(s.dropna().tolist())]  # bools with missing values
            elif _is_text(s):
                num, bad, missing = _parse_numbers(s)
                n_present = int((~missing).sum())
                comma = int(s.iloc[bad].astype(str).map(lambda v: bool(_DECIMAL_COMMA.match(v))).sum())
                if n_present and (len(bad) - comma) * 2 <= n_present:  # mostly numbers (maybe with decimal commas)
                    if len(bad):
                        raise _numeric_error(s, name, bad, rows, "input")
                    out.append(ColumnEncoding(name, "numeric"))
                    continue
                levels = _sorted_levels(s.dropna().unique().tolist())
            else:
                raise ValueError(f"column {name!r} has dtype {s.dtype}, neither numeric nor categorical; "
                                 "convert it to numbers (or to categories) first")
            _check_levels(s, name, levels, rows)
            out.append(ColumnEncoding(name, "categorical", tuple(_plain(v) for v in levels)))
        enc = cls(tuple(out))
        fn = enc.feature_names
        clash = sorted({c for c in fn if fn.count(c) > 1})
        if clash:
            raise ValueError(f"design column name(s) {', '.join(map(repr, clash))} occur twice (a level's name equals "
                             "another column's); rename the column or the level")
        return enc

    # --------------------------------------------------------------- applying
    @property
    def feature_names(self) -> list:
        """Names of the design columns, in order (n_features of them)."""
        return [f for c in self.columns for f in c.feature_names]

    @property
    def column_names(self) -> list:
        """Names of the input columns the encoding reads."""
        return [c.name for c in self.columns]

    @property
    def has_categorical(self) -> bool:
        return any(c.kind == "categorical" for c in self.columns)

    def transform(self, X: pd.DataFrame, *, rows: str = "index") -> pd.DataFrame:
        """The design matrix of ``X``: float64, columns :attr:`feature_names`, X's index.

        Parameters
        ----------
        X : pandas DataFrame with the columns :attr:`column_names` (any order; no others)
        rows : {"index", "file"}, default "index"

        Returns
        -------
        pandas DataFrame of shape (n_samples, n_features), float64 (missing numeric values stay NaN
        for the caller's own missing-value check).

        Raises
        ------
        ValueError
            X is not a DataFrame, lacks a column or has others; a numeric column with values that
            are not numbers; a categorical column with missing values or a level not seen when the
            encoding was learnt (rows, values and the known levels named).
        """
        _check_rows(rows)
        if not isinstance(X, pd.DataFrame):
            raise ValueError(f"X must be a pandas DataFrame with columns {', '.join(self.column_names)} (the model "
                             f"encodes categorical columns), got {type(X).__name__}")
        have = [str(c) for c in X.columns]
        missing = [c for c in self.column_names if c not in have]
        extra = [c for c in have if c not in self.column_names]
        if missing or extra:
            raise ValueError(f"X has columns {', '.join(have)} but the model was fitted on "
                             f"{', '.join(self.column_names)}" + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; not in the model: {', '.join(extra)}" if extra else ""))
        parts = {}
        for col in self.columns:
            s = X[col.name]
            if col.kind == "numeric":
                parts[col.name] = numeric_column(s, col.name, rows=rows, role="model input").to_numpy()
                continue
            codes = _codes(s, col.levels)
            na = np.flatnonzero(s.isna().to_numpy())
            if len(na):
                _check_levels(s, col.name, col.levels, rows)
            unseen = np.flatnonzero(codes < 0)
            if len(unseen):
                raise ValueError(f"column {col.name!r} has level(s) the model was not fitted on: "
                                 f"{_listing(s, unseen, rows)}; the model knows {', '.join(map(repr, col.levels))}")
            for i, fname in enumerate(col.feature_names, start=1):
                parts[fname] = (codes == i).astype(np.float64)
        return pd.DataFrame(parts, index=X.index, columns=self.feature_names)

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """JSON-serialisable form: ``{"columns": [{"name", "kind", "levels"?}, ...]}``."""
        return {"columns": [{"name": c.name, "kind": c.kind} if c.kind == "numeric"
                            else {"name": c.name, "kind": c.kind, "levels": list(c.levels)} for c in self.columns]}

    @classmethod
    def from_dict(cls, d) -> "DesignEncoding":
        """Inverse of :meth:`to_dict`; ``ValueError`` naming what is wrong in an edited or foreign dict."""
        if not isinstance(d, dict) or not isinstance(d.get("columns"), list) or not d["columns"]:
            raise ValueError("an encoding must be a dict with a non-empty 'columns' list, as DesignEncoding.to_dict() "
                             "writes")
        cols = []
        for i, c in enumerate(d["columns"]):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c.get("kind") not in ("numeric", "categorical"):
                raise ValueError(f"encoding column {i} must be a dict with a string 'name' and 'kind' 'numeric' or "
                                 f"'categorical', got {c!r}")
            if c["kind"] == "numeric":
                cols.append(ColumnEncoding(c["name"], "numeric"))
                continue
            levels = c.get("levels")
            if (not isinstance(levels, list) or len(levels) < 2 or len(set(map(repr, levels))) != len(levels)
                    or not all(isinstance(v, (str, int, float, bool)) for v in levels)):
                raise ValueError(f"encoding column {c['name']!r} needs 'levels': a list of at least 2 distinct strings "
                                 f"or numbers, got {levels!r}")
            cols.append(ColumnEncoding(c["name"], "categorical", tuple(levels)))
        names = [c.name for c in cols]
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise ValueError(f"encoding names column(s) {', '.join(map(repr, dup))} more than once")
        enc = cls(tuple(cols))
        fn = enc.feature_names
        clash = sorted({c for c in fn if fn.count(c) > 1})
        if clash:
            raise ValueError(f"encoding gives design column name(s) {', '.join(map(repr, clash))} twice")
        return enc


def _codes(s: pd.Series, levels: Sequence) -> np.ndarray:
    """Index of each value in ``levels`` (−1: not a level or missing)."""
    values = s.astype(object).to_numpy()
    return pd.Index(list(levels), dtype=object).get_indexer(values).astype(np.int64)


def _check_levels(s: pd.Series, name: str, levels, rows: str) -> None:
    na = np.flatnonzero(s.isna().to_numpy())
    if len(na):
        where = ", ".join(_row_names(s.index, na[:_SHOWN], rows)) + (", ..." if len(na) > _SHOWN else "")
        raise ValueError(f"categorical column {name!r} has {len(na)} missing value(s) ({where}"
                         f"{'; data rows counted from 1 after the header' if rows == 'file' else ''}); "
                         "drop or impute those rows")
    if len(levels) < 2:
        raise ValueError(f"categorical column {name!r} has a single level {levels[0]!r}; drop it (the model already "
                         "has an intercept)")


def encoding_for(X, *, rows: str = "index") -> Optional[DesignEncoding]:
    """The encoding a DataFrame ``X`` needs, or None (arrays, or DataFrames whose columns are all numeric dtypes).

    Raises
    ------
    ValueError
        As :meth:`DesignEncoding.from_frame`.
    """
    if not isinstance(X, pd.DataFrame):
        return None
    if all(pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt) for dt in X.dtypes):
        return None
    return DesignEncoding.from_frame(X, rows=rows)
