"""The psum-aggregated gradient equals the single-device full-batch gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdml.batcher import GlobalBatcher
from jaxdml.data import make_classification
from jaxdml.mesh import make_mesh
from jaxdml.models.linear import LinearModel
from jaxdml.training.step import aggregated_sums


def _reference_grad(model, params, x, y):
    return jax.grad(lambda p: jnp.mean(model.per_sample_loss(p, x, y)))(params)


@pytest.mark.parametrize("num_devices", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("multinomial", [False, True])
def test_aggregated_gradient_equals_single_device_gradient(num_devices, multinomial):
    n_classes = 3 if multinomial else 2
    # 1001 rows: no D > 1 here divides it, so every multi-device case pads.
    x, y = make_classification(1001, 7, 3, n_classes, seed=1)
    model = LinearModel(7, n_classes, "logistic", multinomial=multinomial)
    params = jax.tree.map(
        lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape), model.init(None)
    )
    mesh = make_mesh(jax.devices()[:num_devices])
    batch, _ = GlobalBatcher(x, y, None, seed=0).next({"epoch": 0, "index": 0}, mesh)
    inputs = (batch["x"], batch["y"], batch["w"], batch["i"], jax.random.PRNGKey(0))
    sums, _ = jax.jit(aggregated_sums(model, mesh))(params, {}, *inputs)
    assert float(sums["weight"]) == 1001.0
    got = jax.tree.map(lambda g: g / sums["weight"], sums["grad"])
    want = _reference_grad(model, params, jnp.asarray(x), jnp.asarray(y))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_padding_rows_carry_no_weight():
    x, y = make_classification(10, 3, 2, 2, seed=0)
    batcher = GlobalBatcher(x, y, batch_size=10, seed=0)
    idx, weights = batcher.shard_layout(np.arange(10), num_shards=4)
    assert idx.shape == (12,)
    np.testing.assert_array_equal(weights, [1] * 10 + [0, 0])
