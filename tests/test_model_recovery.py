"""GBDT and the Flax MLP resume and recover like the linear models."""

import json

import jax
import numpy as np

from configs import gbdt
from jaxdml.training.state import flat_params
from jaxdml.training.trainer import Trainer
from tests.conftest import run_cli


def _train(config_arg, workdir, *overrides):
    return run_cli(
        "experiments.train", f"--config={config_arg}", f"--workdir={workdir}", *overrides,
        timeout=300,
    )  # fmt: skip


def _sha(workdir) -> str:
    return json.loads((workdir / "result.json").read_text())["params_sha256"]


def test_gbdt_killed_and_resumed_grows_identical_trees(tmp_path):
    args = ("--config.model.num_trees=12", "--config.checkpoint.every_steps=4")
    assert _train("configs/gbdt.py", tmp_path / "ref", *args).returncode == 0
    proc = _train("configs/gbdt.py", tmp_path / "run", *args, "--config.faults=sigkill@7")
    assert proc.returncode == -9
    proc = _train("configs/gbdt.py", tmp_path / "run", *args, "--config.faults=sigkill@7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _sha(tmp_path / "run") == _sha(tmp_path / "ref")


def test_gbdt_survives_a_device_loss_with_identical_trees(tmp_path):
    config = gbdt.get_config()
    config.model.num_trees = 10

    def fit(workdir, faults=""):
        config.faults = faults
        trainer = Trainer(config, str(workdir), devices=jax.devices()[:4])
        result = trainer.fit()
        return result, flat_params(trainer.state.params)

    ref, ref_trees = fit(tmp_path / "ref")
    got, trees = fit(tmp_path / "loss", "device_loss@5:2")
    assert got["num_devices"] == 3 and got["lost_steps"] == 0
    for name, want in ref_trees.items():
        np.testing.assert_array_equal(trees[name], want, err_msg=name)
    assert got["params_sha256"] == ref["params_sha256"]


def test_mlp_killed_and_resumed_is_bitwise_identical(tmp_path):
    args = ("--config.train.num_steps=60", "--config.checkpoint.every_steps=20")
    assert _train("configs/mlp.py", tmp_path / "ref", *args).returncode == 0
    proc = _train("configs/mlp.py", tmp_path / "run", *args, "--config.faults=sigkill@33")
    assert proc.returncode == -9
    proc = _train("configs/mlp.py", tmp_path / "run", *args, "--config.faults=sigkill@33")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _sha(tmp_path / "run") == _sha(tmp_path / "ref")
