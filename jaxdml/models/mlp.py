"""The shipped MLP (config.model.name = 'mlp'): a linen module in a FlaxModel.

`FlaxModel` (jaxdml/models/flax_model.py) adapts any linen module; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxdml.models.flax_model import FlaxModel, NnxModel

__all__ = ["MLP", "FlaxModel", "NnxModel", "mlp_classifier"]


class MLP(nn.Module):
    """Dense -> ReLU (-> Dropout) for each hidden width, then Dense to `num_outputs`."""

    hidden_sizes: Sequence[int]
    num_outputs: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs)(x)


def mlp_classifier(
    num_features: int,
    num_classes: int,
    hidden_sizes: Sequence[int],
    l2: float = 0.0,
    loss: str = "auto",
    dropout: float = 0.0,
) -> FlaxModel:
    """The shipped MLP as a FlaxModel: a classifier, or a regressor (one output) for a
    regression loss."""
    regression = loss in ("squared_error", "huber")
    module = MLP(tuple(hidden_sizes), 1 if regression else num_classes, dropout)
    return FlaxModel(module, num_features, num_classes, l2, loss)
