"""Analysis of grid results: paper-style tables, figures, findings check and report.

The grid runner writes one tidy row per (cell, benchmark, metric) to
``results/<experiment>/cells.parquet`` (and ``cells.csv``), and the per-item
primary scores behind them to ``items.parquet`` (optional: older results lack it).
This package only reads those files, so it can be rerun at any time without
touching the runs.

Modules: ``tables`` (AVG-% and Tables A/B), ``figures`` (PNG + PDF plots),
``uncertainty`` (paired item bootstrap and seed intervals), ``findings``
(verdicts on the paper's five findings), ``report`` (report.md and W&B
logging); ``python -m analysis`` drives them from the command line.
"""

from pathlib import Path

import pandas as pd

REQUIRED_COLUMNS = (
    "experiment", "cell", "teacher", "method", "ratio", "ratio_achieved",
    "recovery", "data_fraction", "seed", "benchmark", "metric", "primary",
    "score", "teacher_score", "retained",
)
NUMERIC_COLUMNS = (
    "ratio", "ratio_achieved", "data_fraction", "seed", "score", "teacher_score", "retained",
)
RESULT_FILES = ("cells.parquet", "cells.csv")
ITEMS_FILE = "items.parquet"
ITEM_COLUMNS = ("cell", "role", "teacher", "benchmark", "item", "stratum", "score", "pred", "gold")


class AnalysisError(ValueError):
    """Results that cannot be analysed; the message is one line naming the file."""


def find_results_file(path_or_dir) -> Path:
    """The cells file to read: the path itself, or the first of RESULT_FILES inside it.

    Parquet comes first because it keeps dtypes exactly; the CSV is the fallback.
    """
    path = Path(path_or_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AnalysisError(f"no such results file or directory: {path}")
    for name in RESULT_FILES:
        if (path / name).is_file():
            return path / name
    raise AnalysisError(f"no {' or '.join(RESULT_FILES)} in {path}")


def load_results(path_or_dir) -> pd.DataFrame:
    """Read and validate a results table, so later steps can trust its columns and dtypes."""
    path = find_results_file(path_or_dir)
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError, ImportError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise AnalysisError(f"cannot read {path}: {first_line}") from err
    missing = [col for col in REQUIRED_COLUMNS if col not in df.columns]
    if missing:
        raise AnalysisError(f"{path} lacks required column(s): {', '.join(missing)}")
    if df.empty:
        raise AnalysisError(f"{path} has no rows")
    df = df.copy()
    for col in NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["primary"] = _as_bool(df["primary"])
    if not df["primary"].any():
        raise AnalysisError(f"{path} has no primary metric rows, so AVG-% is undefined")
    return df


def _as_bool(series: pd.Series) -> pd.Series:
    """CSV round trips may turn booleans into strings such as 'True' or '1'."""
    if series.dtype == bool:
        return series
    return series.astype(str).str.strip().str.lower().isin({"true", "1", "1.0", "yes"})


def load_items(path_or_dir) -> pd.DataFrame | None:
    """The per-item scores beside a cells file, or None when there are none (then no bootstrap).

    An unreadable or malformed file is an error, not a silent fallback to no intervals.
    """
    path = Path(path_or_dir)
    path = (path if path.is_dir() else path.parent) / ITEMS_FILE
    if not path.is_file():
        return None
    try:
        items = pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise AnalysisError(f"cannot read {path}: {first_line}") from err
    missing = [col for col in ITEM_COLUMNS if col not in items.columns]
    if missing:
        raise AnalysisError(f"{path} lacks required column(s): {', '.join(missing)}")
    return items
