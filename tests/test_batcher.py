"""GlobalBatcher: exactly-once per epoch for any device count, and device-count invariant."""

import itertools

import numpy as np
import pytest

from jaxdml.batcher import GlobalBatcher


def _epoch_samples(batcher: GlobalBatcher, num_shards: int, epoch: int) -> list[int]:
    pos = {"epoch": np.int32(epoch), "index": np.int32(0)}
    seen = []
    while int(pos["epoch"]) == epoch:
        idx, pos = batcher.indices(pos)
        padded, weights = batcher.shard_layout(idx, num_shards)
        assert len(padded) % num_shards == 0
        seen.extend(padded[weights > 0].tolist())
    return seen


@pytest.mark.parametrize(
    "n,batch_size,num_shards,seed",
    list(itertools.product([1, 7, 100, 1001], [1, 3, 32, 256], [1, 2, 3, 4, 8], [0, 5])),
)
def test_every_epoch_visits_each_sample_exactly_once(n, batch_size, num_shards, seed):
    x = np.zeros((n, 2), np.float32)
    batcher = GlobalBatcher(x, np.zeros(n, np.int32), batch_size, seed)
    for epoch in (0, 1, 2):
        seen = _epoch_samples(batcher, num_shards, epoch)
        assert sorted(seen) == list(range(n))


def test_batch_order_does_not_depend_on_device_count():
    x = np.zeros((50, 2), np.float32)
    batcher = GlobalBatcher(x, np.zeros(50, np.int32), 8, seed=3)
    orders = {d: _epoch_samples(batcher, d, 0) for d in (1, 3, 4, 8)}
    assert all(order == orders[1] for order in orders.values())


def test_epochs_use_different_orders_and_the_same_seed_repeats_them():
    x = np.zeros((64, 2), np.float32)
    a = GlobalBatcher(x, np.zeros(64, np.int32), 16, seed=1)
    b = GlobalBatcher(x, np.zeros(64, np.int32), 16, seed=1)
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    np.testing.assert_array_equal(a.permutation(4), b.permutation(4))


def test_full_batch_is_one_epoch_per_step():
    x = np.zeros((10, 2), np.float32)
    batcher = GlobalBatcher(x, np.zeros(10, np.int32), None, seed=0)
    idx, pos = batcher.indices({"epoch": 0, "index": 0})
    np.testing.assert_array_equal(idx, np.arange(10))
    assert (int(pos["epoch"]), int(pos["index"])) == (1, 0)
