"""The GlobalBatcher: batches from positions, placed on the devices.

A global batch is a list of global sample indices taken from a seeded
permutation of the training set, one permutation per epoch. It does not depend
on how many devices there are: D devices each take a contiguous slice of it,
padded with weight-0 rows when D does not divide the batch. The batcher's
position (epoch, index within the epoch) is a small pytree that lives in the
TrainState, so a resumed or shrunk run continues with exactly the samples that
were next.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initial_position() -> dict[str, np.ndarray]:
    """The batcher position at the start of training: epoch 0, index 0."""
    return {"epoch": np.int32(0), "index": np.int32(0)}


class GlobalBatcher:
    """Turns a position (epoch, index) into the next global batch, sharded over a mesh.

    Minibatch mode: batch = perm_epoch[index : index + batch_size], where perm_epoch
    is a permutation seeded by (seed, epoch). The last batch of an epoch is short
    and padded with weight-0 rows, so every sample is seen exactly once per epoch.
    Full-batch mode: every step is the whole training set and one epoch.

    `x` may be `MappedRows`: each device slice then reads its rows from the mapped
    file by global index, so minibatch training streams a data set larger than RAM.
    Full-batch mode places the whole training set on the devices, so it loads it.
    """

    # Not Grain: its IndexSampler shards records per process (shard_index/shard_count)
    # and shuffles within a shard, with drop_remainder dropping the uneven tail, so the
    # samples of a global step would depend on the process count; what we need from it
    # (a seeded permutation, random row reads) is a few lines here, and our position
    # pytree already checkpoints the iterator.

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
        return idx, self.after(position)

    def after(self, position: dict) -> dict[str, np.ndarray]:
        """The position after the batch at `position` (host ints; `advance` is the same
        rule on the device)."""
        epoch, index = int(position["epoch"]), int(position["index"])
        index += min(self.batch_size, self.n - index)
        if index >= self.n:
            epoch, index = epoch + 1, 0
        return {"epoch": np.int32(epoch), "index": np.int32(index)}

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

    def advance(self, position: dict) -> dict:
        """The position after the batch at `position`, as jnp arithmetic: the step computes
        the state's next data position on the device (the same rule as `indices`), so no
        position travels from the host at each step."""
        import jax.numpy as jnp

        index = position["index"] + jnp.minimum(self.batch_size, self.n - position["index"])
        wrap = index >= self.n
        return {
            "epoch": (position["epoch"] + wrap).astype(jnp.int32),
            "index": jnp.where(wrap, 0, index).astype(jnp.int32),
        }

    def next(self, position: dict, mesh: Mesh) -> tuple[dict[str, jax.Array], dict]:
        """The batch at `position`, placed on `mesh` sharded along 'data'.

        Returns:
          (batch with x, y, w; the position after it, on the host).
        """
        if self.full_batch:
            key = tuple(d.id for d in mesh.devices.flat)
            if key not in self._device_cache:
                idx, _ = self.indices(position)
                layout = self.shard_layout(idx, mesh.devices.size)
                self._device_cache = {key: self._place(*layout, mesh)}
            batch = dict(self._device_cache[key])
            after = self.after(position)
        else:
            idx, after = self.indices(position)
            batch = self._place(*self.shard_layout(idx, mesh.devices.size), mesh)
        return batch, after

    def next_many(
        self, position: dict, k: int, mesh: Mesh, slots: int
    ) -> tuple[dict[str, jax.Array], dict]:
        """The batches of `k` consecutive steps from `position`, for one fused call
        (`jaxdml.training.step_common.make_fused_step`): stacked on a leading axis of
        `slots` >= k (slots past k repeat the last batch, unread), each sharded along
        'data'. Full-batch mode: the one batch, not stacked.

        Returns:
          (batches; the position after the k-th, on the host).
        """
        if self.full_batch:
            batch, after = self.next(position, mesh)
            for _ in range(k - 1):
                after = self.after(after)
            return batch, after
        layouts, after = [], position
        for _ in range(k):
            idx, after = self.indices(after)
            layouts.append(self.shard_layout(idx, mesh.devices.size))
        layouts += layouts[-1:] * (slots - k)
        padded, weights = (np.stack(parts) for parts in zip(*layouts, strict=True))
        return self._place(padded, weights, mesh), after

    def _place(self, padded: np.ndarray, weights: np.ndarray, mesh: Mesh) -> dict[str, jax.Array]:
        """The global batch of `shard_layout`'s (indices, weights) as arrays sharded along
        'data' (their last axis; a leading axis stacks the batches of a fused call).

        Each process builds only the rows of its own devices' slices (every process
        holds the whole data set, so it can read any global sample index); the global
        array is assembled from the processes' pieces without moving data between them.
        """
        stacked = padded.ndim - 1  # 0, or 1 when batches are stacked
        sharding = NamedSharding(mesh, P(*[None] * stacked, "data"))
        # x, y: the rows; w: their weights; i: their global sample indices (dropout masks
        # are drawn per sample index, so they do not depend on the device count).
        per_row = {"w": weights, "i": padded.astype(np.int32)}
        rows = {"x": self.x, "y": self.y}

        def place(name: str) -> jax.Array:
            source = rows.get(name)
            shape = (*padded.shape, *(() if source is None else source.shape[1:]))

            def slice_rows(index: tuple[slice, ...]) -> np.ndarray:
                where = index[: padded.ndim]
                if source is None:
                    return per_row[name][where]
                picked = padded[where]  # (a mapped file takes flat indices)
                return source[picked.reshape(-1)].reshape(*picked.shape, *source.shape[1:])

            return jax.make_array_from_callback(shape, sharding, slice_rows)

        return {name: place(name) for name in ("x", "y", "w", "i")}
