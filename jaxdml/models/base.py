"""What a model is to the rest of jaxdml: one typed protocol per kind.

The training code asks one question of a model, `is_boosted(model)`, and takes the
gradient step or the boosting step accordingly; nothing else looks at a model's class
or name.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


@runtime_checkable
class GradientModel(Protocol):
    """Trained by the gradient step: each device differentiates the weighted sum of
    `per_sample_loss` over its rows, a psum aggregates, an optax optimizer updates."""

    def init(self, key: jax.Array) -> Params:
        """Fresh parameters (a pytree)."""

    def per_sample_loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        """Unweighted loss of each row [n]."""

    def regularizer(self, params: Params) -> jax.Array:
        """A scalar added to the mean loss (0 for none)."""

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """Predicted labels [n] int32."""


@runtime_checkable
class BoostedModel(Protocol):
    """Grown by the boosting step: one step grows one round of trees from histograms
    that each device builds over its rows and a psum aggregates."""

    num_trees: int  # rounds: a run has this many steps

    @property
    def num_bins(self) -> int:
        """Histogram bins per feature."""

    def init(self, key: jax.Array) -> Params:
        """Empty trees, at their final (fixed) size."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The rows as the step reads them (integer bins), computed once on the host."""

    def boost_round(self, params, round_index, xb, y, w, reduce) -> tuple[Params, dict]:
        """Grows round `round_index` from this caller's rows; returns the trees and sums."""

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """Predicted labels [n] int32 from raw features."""


def loss_and_predictions(model: Any, params: Params, x: jax.Array, y: jax.Array):
    """(per-sample losses [n], predicted labels [n]) of a gradient-trained model, from one
    forward pass when the model offers `loss_and_predictions` (the step's batch accuracy
    then costs nothing), else from `per_sample_loss` and `predict`."""
    both = getattr(model, "loss_and_predictions", None)
    if both is not None:
        return both(params, x, y)
    return model.per_sample_loss(params, x, y), model.predict(params, x)


def row_losses(model: Any, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """The unweighted loss of each row [n] (no regularizer): the log loss of a tree
    ensemble's margins, else the model's `per_sample_loss`."""
    if is_boosted(model):
        return model.gradients(model.margins(params, x), y, jnp.ones(y.shape, jnp.float32))[1]
    return model.per_sample_loss(params, x, y)


def is_boosted(model: Any) -> bool:
    """True for a tree ensemble grown round by round, False for a gradient-trained model."""
    return isinstance(model, BoostedModel)


def check_model(model: Any) -> None:
    """Raises TypeError naming what is missing when `model` fits neither protocol."""
    if is_boosted(model) or isinstance(model, GradientModel):
        return
    missing = [
        name
        for name in ("init", "per_sample_loss", "regularizer", "predict")
        if not callable(getattr(model, name, None))
    ]
    raise TypeError(
        f"{type(model).__name__} is not a jaxdml model: it lacks {missing} "
        "(see jaxdml.models.base.GradientModel)"
    )
