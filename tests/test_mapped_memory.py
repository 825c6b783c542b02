"""A memory-mapped data set larger than the process's memory budget streams through the
GlobalBatcher: one epoch in a subprocess sees every training row exactly once while its
peak RSS stays far below the file size."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

ROWS, FEATURES = 1_000_000, 100  # 400 MB of float32 on disk


def _write_rows(directory) -> int:
    """X.npy with every value of row i equal to i (so a row names itself), y = i % 2;
    written block by block so that this process never holds the file either."""
    directory.mkdir()
    with open(directory / "X.npy", "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (ROWS, FEATURES)}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, ROWS, 50_000):
            ids = np.arange(start, min(start + 50_000, ROWS), dtype=np.float32)
            f.write(np.repeat(ids[:, None], FEATURES, axis=1).tobytes())
    np.save(directory / "y.npy", (np.arange(ROWS) % 2).astype(np.int32))
    return (directory / "X.npy").stat().st_size


@pytest.mark.slow
def test_an_epoch_over_a_mapped_file_sees_each_row_once_with_bounded_memory(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    try:
        file_bytes = _write_rows(data)
        proc = subprocess.run(
            [sys.executable, "tests/mapped_worker.py", str(data), str(out), "8192", "3"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        memory = json.loads((out / "memory.json").read_text())
        train, test = np.load(out / "train_ids.npy"), np.load(out / "test_ids.npy")
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    assert len(train) == ROWS - int(np.ceil(0.2 * ROWS))
    assert len(np.unique(train)) == len(train)  # exactly once within the epoch
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(ROWS))
    peak, grown = memory["peak_rss_kb"] * 1024, (memory["peak_rss_kb"] - memory["baseline_rss_kb"])
    print(f"file {file_bytes >> 20} MB, peak RSS {peak >> 20} MB, growth {grown >> 10} MB")
    assert grown * 1024 < file_bytes / 4  # what the data costs: a fraction of the file
    assert peak < file_bytes  # JAX itself is ~200 MB of it
