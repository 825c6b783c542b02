"""Memory-mapped features: a data set larger than RAM, read row by row from a .npy file.

`MappedRows` is a lazy view of some rows of a 2-D .npy array (the train or the test
split, kept as an index array): reading rows copies them out of the file and applies
the preprocessing fitted on the training split (`Prep`). The GlobalBatcher reads each
device slice by global sample index, evaluation reads `chunks()`, and the statistics
for `standardize` / `impute` come from one streaming pass (`scan`).

The file is opened with np.load(mmap_mode='r'), which parses the header and gives
shape, dtype and data offset without reading anything; rows are then read with
positioned reads (os.preadv), not through the mapping. Pages touched through a mapping
stay in the process's resident set until the kernel wants them back, in units the
kernel picks: on Linux 6.18 one random 400-byte row mapped about 360 KB (whole large
folios), so an epoch of random rows made the whole file resident. Positioned reads
copy only the rows asked for; the page cache still keeps the file warm.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 8 << 20  # size of one chunk of a streaming pass or of chunked evaluation
MEDIAN_SAMPLE_ROWS = 65_536  # training rows the median of mapped data is computed from


class MappedFile:
    """A C-ordered .npy array on disk whose rows are read on demand, by row number."""

    def __init__(self, path: str):
        """Raises ValueError/OSError when `path` is not a C-ordered .npy file."""
        self.array = np.load(path, mmap_mode="r")  # header parsed; nothing read yet
        if self.array.ndim > 1 and not self.array.flags.c_contiguous:
            raise ValueError("X is stored in Fortran order; save np.ascontiguousarray(X)")
        self._file = open(path, "rb")  # noqa: SIM115 (open for the object's lifetime)
        self._row_bytes = self.array.itemsize * int(np.prod(self.array.shape[1:]))
        self.path = path

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A copy of `rows` (row numbers, any order, repeats allowed), read in file order
        with one positioned read per run of consecutive rows."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        if len(rows) and (ordered[0] < 0 or ordered[-1] >= self.array.shape[0]):
            raise IndexError(f"row out of range 0..{self.array.shape[0] - 1}")
        out = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
        in_order = bool(np.all(order == np.arange(len(rows))))
        buf = out if in_order else np.empty_like(out)
        self._read_runs(ordered, memoryview(buf).cast("B"))
        if not in_order:
            out[order] = buf
        return out

    def _read_runs(self, ordered: np.ndarray, view: memoryview) -> None:
        """Fills `view` with the sorted rows `ordered`, one read per consecutive run."""
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)
        ends = np.append(starts[1:], len(ordered))
        size, base, fd = self._row_bytes, self.array.offset, self._file.fileno()
        runs = zip(starts.tolist(), ends.tolist(), ordered[starts].tolist(), strict=True)
        for s, e, row in runs:
            part = view[s * size : e * size]
            if os.preadv(fd, [part], base + row * size) != len(part):
                raise OSError(f"{self.path}: file shorter than its .npy header says")


@dataclasses.dataclass(frozen=True)
class Prep:
    """Preprocessing fitted on the training split: NaN fill values, then z-scoring."""

    fill: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """The rows as the model sees them: float32, filled and standardized."""
        if self.fill is None and self.mean is None:
            return rows.astype(np.float32, copy=False)
        x = rows.astype(np.float64)
        if self.fill is not None:
            x = np.where(np.isnan(x), self.fill, x)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.astype(np.float32)


class MappedRows:
    """Rows `index` of a MappedFile as a lazy, read-only float32 array [len(index), F].

    Supports what jaxdml does with training features: shape, dtype, len,
    `rows[int_array]` and `rows[start:stop]` (rows in that order), `rows[:, j]` (one
    column, read in chunks), `chunks()`, and `np.asarray(rows)`, which loads them all
    (full-batch training does that; GBDT keeps its binned copy, 1 byte a value).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, file: MappedFile, index: np.ndarray, prep: Prep | None = None):
        self.file, self.index, self.prep = file, np.asarray(index, np.int64), prep or Prep()
        self.shape = (len(self.index), int(file.array.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        """Rows by position (int, int array or slice); a (rows, columns) tuple selects columns."""
        if isinstance(key, tuple):
            rows, *cols = key
            if isinstance(rows, slice) and rows == slice(None):  # a column: stream it
                return np.concatenate([c[(slice(None), *cols)] for c in self.chunks()])
            return self[rows][(slice(None), *cols)]
        if np.ndim(self.index[key]) == 0:
            return self[np.array([key])][0]
        return self.prep(self.file.take(self.index[key]))

    def chunks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive blocks of rows (about CHUNK_BYTES each), for evaluation and passes."""
        step = rows or max(1, CHUNK_BYTES // (4 * max(1, self.shape[1])))
        for start in range(0, len(self), step):
            yield self[start : start + step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All the rows in memory (full-batch mode; GBDT binning)."""
        out = np.empty(self.shape, np.float32)
        start = 0
        for block in self.chunks():
            out[start : start + len(block)] = block
            start += len(block)
        return out if dtype is None else out.astype(dtype)


class Moments:
    """Per-column count, mean and sum of squared deviations of the non-NaN values,
    merged block by block (Chan et al.), so one streaming pass gives mean and std."""

    def __init__(self, num_columns: int):
        self.n = np.zeros(num_columns)
        self.mean = np.zeros(num_columns)
        self.m2 = np.zeros(num_columns)

    def add(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Merges the moments of another set of values into these."""
        total = self.n + n
        weight = np.divide(n, total, out=np.zeros_like(total), where=total > 0)
        delta = mean - self.mean
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + m2 + delta**2 * self.n * weight
        self.n = total

    def update(self, block: np.ndarray) -> None:
        """Adds the non-NaN values of `block` [rows, columns]."""
        x = block.astype(np.float64)
        seen = ~np.isnan(x)
        n = seen.sum(0).astype(np.float64)
        mean = np.divide(np.where(seen, x, 0).sum(0), n, out=np.zeros_like(n), where=n > 0)
        self.add(n, mean, (np.where(seen, x - mean, 0) ** 2).sum(0))

    def std(self) -> np.ndarray:
        """Population standard deviation (numpy's default ddof=0)."""
        return np.sqrt(np.divide(self.m2, self.n, out=np.zeros_like(self.m2), where=self.n > 0))


def first_bad_cell(block: np.ndarray, allow_nan: bool) -> tuple[int, int] | None:
    """(row, column) of the first non-finite value (NaN allowed when `allow_nan`), or None."""
    if block.dtype.kind != "f":
        return None
    bad = ~np.isfinite(block)
    if allow_nan:
        bad &= ~np.isnan(block)
    if not bad.any():
        return None
    row, col = np.argwhere(bad)[0]
    return int(row), int(col)


def scan(
    file: MappedFile, train: np.ndarray, allow_nan: bool, need_moments: bool
) -> tuple[tuple[int, int] | None, Moments | None]:
    """One pass over the file in order: the first bad cell (file row, column), and the
    moments of the training rows (`train`: a boolean mask over file rows)."""
    x = file.array
    moments = Moments(x.shape[1]) if need_moments else None
    step = max(1, CHUNK_BYTES // max(1, x.itemsize * x.shape[1]))
    for start in range(0, x.shape[0], step):
        block = file.take(np.arange(start, min(start + step, x.shape[0])))
        bad = first_bad_cell(block, allow_nan)
        if bad is not None:
            return (start + bad[0], bad[1]), moments
        if moments is not None:
            moments.update(block[train[start : start + step]])
    return None, moments


def fill_values(method: str, moments: Moments, rows: np.ndarray | None = None) -> np.ndarray:
    """Per-column NaN fill: 'zero', 'mean' (from `moments`) or 'median' (of `rows`).
    A column with no value to take a statistic from gets NaN (the caller reports it)."""
    if method == "mean":
        return np.where(moments.n > 0, moments.mean, np.nan)
    if method == "median":
        with warnings.catch_warnings():  # an all-NaN column: NaN, reported by the caller
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(rows.astype(np.float64), axis=0)
    return np.zeros(len(moments.n))


def median_sample(train_rows: np.ndarray) -> np.ndarray:
    """At most MEDIAN_SAMPLE_ROWS training rows at evenly spaced positions in file order
    (all of them when there are fewer): the rows the median of mapped data comes from."""
    rows = np.sort(train_rows)
    if len(rows) <= MEDIAN_SAMPLE_ROWS:
        return rows
    return rows[np.linspace(0, len(rows) - 1, MEDIAN_SAMPLE_ROWS).astype(np.int64)]
