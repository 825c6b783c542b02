"""One epoch over a memory-mapped data set, in its own process so that its peak RSS can be
measured: python tests/mapped_worker.py DATA_DIR OUT_DIR BATCH_SIZE NUM_DEVICES.

Writes OUT_DIR/train_ids.npy (column 0 of every weight-1 row the batcher placed on the
devices, in order), OUT_DIR/test_ids.npy (column 0 of the test split, predicted chunk by
chunk) and OUT_DIR/memory.json (VmRSS before loading the data, VmHWM at the end, in kB).
"""

import json
import os
import sys

import jax
import numpy as np


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def main() -> int:
    data_dir, out_dir, batch_size, num_devices = sys.argv[1:5]
    jax.config.update("jax_num_cpu_devices", int(num_devices))
    from jaxdml.batcher import GlobalBatcher, initial_position
    from jaxdml.config import default_config
    from jaxdml.data import load_dataset
    from jaxdml.mesh import make_mesh

    mesh = make_mesh()
    jax.device_put(np.zeros(8, np.float32)).block_until_ready()  # JAX fully up first
    baseline = _status_kb("VmRSS")
    config = default_config()
    config.data.source, config.data.path = "file", data_dir
    ds = load_dataset(config.data)
    batcher = GlobalBatcher(ds.x_train, ds.y_train, int(batch_size), seed=7)
    position, seen = initial_position(), []
    while int(position["epoch"]) == 0:
        batch, position = batcher.next(position, mesh)
        x, y, w = (np.asarray(batch[k]) for k in ("x", "y", "w"))
        ids = x[w > 0, 0].astype(np.int64)
        if not np.array_equal(y[w > 0], ids % 2):
            raise AssertionError("a row's label does not belong to it")
        seen.append(ids)
    test_ids = ds.predict(lambda params, rows: rows[:, 0], None, "test").astype(np.int64)
    np.save(os.path.join(out_dir, "train_ids.npy"), np.concatenate(seen))
    np.save(os.path.join(out_dir, "test_ids.npy"), test_ids)
    memory = {"baseline_rss_kb": baseline, "peak_rss_kb": _status_kb("VmHWM")}
    with open(os.path.join(out_dir, "memory.json"), "w") as f:
        json.dump(memory, f)
    print(json.dumps(memory), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
