"""Bring your own Flax model: linen Dropout + BatchNorm (device-count invariant, through
a device loss), NNX modules, regression losses, and one-line errors for misfits."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import jaxdml
from configs import mlp, regression
from jaxdml.config import ConfigError
from jaxdml.data import load_dataset
from jaxdml.models.mlp import FlaxModel, NnxModel
from jaxdml.training.state import to_host
from jaxdml.training.trainer import Trainer


class DropoutBatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(64)(x))
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def test_linen_dropout_batchnorm_is_device_count_invariant_through_a_device_loss(tmp_path):
    config = mlp.get_config()
    config.train.num_steps = 100
    config.train.learning_rate = 0.1
    ds = load_dataset(config.data)
    model = FlaxModel(DropoutBatchNormNet(), ds.num_features, ds.num_classes, l2=1e-4)
    results, states = {}, {}
    for d, faults in ((1, ""), (4, "device_loss@50:3")):
        config.faults = faults
        trainer = Trainer(config, str(tmp_path / f"d{d}"), jax.devices()[:d], ds, model)
        results[d] = trainer.fit()
        states[d] = to_host((trainer.state.params, trainer.state.model_state))
    assert results[4]["num_devices"] == 3 and results[4]["lost_steps"] == 0
    assert set(states[1][1]["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
    for d in (1, 4):
        assert results[d]["test_accuracy"] >= 0.95, results[d]
    # Same dropout masks (per sample index) and exact batch statistics on 1 and 4 -> 3
    # devices: the whole state agrees up to float order (measured max |diff| ~1e-6).
    for a, b in zip(jax.tree.leaves(states[4]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_an_nnx_module_trains(tmp_path):
    config = mlp.get_config()
    config.train.num_steps = 60
    ds = load_dataset(config.data)
    model = NnxModel(NnxNet, ds.num_features, ds.num_classes)
    trainer = Trainer(config, str(tmp_path), jax.devices()[:2], ds, model)
    result = trainer.fit()
    assert result["test_accuracy"] >= 0.9, result
    assert "norm" in trainer.state.model_state  # the BatchStat running averages


@pytest.mark.parametrize("loss", ["squared_error", "huber"])
def test_regression_beats_the_mean_predictor(tmp_path, loss):
    config = regression.get_config("smoke")
    config.model.loss = loss
    result = jaxdml.train(config, str(tmp_path))
    # Measured at 60 steps: test rmse ~0.5 of the mean predictor's (r2 ~0.75).
    assert result["test_rmse"] < 0.7 * result["baseline_rmse"], result
    assert result["test_r2"] > 0.5, result


class WrongWidth(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


class NeedsNoise(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x) + jax.random.normal(self.make_rng("noise"), (x.shape[0], 10))


@pytest.mark.parametrize(
    "module, message",
    [
        (WrongWidth(), r"WrongWidth maps x \[2, 64\] to shape \(2, 3\); a classification model"),
        (NeedsNoise(), r"NeedsNoise does not fit jaxdml: .*noise"),
    ],
)
def test_a_module_that_does_not_fit_is_a_one_line_error(tmp_path, module, message):
    config = mlp.get_config()
    ds = load_dataset(config.data)
    with pytest.raises(ConfigError, match=message) as e:
        Trainer(config, str(tmp_path), jax.devices()[:1], ds, FlaxModel(module, 64, 10))
    assert "\n" not in str(e.value)
