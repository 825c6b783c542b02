"""Bad config values and bad data: one clear error naming the field or file; exit 2 on the CLI."""

import numpy as np
import pytest

from jaxdml.config import ConfigError, default_config, validate
from jaxdml.data import DataError, load_dataset
from tests.conftest import run_cli

BAD_VALUES = [
    ("train.num_steps", 0),
    ("train.learning_rate", 0.0),
    ("train.batch_size", -3),
    ("train.mode", "fullbatch"),
    ("train.optimizer", "newton"),
    ("train.dispatch_depth", 0),
    ("train.compiler_options", "xla_cpu_use_fusion_emitters"),
    ("train.compiler_options", "=true"),
    ("model.name", "forest"),
    ("model.l2", -1.0),
    ("data.source", "web"),
    ("data.test_size", 1.5),
    ("data.impute", "average"),
    ("data.classes", (0, 0)),
    ("data.classes", ("cat", 1)),
    ("data.label_column", ""),
    ("checkpoint.resume", "maybe"),
    ("checkpoint.max_to_keep", 0),
    ("supervisor.min_devices", 0),
    ("num_cpu_devices", -1),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_each_bad_config_value_names_its_field(field, value):
    config = default_config()
    section, _, name = field.rpartition(".")
    node = config[section] if section else config
    node[name] = value
    with pytest.raises(ConfigError, match=rf"config\.{field}\b"):
        validate(config)


def _shipped_variants() -> list[str]:
    """Every shipped config and each variant its get_config names (`if arg == "x"`)."""
    import pathlib
    import re

    folder = pathlib.Path(__file__).parent.parent / "jaxdml" / "configs"
    names = []
    for path in sorted(folder.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        names.append(path.stem)
        names += [f"{path.stem}:{v}" for v in re.findall(r'arg == "(\w+)"', path.read_text())]
    return names


@pytest.mark.parametrize("name", _shipped_variants())
def test_default_and_shipped_configs_are_valid(name):
    """(wide_mlp:smoke once asked for more warmup steps than it had steps.)"""
    import jaxdml

    validate(default_config())
    validate(jaxdml.load_config(name))


def _file_config(path, **fields):
    config = default_config()
    config.data.source = "file"
    config.data.path = str(path)
    for k, v in fields.items():
        config.data[k] = v
    return config.data


def test_npz_with_nan_names_file_row_and_column(tmp_path):
    x = np.ones((20, 3))
    x[7, 2] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, X=x, y=np.arange(20) % 2)
    message = r"bad\.npz: X has NaN/Inf values \(first at row 7, column 2\)"
    with pytest.raises(DataError, match=message):
        load_dataset(_file_config(path))


def test_labels_outside_declared_classes(tmp_path):
    path = tmp_path / "labels.npz"
    np.savez(path, X=np.ones((20, 3)), y=np.arange(20) % 3)
    with pytest.raises(DataError, match=r"labels\.npz: labels \[2\] are not in the declared"):
        load_dataset(_file_config(path, classes=(0, 1)))


def test_shape_mismatch_and_empty_set(tmp_path):
    path = tmp_path / "shape.npz"
    np.savez(path, X=np.ones((20, 3)), y=np.zeros(19))
    with pytest.raises(DataError, match=r"shape\.npz: y has shape \(19,\) but X has 20 rows"):
        load_dataset(_file_config(path))
    empty = tmp_path / "empty.npz"
    np.savez(empty, X=np.ones((0, 3)), y=np.zeros(0))
    with pytest.raises(DataError, match=r"empty\.npz: X must be a non-empty 2-D array"):
        load_dataset(_file_config(empty))


def test_csv_loads_and_a_missing_label_column_is_named(tmp_path):
    path = tmp_path / "d.csv"
    rows = "\n".join(f"{i},{i % 5},{i % 2}" for i in range(40))
    path.write_text("a,b,label\n" + rows + "\n")
    ds = load_dataset(_file_config(path))
    assert ds.num_features == 2 and ds.num_classes == 2
    assert len(ds.y_train) + len(ds.y_test) == 40
    with pytest.raises(DataError, match=r"d\.csv: no label column 'target'"):
        load_dataset(_file_config(path, label_column="target"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.num_steps=-1", "config.train.num_steps"),
        ("--config.train.num_steps=abc", "--config.train.num_steps"),
        ("--config.train.no_such_field=1", "no_such_field"),
        ("--config.data.path=/no/such.npz", "/no/such.npz"),
    ],
)
def test_cli_exits_2_with_one_line_naming_the_problem(tmp_path, override, message):
    args = ["experiments.train", "--config=configs/seed_logreg.py:smoke", f"--workdir={tmp_path}"]
    if "data.path" in override:
        args.append("--config.data.source=file")
    proc = run_cli(*args, override, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
