"""Flax models behind the same interface as LinearModel, and the shipped MLP classifier.

`FlaxModel` adapts any Flax linen module that maps features [n, f] to class scores
[n, K]: `init(key) -> params`, `per_sample_loss(params, x, y)` (softmax cross
entropy), `regularizer(params)` (l2/2 * squared norm of the weight matrices) and
`predict(params, x)`. That is all the gradient step needs, so a Flax model trains
through the same shard_map'd step, loop, result.json and checkpoints as logistic
regression. The params are a plain pytree (the module's 'params' collection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any


class MLP(nn.Module):
    """Dense -> ReLU for each hidden width, then a Dense layer to `num_outputs` scores."""

    hidden_sizes: Sequence[int]
    num_outputs: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


def _is_weight_matrix(path: tuple) -> bool:
    last = path[-1]
    return getattr(last, "key", None) == "kernel"


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModel:
    """A classifier around a Flax linen module (deterministic: no dropout, no batch stats).

    Attributes:
      module: maps x [n, num_features] to scores [n, num_classes].
      num_features: input columns (the init input is zeros [1, num_features]).
      num_classes: label count K (labels are 0..K-1); binary problems use K = 2 scores.
      l2: the objective is mean cross entropy + l2/2 * sum of squared kernels
        (biases are not regularized).
    """

    module: nn.Module
    num_features: int
    num_classes: int
    l2: float = 0.0

    def init(self, key: jax.Array) -> Params:
        """The module's 'params' collection, initialized from `key`."""
        return self.module.init(key, jnp.zeros((1, self.num_features), jnp.float32))["params"]

    def scores(self, params: Params, x: jax.Array) -> jax.Array:
        """Class scores [n, K]."""
        return self.module.apply({"params": params}, x)

    def per_sample_loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        """Unweighted softmax cross entropy of each row [n]."""
        z = self.scores(params, x)
        return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]

    def loss_and_predictions(self, params: Params, x: jax.Array, y: jax.Array):
        """(per_sample_loss, predict) from one forward pass."""
        z = self.scores(params, x)
        loss = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]
        return loss, jnp.argmax(z, axis=-1).astype(jnp.int32)

    def regularizer(self, params: Params) -> jax.Array:
        """l2/2 * the squared norm of every 'kernel' leaf."""
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        squares = [jnp.sum(v**2) for path, v in leaves if _is_weight_matrix(path)]
        return 0.5 * self.l2 * sum(squares, jnp.zeros(()))

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """Predicted labels [n] int32."""
        return jnp.argmax(self.scores(params, x), axis=-1).astype(jnp.int32)


def mlp_classifier(
    num_features: int, num_classes: int, hidden_sizes: Sequence[int], l2: float = 0.0
) -> FlaxModel:
    """The shipped MLP (config.model.name = 'mlp') as a FlaxModel."""
    module = MLP(hidden_sizes=tuple(hidden_sizes), num_outputs=num_classes)
    return FlaxModel(module, num_features, num_classes, l2)
