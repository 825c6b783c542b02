"""Bring your own data: CSV/Parquet with named columns and string labels, imputation from
the training split only, memory-mapped .npy directories, and Dataset.identity()."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from jaxdml import mapped
from jaxdml.config import default_config
from jaxdml.data import DataError, _split_indices, load_dataset
from jaxdml.mapped import MappedRows
from jaxdml.training.trainer import Trainer
from tests.conftest import REPO


def _data_config(path, **fields):
    config = default_config()
    config.data.source = "file"
    config.data.path = str(path)
    for k, v in fields.items():
        config.data[k] = v
    return config


def _load(path, **fields):
    return load_dataset(_data_config(path, **fields).data)


def _ids(ds, split="train"):
    """Column 0 holds each row's number in the file (tests write it so)."""
    x = ds.x_train if split == "train" else ds.x_test
    return np.asarray(x)[:, 0].round().astype(int)


def test_csv_header_names_are_kept_and_string_labels_map_to_sorted_classes(tmp_path):
    species = ["virginica", "setosa", "versicolor"]
    rows = [f"{i},{i % 7}.5,{species[i % 3]}" for i in range(30)]
    path = tmp_path / "iris.csv"
    path.write_text("row id, petal width ,Species\n" + "\n".join(rows) + "\n")
    ds = _load(path, label_column="Species")
    assert ds.class_names == ("setosa", "versicolor", "virginica")
    assert ds.num_classes == 3 and ds.num_features == 2
    for split, y in (("train", ds.y_train), ("test", ds.y_test)):
        mapped_back = [ds.class_names[k] for k in y]
        assert mapped_back == [species[i % 3] for i in _ids(ds, split)]
    with pytest.raises(DataError, match=r"columns are \['row id', ' petal width ', 'Species'\]"):
        _load(path, label_column="species")


def test_parquet_categorical_labels_bool_and_nullable_int_features(tmp_path):
    n = 40
    frame = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.float64),
            "flag": np.arange(n) % 2 == 0,
            "count": pd.array(np.arange(n) % 5, dtype="Int64"),
            "label": pd.Categorical(np.where(np.arange(n) % 4 == 0, "rare", "common")),
        }
    )
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    ds = _load(path)
    assert ds.class_names == ("common", "rare")
    ids = _ids(ds)
    x = np.asarray(ds.x_train)
    np.testing.assert_array_equal(x[:, 1], (ids % 2 == 0).astype(np.float32))
    np.testing.assert_array_equal(x[:, 2], ids % 5)
    np.testing.assert_array_equal(ds.y_train, (ids % 4 == 0).astype(np.int32))


def test_numeric_labels_keep_declared_classes_and_string_classes_set_the_order(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("a,label\n" + "\n".join(f"{i},{[3, 7][i % 2]}" for i in range(20)) + "\n")
    ds = _load(path)
    assert ds.class_names == (3, 7) and all(type(c) is int for c in ds.class_names)
    ds = _load(path, classes=(7, 3, 9))
    assert ds.class_names == (7, 3, 9) and ds.num_classes == 3
    np.testing.assert_array_equal(ds.y_train, np.where(_ids(ds) % 2 == 1, 0, 1))
    words = tmp_path / "w.csv"
    words.write_text("a,label\n" + "\n".join(f"{i},{['lo', 'hi'][i % 2]}" for i in range(20)))
    ds = _load(words, classes=("hi", "lo"))
    np.testing.assert_array_equal(ds.y_train, np.where(_ids(ds) % 2 == 1, 0, 1))


@pytest.mark.parametrize(
    "content,message",
    [
        ("", r"e\.csv: empty file"),
        ("a,b,label\n", r"e\.csv: no data rows \(header only\)"),
        ("a,b,label\n1,2,0\n3,4\n5,6,1\n", r"e\.csv: line 3 has 2 fields but the header has 3"),
        ("a,b,label\n1,2,0\n3,4,1,9\n5,6,1\n", r"e\.csv: line 3 has 4 fields but the header has 3"),
        ("a,name,label\n1,bob,0\n2,al,1\n", r"e\.csv: column 'name' is not numeric .*'bob'"),
        ("a,b,label\n1,2,0\n3,4,\n5,6,1\n", r"e\.csv: label column 'label' has missing values"),
    ],
    ids=["empty", "header-only", "short-row", "long-row", "string-feature", "missing-label"],
)
def test_bad_table_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "e.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        _load(path, impute="mean")
    assert "\n" not in str(error.value)


def test_missing_feature_value_names_file_column_and_row(tmp_path):
    path = tmp_path / "m.csv"
    rows = [f"{i},{'' if i == 6 else i % 3},{i % 2}" for i in range(12)]
    path.write_text("a,my col,label\n" + "\n".join(rows) + "\n")
    message = r"m\.csv: X has NaN/Inf values \(first at row 6, column 'my col'\).*impute"
    with pytest.raises(DataError, match=message):
        _load(path)


def test_csv_without_pandas_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("a,label\n1,0\n2,1\n")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(DataError, match=r"d\.csv: .*needs pandas .*jaxdml\[datasets\]"):
        _load(path)


@pytest.mark.parametrize("method", ["mean", "median", "zero"])
def test_impute_fills_both_splits_from_training_rows_only(tmp_path, method):
    n = 200
    x = np.stack([np.arange(n), np.arange(n) % 9 * 1.0], axis=1)
    train, test = _split_indices(n, 0.2, 42)
    x[test, 1] = 1000.0  # a test-only outlier would move any statistic that saw it
    missing = np.concatenate([train[:5], test[:5]])
    x[missing, 1] = np.nan
    path = tmp_path / "m.npz"
    np.savez(path, X=x, y=np.arange(n) % 2)
    ds = _load(path, impute=method)
    seen = x[np.setdiff1d(train, missing), 1]
    expected = {"mean": seen.mean(), "median": np.median(seen), "zero": 0.0}[method]
    filled = {int(i): v for i, v in zip(_ids(ds), np.asarray(ds.x_train)[:, 1], strict=True)}
    filled.update(zip(_ids(ds, "test"), np.asarray(ds.x_test)[:, 1], strict=True))
    for row in missing:
        assert filled[int(row)] == pytest.approx(expected, rel=1e-6)


def _write_mapped(directory, x, y):
    directory.mkdir()
    np.save(directory / "X.npy", x)
    np.save(directory / "y.npy", y)
    return directory


@pytest.mark.parametrize("impute", ["none", "mean", "median", "zero"])
def test_memory_mapped_directory_gives_the_in_memory_data(tmp_path, impute, monkeypatch):
    monkeypatch.setattr(mapped, "CHUNK_BYTES", 999)  # many chunks: the streaming paths
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    if impute != "none":
        x[rng.random(x.shape) < 0.05] = np.nan
    y = np.array(["cat", "dog", "emu"])[rng.integers(0, 3, 300)]
    np.savez(tmp_path / "d.npz", X=x, y=y)
    directory = _write_mapped(tmp_path / "d", x, y)
    for standardize in (False, True):
        ours = _load(directory, impute=impute, standardize=standardize)
        theirs = _load(tmp_path / "d.npz", impute=impute, standardize=standardize)
        assert isinstance(ours.x_train, MappedRows) and ours.x_train.shape == theirs.x_train.shape
        assert ours.class_names == theirs.class_names == ("cat", "dog", "emu")
        np.testing.assert_array_equal(ours.y_train, theirs.y_train)
        np.testing.assert_array_equal(ours.y_test, theirs.y_test)
        for a, b in ((ours.x_train, theirs.x_train), (ours.x_test, theirs.x_test)):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.concatenate(list(a.chunks())), b, rtol=1e-5, atol=1e-5)
        rows = np.array([5, 0, 5, 17])
        np.testing.assert_allclose(ours.x_train[rows], theirs.x_train[rows], rtol=1e-5, atol=1e-5)


def test_memory_mapped_nan_names_the_file_row_and_column(tmp_path):
    x = np.ones((50, 4), np.float32)
    x[33, 2] = np.nan
    directory = _write_mapped(tmp_path / "d", x, np.arange(50) % 2)
    message = r"X\.npy: X has NaN/Inf values \(first at row 33, column 2\)"
    with pytest.raises(DataError, match=message):
        _load(directory)
    (directory / "y.npy").unlink()
    with pytest.raises(DataError, match=r"y\.npy: no such file; a data directory holds X\.npy"):
        _load(directory)


def test_predict_reads_mapped_splits_in_chunks_and_matches_one_call(tmp_path, monkeypatch):
    x = np.arange(600, dtype=np.float32).reshape(200, 3)
    directory = _write_mapped(tmp_path / "d", x, np.arange(200) % 2)
    calls = []

    def predict(params, rows):
        calls.append(len(rows))
        return (rows[:, 0] * params).astype(np.int64)

    monkeypatch.setattr(mapped, "CHUNK_BYTES", 12 * 16)  # 16 rows a chunk
    ds = _load(directory)
    ours = ds.predict(predict, 3, "test")
    assert calls == [16, 16, 8]
    np.testing.assert_array_equal(ours, predict(3, np.asarray(ds.x_test)))


def test_trainer_on_mapped_data_matches_the_same_data_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    results = []
    for path in (_write_mapped(tmp_path / "d", x, y), tmp_path / "d.npz"):
        config = _data_config(path)
        config.train.mode, config.train.batch_size, config.train.num_steps = "minibatch", 64, 12
        trainer = Trainer(config, str(tmp_path / f"run-{path.name}"), devices=jax.devices()[:3])
        results.append(trainer.fit())
    assert results[0]["params_sha256"] == results[1]["params_sha256"]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"] > 0.7


def test_identity_is_stable_and_one_changed_value_changes_it(tmp_path):
    x = np.random.default_rng(2).normal(size=(100, 4)).astype(np.float32)
    np.savez(tmp_path / "a.npz", X=x, y=np.arange(100) % 3)
    first = _load(tmp_path / "a.npz").identity()
    assert json.loads(json.dumps(first)) == first and first["hashed_rows"] == "all"
    assert first == _load(tmp_path / "a.npz").identity()
    assert first == _load(_write_mapped(tmp_path / "d", x, np.arange(100) % 3)).identity()
    train, _ = _split_indices(100, 0.2, 42)
    changed = x.copy()
    changed[train[50], 3] += 1e-3
    np.savez(tmp_path / "b.npz", X=changed, y=np.arange(100) % 3)
    second = _load(tmp_path / "b.npz").identity()
    assert second["sha256"] != first["sha256"]
    assert {k: v for k, v in second.items() if k != "sha256"} == {
        k: v for k, v in first.items() if k != "sha256"
    }


def test_identity_of_a_large_set_hashes_a_fixed_sample_including_first_and_last(
    tmp_path, monkeypatch
):
    monkeypatch.setattr("jaxdml.data.IDENTITY_FULL_BYTES", 1000)
    monkeypatch.setattr("jaxdml.data.IDENTITY_SAMPLE_ROWS", 8)
    x = np.arange(1200, dtype=np.float32).reshape(400, 3)
    directory = _write_mapped(tmp_path / "d", x, np.arange(400) % 2)
    ds = _load(directory)
    first = ds.identity()
    assert first["hashed_rows"] == 10 and first == _load(directory).identity()
    n = len(ds.y_train)
    for position in (0, n - 1, int(np.linspace(0, n - 1, 10)[4])):
        row = int(ds.x_train.index[position])
        changed = x.copy()
        changed[row, 1] += 1
        np.save(directory / "X.npy", changed)
        assert _load(directory).identity()["sha256"] != first["sha256"]


def test_split_is_scikit_learns_train_test_split():
    from sklearn.model_selection import train_test_split

    for n, test_size, seed in [(10, 0.2, 42), (1001, 0.25, 0), (37, 0.5, 7), (5, 0.3, 1)]:
        train, test = train_test_split(np.arange(n), test_size=test_size, random_state=seed)
        ours = _split_indices(n, test_size, seed)
        np.testing.assert_array_equal(ours[0], train)
        np.testing.assert_array_equal(ours[1], test)


_PROBE = """
import json, sys
from jaxdml.config import default_config
from jaxdml.data import _sklearn_arrays
c = default_config().data
c.source, c.name, c.n_samples, c.n_features = "sklearn", "make_classification", 300, 6
c.n_informative, c.random_state = 3, 7
x, y = _sklearn_arrays(c)
print(json.dumps(["sklearn" in sys.modules, float(x.sum()), int(y.sum())]))
"""


def test_sklearn_data_is_cached_between_processes(tmp_path):
    """scikit-learn's arrays are kept in the cache folder: a second process reads them
    without importing scikit-learn (~1.8 s of every start); a torn file is made again."""
    from sklearn import datasets

    ref_x, ref_y = datasets.make_classification(
        n_samples=300, n_features=6, n_informative=3, n_classes=2, random_state=7
    )
    env = {**os.environ, "JAXDML_CACHE_DIR": str(tmp_path)}

    def probe():
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    expected = [pytest.approx(float(ref_x.sum())), int(ref_y.sum())]
    assert probe() == [True, *expected]  # made (scikit-learn imported) and kept
    (cached,) = tmp_path.glob("sklearn-make_classification-*.npz")
    with np.load(cached) as f:
        np.testing.assert_array_equal(f["x"], ref_x)
        np.testing.assert_array_equal(f["y"], ref_y)
    assert probe() == [False, *expected]  # read back: no scikit-learn import
    cached.write_bytes(cached.read_bytes()[:100])  # torn
    assert probe() == [True, *expected]  # made again, not trusted
    with np.load(cached) as f:
        np.testing.assert_array_equal(f["x"], ref_x)
