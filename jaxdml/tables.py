"""Tables (.csv, .parquet) read through pandas and pyarrow, and the data errors."""

from __future__ import annotations

import contextlib
import os

import numpy as np

from jaxdml.config import ConfigError

_EXTRA = "pip install 'jaxdml[datasets]'"


class DataError(ConfigError):
    """The data named by the config is missing or invalid. Exit status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_table(path: str):
    """The file as a pandas DataFrame, header names exactly as written.

    CSV goes through pyarrow's parser (pandas engine='pyarrow'), which, unlike the
    default one, refuses rows with too few fields as well as too many.
    """
    try:
        import pandas as pd
    except ImportError as e:
        raise DataError(f"{path}: reading .csv/.parquet needs pandas and pyarrow: {_EXTRA}") from e
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (no header row)")
    try:
        if path.endswith(".csv"):
            return pd.read_csv(path, engine="pyarrow")
        return pd.read_parquet(path)
    except ImportError as e:
        raise DataError(f"{path}: reading .csv/.parquet needs pyarrow: {_EXTRA}") from e
    except (ValueError, OSError) as e:  # pandas' ParserError and pyarrow's errors included
        raise DataError(_unreadable(path, e)) from e


def _unreadable(path: str, error: BaseException) -> str:
    """One line on why a table could not be read, with the line of a ragged CSV row."""
    if path.endswith(".csv"):
        row = _first_ragged_row(path)
        if row is not None:
            return (
                f"{path}: line {row.number} has {row.actual_columns} fields "
                f"but the header has {row.expected_columns}"
            )
    kind = "CSV" if path.endswith(".csv") else "Parquet"
    return f"{path}: cannot read as {kind} ({first_line(error)})"


def _first_ragged_row(path: str):
    """pyarrow's record of the first row whose field count differs from the header's
    (its line number is only known when parsing in one thread, so parse again so)."""
    import pyarrow.csv as pacsv

    found = []

    def stop(row):
        found.append(row)
        return "error"

    with contextlib.suppress(ValueError, OSError):  # the error we asked for, or another
        pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=stop),
        )
    return found[0] if found and found[0].number is not None else None


def table_arrays(path: str, label: str) -> tuple:
    """(features float64 with NaN where a cell is empty, labels, where, feature column
    names, whether the labels are categorical) of a .csv or .parquet table."""
    df = _read_table(path)
    import pandas as pd

    columns = [str(c) for c in df.columns]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: repeated column names {repeated}")
    if label not in columns:
        raise DataError(
            f"{path}: no label column {label!r} (config.data.label_column); columns are {columns}"
        )
    if len(df) == 0:
        raise DataError(f"{path}: no data rows (header only)")
    features = [c for c in df.columns if c != label]
    if not features:
        raise DataError(f"{path}: no feature columns besides the label column {label!r}")
    for name in features:
        _check_feature_column(path, name, df[name])
    x = df[features].to_numpy(dtype=np.float64, na_value=np.nan)
    y = df[label]
    missing = y.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{path}: label column {label!r} has missing values "
            f"(first at row {int(np.argmax(missing))})"
        )
    categorical = isinstance(y.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(y)
    values = y.to_numpy() if categorical else y.to_numpy(dtype=np.float64)
    return x, values, path, tuple(str(c) for c in features), categorical


def _check_feature_column(path: str, name: str, column) -> None:
    """Numbers and booleans (as 0/1) are features; any other column is named in an error."""
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(column) and not isinstance(
        column.dtype, pd.CategoricalDtype
    )
    if numeric or column.isna().all():
        return
    example = column.dropna().iloc[0]
    raise DataError(
        f"{path}: column {name!r} is not numeric (dtype {column.dtype}, e.g. {example!r}); "
        "encode it as numbers or drop it"
    )
