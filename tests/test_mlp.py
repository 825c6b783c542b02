"""The Flax MLP on digits, and a user-supplied Flax module, through the ordinary gradient step."""

import flax.linen as nn
import jax
import numpy as np

from configs import mlp
from jaxdml.data import load_dataset
from jaxdml.models.mlp import FlaxModel
from jaxdml.training.state import to_host
from jaxdml.training.trainer import Trainer


def test_mlp_on_digits_reaches_95_percent_and_is_device_count_invariant(tmp_path):
    config = mlp.get_config()
    results, params = {}, {}
    for d in (1, 4):
        trainer = Trainer(config, str(tmp_path / f"d{d}"), devices=jax.devices()[:d])
        results[d] = trainer.fit()
        params[d] = to_host(trainer.state.params)
    assert results[1]["test_accuracy"] >= 0.95, results[1]
    assert results[4]["test_accuracy"] >= 0.95, results[4]
    for a, b in zip(jax.tree.leaves(params[4]), jax.tree.leaves(params[1]), strict=True):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_same_config_and_devices_give_the_same_params_sha256(tmp_path):
    config = mlp.get_config("smoke")
    first = Trainer(config, str(tmp_path / "a"), devices=jax.devices()[:4]).fit()
    again = Trainer(config, str(tmp_path / "b"), devices=jax.devices()[:4]).fit()
    assert first["params_sha256"] == again["params_sha256"]
    assert first["steps"] == 30


class _TinyResidualNet(nn.Module):
    """A user's own module: any linen module mapping [n, f] -> [n, K] scores."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(32)(x))
        h = h + nn.tanh(nn.Dense(32)(h))
        return nn.Dense(self.num_classes)(h)


def test_a_user_flax_module_trains_through_the_same_step(tmp_path):
    config = mlp.get_config()
    config.train.num_steps = 100
    ds = load_dataset(config.data)
    model = FlaxModel(_TinyResidualNet(ds.num_classes), ds.num_features, ds.num_classes, l2=1e-4)
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:2], dataset=ds, model=model)
    result = trainer.fit()
    assert set(to_host(trainer.state.params)) == {"Dense_0", "Dense_1", "Dense_2"}
    assert result["test_accuracy"] >= 0.9, result
