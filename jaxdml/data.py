"""Data sets: loaded, checked, split and identified (the batches: jaxdml.batcher).

Data comes from a generator, scikit-learn, or a file: .npz (X, y), .csv / .parquet
(through pandas and pyarrow) held in memory, or a directory with X.npy and y.npy
whose features stay on disk, memory-mapped (`jaxdml.mapped`), for data sets larger
than RAM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from jaxdml.mapped import (
    MappedFile,
    MappedRows,
    Moments,
    Prep,
    fill_values,
    first_bad_cell,
    median_sample,
    scan,
)
from jaxdml.tables import DataError, first_line, table_arrays

__all__ = ["DataError", "Dataset", "load_dataset", "make_classification"]

IDENTITY_FULL_BYTES = 64 << 20  # identity() hashes every training row up to this size
IDENTITY_SAMPLE_ROWS = 4096  # otherwise this many evenly spaced rows, plus the first and last


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split: float32 features, int32 labels 0..K-1 (regression: float32
    targets, num_classes 1).

    Features are numpy arrays in host memory, or `MappedRows` (lazy row views of a
    memory-mapped .npy file) for a data set larger than RAM. `class_names[k]` is the
    original label of class k (str for string labels, int or float for numbers), so
    predictions can be mapped back to it.
    """

    x_train: np.ndarray | MappedRows
    y_train: np.ndarray
    x_test: np.ndarray | MappedRows
    y_test: np.ndarray
    num_classes: int
    name: str
    class_names: tuple = ()

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def predict(self, predict_fn: Callable[[Any, Any], Any], params: Any, split: str) -> np.ndarray:
        """`predict_fn(params, x)` over the 'train' or 'test' rows: one call for arrays in
        memory, one per chunk for mapped rows, so evaluation never loads a mapped split."""
        x = {"train": self.x_train, "test": self.x_test}[split]
        if isinstance(x, MappedRows):
            # np.array copies, so that no chunk outlives its step through a view of it.
            return np.concatenate([np.array(predict_fn(params, c)) for c in x.chunks()])
        return np.asarray(predict_fn(params, x))

    def identity(self) -> dict[str, Any]:
        """A small JSON-able fingerprint of the data, for checkpoint metadata, so that a
        resume can refuse different data: shapes, dtypes, classes and a sha256 of the
        training labels and feature rows. All rows are hashed up to IDENTITY_FULL_BYTES;
        beyond, IDENTITY_SAMPLE_ROWS evenly spaced rows plus the first and last (fast on
        a large mapped file; a change in rows outside the sample goes unnoticed).
        """
        x, n = self.x_train, len(self.y_train)
        digest = hashlib.sha256(np.ascontiguousarray(self.y_train))
        if n * x.dtype.itemsize * x.shape[1] <= IDENTITY_FULL_BYTES:
            hashed: str | int = "all"
            blocks = x.chunks() if isinstance(x, MappedRows) else [x]
        else:
            rows = np.unique(np.linspace(0, n - 1, IDENTITY_SAMPLE_ROWS + 2).astype(np.int64))
            hashed, blocks = len(rows), [x[rows]]
        for block in blocks:
            digest.update(np.ascontiguousarray(block))
        return {
            "train_shape": [int(s) for s in x.shape],
            "test_shape": [int(s) for s in self.x_test.shape],
            "x_dtype": str(x.dtype),
            "y_dtype": str(self.y_train.dtype),
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            "sha256": digest.hexdigest(),
            "hashed_rows": hashed,
        }


class _Raw(NamedTuple):
    """Features and labels as read, before checks and the split."""

    x: Any
    y: Any
    where: str  # the file or source, named in every error
    columns: tuple[str, ...] | None = None  # feature column names (tables)
    categorical: bool = False  # labels are strings/categories: map them in sorted order


def make_classification(
    n_samples: int, n_features: int, n_informative: int, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, pure-numpy classification problem: Gaussian class clusters in an
    informative subspace, linearly mixed into redundant features, plus noise columns.

    Returns:
      (X float32 [n, f], y int32 [n]) with balanced classes.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_classes
    rng.shuffle(y)
    centers = rng.normal(scale=2.0, size=(n_classes, n_informative))
    informative = centers[y] + rng.normal(size=(n_samples, n_informative))
    n_rest = n_features - n_informative
    mix = rng.normal(size=(n_informative, n_rest)) / np.sqrt(n_informative)
    rest = informative @ mix + rng.normal(scale=0.5, size=(n_samples, n_rest))
    x = np.concatenate([informative, rest], axis=1)
    x = x[:, rng.permutation(n_features)]
    return x.astype(np.float32), y.astype(np.int32)


def _sklearn_arrays(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's data set or make_classification, through a local cache: importing
    scikit-learn takes ~1.8 s (scipy), which every process start (and so every restart)
    would pay again for the same arrays."""
    import zipfile
    from importlib import metadata

    try:
        version = metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:
        version = ""
    fields = ["name"]
    if cfg.name == "make_classification":  # a bundled set is named by its name alone
        fields += ["n_samples", "n_features", "n_informative", "n_classes", "random_state"]
    params = "|".join([version, *(f"{k}={cfg.get(k)}" for k in fields)])
    key = hashlib.sha256(params.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"sklearn-{cfg.name}-{key}.npz") if version else ""
    if path and os.path.exists(path):
        try:
            with np.load(path) as f:
                return f["x"], f["y"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a torn or foreign file: made again below
    x, y = _sklearn_generate(cfg)
    if path:
        _save_quietly(path, x=x, y=y)
    return x, y


def cache_dir() -> str:
    """Where generated data sets are kept between processes: $JAXDML_CACHE_DIR, else
    $XDG_CACHE_HOME/jaxdml, else ~/.cache/jaxdml. Safe to delete."""
    if os.environ.get("JAXDML_CACHE_DIR"):
        return os.environ["JAXDML_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdml")


def _save_quietly(path: str, **arrays: np.ndarray) -> None:
    """Writes `path` whole or not at all (a temporary file renamed over it: processes that
    start together each write their own); a cache that cannot be written is skipped."""
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def _sklearn_generate(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError as e:
        raise DataError(
            f"config.data.source='sklearn' needs scikit-learn: pip install 'jaxdml[datasets]' ({e})"
        ) from e
    if cfg.name == "make_classification":
        return datasets.make_classification(
            n_samples=cfg.n_samples,
            n_features=cfg.n_features,
            n_informative=cfg.n_informative,
            n_classes=cfg.n_classes,
            random_state=cfg.random_state,
        )
    loader = getattr(datasets, f"load_{cfg.name}")
    bunch = loader()
    return bunch.data, bunch.target


def make_regression(n_samples: int, n_features: int, n_informative: int, seed: int):
    """A seeded, pure-numpy regression problem: y = a smooth nonlinear function of the
    informative columns plus noise (standard deviation 0.1 of y's).

    Returns:
      (X float32 [n, f], y float32 [n]).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_samples, n_features))
    w = rng.normal(size=n_informative) / np.sqrt(n_informative)
    z = x[:, :n_informative] @ w
    y = z + 0.5 * np.sin(2.0 * z) + 0.3 * x[:, 0] * x[:, min(1, n_features - 1)]
    y = y + 0.1 * np.std(y) * rng.normal(size=n_samples)
    return x.astype(np.float32), y.astype(np.float32)


def _regression_targets(y: np.ndarray, where: str) -> np.ndarray:
    """Float targets (config.data.task='regression'); all must be finite numbers."""
    if y.dtype.kind not in "biuf":
        raise DataError(f"{where}: regression targets must be numbers, got dtype {y.dtype}")
    bad = ~np.isfinite(y.astype(np.float64))
    if bad.any():
        raise DataError(f"{where}: y has NaN/Inf targets (first at row {int(bad.argmax())})")
    return y.astype(np.float32)


def _raw_arrays(cfg: ml_collections.ConfigDict) -> _Raw:
    if cfg.source == "synthetic" and cfg.task == "regression":
        x, y = make_regression(cfg.n_samples, cfg.n_features, cfg.n_informative, cfg.random_state)
        return _Raw(x, y, "synthetic regression data")
    if cfg.source == "synthetic":
        x, y = make_classification(
            cfg.n_samples, cfg.n_features, cfg.n_informative, cfg.n_classes, cfg.random_state
        )
        return _Raw(x, y, "synthetic data")
    if cfg.source == "sklearn":
        return _Raw(*_sklearn_arrays(cfg), f"sklearn {cfg.name}")
    return _file_arrays(cfg)


def _file_arrays(cfg: ml_collections.ConfigDict) -> _Raw:
    path = cfg.path
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (config.data.path)")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"X", "y"} - set(f.files)
                if missing:
                    raise DataError(f"{path}: missing array(s) {sorted(missing)}; need X and y")
                x, y = f["X"], f["y"]
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: cannot read as .npz ({first_line(e)})") from e
        return _Raw(x, y, path, None, y.dtype.kind in "US")
    if path.endswith((".csv", ".parquet", ".pq")):
        return _Raw(*table_arrays(path, cfg.label_column))
    raise DataError(
        f"{path}: unsupported file type; use .npz (X, y), .csv, .parquet, "
        "or a directory holding X.npy and y.npy"
    )


# ------------------------------------------------------------------ checks


def _check_shape(x: Any, y: np.ndarray, where: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{where}: X must be a non-empty 2-D array, got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: y has shape {y.shape} but X has {x.shape[0]} rows")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: X must be numeric, got dtype {x.dtype}")


def _bad_cell_error(where: str, cell: tuple[int, int], value: float, columns) -> DataError:
    """The error for the first NaN/Inf feature value (rows count from 0, after any header)."""
    row, col = cell
    name = repr(columns[col]) if columns else col
    hint = (
        "; config.data.impute (mean|median|zero) can fill missing values"
        if np.isnan(value)
        else "; infinite values cannot be imputed"
    )
    return DataError(f"{where}: X has NaN/Inf values (first at row {row}, column {name}){hint}")


def _encode_labels(
    y: np.ndarray, declared: tuple, where: str, categorical: bool
) -> tuple[np.ndarray, tuple]:
    """Labels as classes 0..K-1, and the original label of each class.

    Numeric labels must be integers (categorical ones need not be). The classes are
    `declared` (config.data.classes), in that order, or else the distinct labels in
    sorted order; strings are compared as strings.
    """
    if y.dtype.kind == "f" and np.isnan(y).any():
        first = int(np.isnan(y).argmax())
        raise DataError(f"{where}: y has missing (NaN) labels (first at row {first})")
    if y.dtype.kind in "USO":
        y, declared = y.astype(str), tuple(str(c) for c in declared)
    elif declared and any(isinstance(c, str) for c in declared):
        raise DataError(f"{where}: labels are numbers but config.data.classes are strings")
    elif not categorical:
        if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)):
            raise DataError(f"{where}: labels must be integers")
        y = y.astype(np.int64)
    classes = np.asarray(declared, dtype=y.dtype) if declared else np.unique(y)
    unknown = np.setdiff1d(np.unique(y), classes)
    if unknown.size:
        raise DataError(
            f"{where}: labels {unknown[:5].tolist()} are not in the declared classes "
            f"{classes.tolist()} (config.data.classes)"
        )
    if classes.size < 2:
        raise DataError(f"{where}: need at least 2 classes, found {classes.tolist()}")
    order = np.argsort(classes, kind="stable")
    labels = order[np.searchsorted(classes, y, sorter=order)]
    return labels.astype(np.int32), tuple(c.item() for c in classes)


# ------------------------------------------------------------------ split and preprocessing


def _split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row numbers: exactly the rows scikit-learn's train_test_split picks
    for (n, test_size, random_state=seed), as the in-memory path always used, without
    importing scikit-learn (~165 MB resident for one permutation)."""
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(np.ceil(test_size * n))
    if n_test >= n:
        raise DataError(f"config.data.test_size={test_size} leaves no training rows out of {n}")
    return perm[n_test:], perm[:n_test]


def _checked_fill(method: str, moments: Moments, sample, where: str, columns) -> np.ndarray:
    """Fill values for config.data.impute; a column without any training value is an error."""
    fill = fill_values(method, moments, sample)
    empty = np.flatnonzero(~np.isfinite(fill))
    if empty.size:
        name = repr(columns[empty[0]]) if columns else int(empty[0])
        raise DataError(
            f"{where}: column {name} has no values in the training split to impute from "
            f"(config.data.impute={method!r})"
        )
    return fill


def _impute(x_tr: np.ndarray, x_te: np.ndarray, method: str, where: str, columns) -> tuple:
    """Fills NaN in both splits with statistics of the training split only."""
    moments = Moments(x_tr.shape[1])
    moments.update(x_tr)
    fill = _checked_fill(method, moments, x_tr, where, columns)
    return tuple(np.where(np.isnan(v), fill.astype(v.dtype), v) for v in (x_tr, x_te))


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads and validates the data set named by `config.data`, split into train/test.

    A directory holding X.npy and y.npy is memory-mapped (see `_load_mapped`);
    everything else is read into memory. Missing feature values are an error unless
    config.data.impute fills them; fill values and standardization come from the
    training split only, after the split.

    Raises:
      DataError: naming the file (or source) and the problem.
    """
    if cfg.source == "file" and os.path.isdir(cfg.path):
        return _load_mapped(cfg)
    raw = _raw_arrays(cfg)
    x, y, where = np.asarray(raw.x), np.asarray(raw.y), raw.where
    _check_shape(x, y, where)
    bad = first_bad_cell(x, allow_nan=cfg.impute != "none")
    if bad is not None:
        raise _bad_cell_error(where, bad, x[bad], raw.columns)
    if cfg.task == "regression":  # one output, float targets, no classes
        labels, names = _regression_targets(y, where), ()
    else:
        labels, names = _encode_labels(y, tuple(cfg.classes), where, raw.categorical)
    if len(x) < 4:
        raise DataError(f"{where}: need at least 4 rows for a train/test split, got {len(x)}")
    train, test = _split_indices(len(x), cfg.test_size, cfg.split_seed)
    x_tr, x_te, y_tr, y_te = x[train], x[test], labels[train], labels[test]
    if cfg.impute != "none":
        x_tr, x_te = _impute(x_tr, x_te, cfg.impute, where, raw.columns)
    if cfg.standardize:
        mean, std = x_tr.mean(0), x_tr.std(0)
        std = np.where(std > 0, std, 1.0)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    f32 = np.float32
    num_classes = len(names) if names else 1
    return Dataset(x_tr.astype(f32), y_tr, x_te.astype(f32), y_te, num_classes, where, names)


def _load_mapped(cfg: ml_collections.ConfigDict) -> Dataset:
    """A directory with X.npy, memory-mapped and never loaded whole, and y.npy (loaded:
    labels are small). The split keeps row numbers; the fill values and standardization
    come from one streaming pass and are applied as rows are read."""
    x_path, y_path = (os.path.join(cfg.path, name) for name in ("X.npy", "y.npy"))
    for path in (x_path, y_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file; a data directory holds X.npy and y.npy")
    try:
        file = MappedFile(x_path)
    except (ValueError, OSError) as e:
        raise DataError(f"{x_path}: cannot memory-map as .npy ({first_line(e)})") from e
    try:
        y = np.load(y_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{y_path}: cannot load as .npy ({first_line(e)})") from e
    _check_shape(file.array, y, x_path)
    if cfg.task == "regression":
        raise DataError(f"{cfg.path}: regression from a memory-mapped directory is not supported")
    labels, names = _encode_labels(y, tuple(cfg.classes), y_path, y.dtype.kind in "US")
    if len(y) < 4:
        raise DataError(f"{x_path}: need at least 4 rows for a train/test split, got {len(y)}")
    train, test = _split_indices(len(y), cfg.test_size, cfg.split_seed)
    prep = _mapped_prep(file, train, cfg, x_path)
    x_tr, x_te = MappedRows(file, train, prep), MappedRows(file, test, prep)
    return Dataset(x_tr, labels[train], x_te, labels[test], len(names), cfg.path, names)


def _mapped_prep(file: MappedFile, train: np.ndarray, cfg, where: str) -> Prep:
    """Checks every value and fits fill values and z-scoring on the training rows, in
    one streaming pass (the median: on a fixed sample of training rows, see mapped.py)."""
    mask = np.zeros(file.array.shape[0], bool)
    mask[train] = True
    fit = cfg.impute != "none" or cfg.standardize
    bad, moments = scan(file, mask, allow_nan=cfg.impute != "none", need_moments=fit)
    if bad is not None:
        raise _bad_cell_error(where, bad, file.array[bad], None)
    if not fit:
        return Prep()
    fill = None
    if cfg.impute != "none":
        sample = file.take(median_sample(train)) if cfg.impute == "median" else None
        fill = _checked_fill(cfg.impute, moments, sample, where, None)
        missing = len(train) - moments.n  # the filled values join the statistics
        moments.add(missing, fill, np.zeros_like(fill))
    if not cfg.standardize:
        return Prep(fill)
    std = moments.std()
    return Prep(fill, moments.mean, np.where(std > 0, std, 1.0))
