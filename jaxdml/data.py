"""Data sets and the GlobalBatcher.

A global batch is a list of global sample indices taken from a seeded
permutation of the training set, one permutation per epoch. It does not depend
on how many devices there are: D devices each take a contiguous slice of it,
padded with weight-0 rows when D does not divide the batch. The batcher's
position (epoch, index within the epoch) is a small pytree that lives in the
TrainState, so a resumed or shrunk run continues with exactly the samples that
were next.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdml.config import ConfigError


class DataError(ConfigError):
    """The data named by the config is missing or invalid. Exit status 2."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in host memory (float32 features, int32 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


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


def _file_arrays(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    path = cfg.path
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (config.data.path)")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; need X and y")
            return f["X"], f["y"]
    if path.endswith(".csv"):
        try:
            table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{path}: cannot parse as CSV with a header row ({e})") from e
        names = table.dtype.names or ()
        if cfg.label_column not in names:
            raise DataError(
                f"{path}: no label column {cfg.label_column!r} (config.data.label_column); "
                f"columns are {list(names)}"
            )
        table = np.atleast_1d(table)
        x = np.stack([table[n] for n in names if n != cfg.label_column], axis=1)
        return x, table[cfg.label_column]
    raise DataError(f"{path}: unsupported file type; use .npz (X, y) or .csv")


def _check_arrays(x: np.ndarray, y: np.ndarray, declared: tuple, where: str) -> np.ndarray:
    """Validates X/y; returns labels as int32 0..K-1."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{where}: X must be a non-empty 2-D array, got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: y has shape {y.shape} but X has {x.shape[0]} rows")
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{where}: X has NaN/Inf values (first at row {bad[0]}, column {bad[1]})")
    if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)):
        raise DataError(f"{where}: labels must be integers")
    labels = y.astype(np.int64)
    classes = np.asarray(declared, dtype=np.int64) if declared else np.unique(labels)
    unknown = np.setdiff1d(np.unique(labels), classes)
    if unknown.size:
        raise DataError(
            f"{where}: labels {unknown[:5].tolist()} are not in the declared classes "
            f"{classes.tolist()} (config.data.classes)"
        )
    if classes.size < 2:
        raise DataError(f"{where}: need at least 2 classes, found {classes.tolist()}")
    return np.searchsorted(classes, labels).astype(np.int32)


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int) -> tuple:
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        perm = np.random.default_rng(seed).permutation(len(x))
        n_test = int(np.ceil(test_size * len(x)))
        return x[perm[n_test:]], x[perm[:n_test]], y[perm[n_test:]], y[perm[:n_test]]
    return train_test_split(x, y, test_size=test_size, random_state=seed)


def load_dataset(cfg: ml_collections.ConfigDict) -> Dataset:
    """Loads and validates the data set named by `config.data`, split into train/test.

    Raises:
      DataError: naming the file (or source) and the problem.
    """
    if cfg.source == "synthetic":
        x, y = make_classification(
            cfg.n_samples, cfg.n_features, cfg.n_informative, cfg.n_classes, cfg.random_state
        )
        where = "synthetic data"
    elif cfg.source == "sklearn":
        x, y = _sklearn_arrays(cfg)
        where = f"sklearn {cfg.name}"
    else:
        x, y = _file_arrays(cfg)
        where = cfg.path
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}: X must be numeric, got dtype {x.dtype}")
    labels = _check_arrays(x.astype(np.float64), np.asarray(y), tuple(cfg.classes), where)
    num_classes = len(cfg.classes) if cfg.classes else int(labels.max()) + 1
    if len(x) < 4:
        raise DataError(f"{where}: need at least 4 rows for a train/test split, got {len(x)}")
    x_tr, x_te, y_tr, y_te = _split(x, labels, cfg.test_size, cfg.split_seed)
    if cfg.standardize:
        mean, std = x_tr.mean(0), x_tr.std(0)
        std = np.where(std > 0, std, 1.0)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    f32 = np.float32
    return Dataset(
        x_tr.astype(f32),
        y_tr.astype(np.int32),
        x_te.astype(f32),
        y_te.astype(np.int32),
        num_classes,
        where,
    )


def initial_position() -> dict[str, np.ndarray]:
    """The batcher position at the start of training: epoch 0, index 0."""
    return {"epoch": np.int32(0), "index": np.int32(0)}


class GlobalBatcher:
    """Turns a position (epoch, index) into the next global batch, sharded over a mesh.

    Minibatch mode: batch = perm_epoch[index : index + batch_size], where perm_epoch
    is a permutation seeded by (seed, epoch). The last batch of an epoch is short
    and padded with weight-0 rows, so every sample is seen exactly once per epoch.
    Full-batch mode: every step is the whole training set and one epoch.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int | None, seed: int):
        """Args: x, y: training arrays; batch_size: None for full batch; seed: order seed."""
        self.x, self.y = x, y
        self.n = int(x.shape[0])
        self.batch_size = self.n if batch_size is None else min(int(batch_size), self.n)
        self.full_batch = batch_size is None
        self.seed = int(seed)
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._device_cache: dict[Any, dict[str, jax.Array]] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch` (identity in full-batch mode)."""
        if self.full_batch:
            return np.arange(self.n)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(self.n))
        return self._perm_cache[1]

    def indices(self, position: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Global sample indices of the batch at `position`, and the position after it."""
        epoch, index = int(position["epoch"]), int(position["index"])
        idx = self.permutation(epoch)[index : index + self.batch_size]
        index += len(idx)
        if index >= self.n:
            epoch, index = epoch + 1, 0
        return idx, {"epoch": np.int32(epoch), "index": np.int32(index)}

    def shard_layout(self, idx: np.ndarray, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
        """Splits batch indices into `num_shards` equal contiguous slices, padding the tail.

        Returns:
          (indices [num_shards * s], weights [num_shards * s]); padded rows repeat
          index 0 with weight 0.
        """
        per = -(-self.batch_size // num_shards)
        total = per * num_shards
        padded = np.zeros(total, dtype=np.int64)
        weights = np.zeros(total, dtype=np.float32)
        padded[: len(idx)] = idx
        weights[: len(idx)] = 1.0
        return padded, weights

    def next(self, position: dict, mesh: Mesh) -> tuple[dict[str, jax.Array], dict]:
        """The batch at `position`, placed on `mesh` sharded along 'data'.

        Returns:
          (batch with x, y, w and the position after it, the position after it).
        """
        if self.full_batch:
            key = tuple(d.id for d in mesh.devices.flat)
            if key not in self._device_cache:
                idx, _ = self.indices(position)
                self._device_cache = {key: self._place(idx, mesh)}
            batch = dict(self._device_cache[key])
            _, after = self.indices(position)
        else:
            idx, after = self.indices(position)
            batch = self._place(idx, mesh)
        batch["pos"] = after
        return batch, after

    def _place(self, idx: np.ndarray, mesh: Mesh) -> dict[str, jax.Array]:
        """The global batch as arrays sharded along 'data'.

        Each process builds only the rows of its own devices' slices (every process
        holds the whole data set, so it can read any global sample index); the global
        array is assembled from the processes' pieces without moving data between them.
        """
        padded, weights = self.shard_layout(idx, mesh.devices.size)
        sharding = NamedSharding(mesh, P("data"))
        rows = {"x": self.x, "y": self.y}

        def place(name: str) -> jax.Array:
            source = rows.get(name)
            shape = (len(padded), *(() if source is None else source.shape[1:]))

            def slice_rows(index: tuple[slice, ...]) -> np.ndarray:
                return weights[index[0]] if source is None else source[padded[index[0]]]

            return jax.make_array_from_callback(shape, sharding, slice_rows)

        return {name: place(name) for name in ("x", "y", "w")}
