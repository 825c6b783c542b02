"""What a model is to the rest of jaxdml: one typed protocol per kind.

The training code asks one question of a model, `is_boosted(model)`, and takes the
gradient step or the boosting step accordingly; nothing else looks at a model's class
or name.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a training forward pass may use beyond the params and the rows: a model that
    offers `train_outputs` gets it (dropout keys, cross-device statistics).

    Attributes:
      rng: this step's key, `fold_in(fold_in(state.rng, 1), state.step)` (the init key is
        `fold_in(state.rng, 0)`): the same on every device, and on every resume.
      rows: [n] int32 global sample index of each row (padding rows repeat a real one).
      weights: [n] row weights, 0 for padding rows: statistics over the batch weigh by them.
      axis_name: the device axis to sum statistics over (None: one caller holds the batch).
    """

    rng: jax.Array
    rows: jax.Array
    weights: jax.Array
    axis_name: str | None = None


def task(model: Any) -> str:
    """'classification' (integer labels, accuracy) or 'regression' (float targets, rmse)."""
    return getattr(model, "task", "classification")


def init_variables(model: Any, key: jax.Array) -> tuple[Params, Any]:
    """(params, model_state) of a fresh model: `model.init_variables(key)` when it has
    mutable state (e.g. batch statistics), else `(model.init(key), {})`."""
    both = getattr(model, "init_variables", None)
    return both(key) if both is not None else (model.init(key), {})


def train_outputs(model: Any, params: Params, model_state: Any, x, y, ctx: StepContext):
    """(per-sample losses [n], predictions [n], the next model_state) of a training forward
    pass: `model.train_outputs` when the model offers it, else the stateless pair."""
    own = getattr(model, "train_outputs", None)
    if own is not None:
        return own(params, model_state, x, y, ctx)
    losses, predicted = loss_and_predictions(model, params, x, y)
    return losses, predicted, model_state


def predict_with_state(model: Any, params: Params, model_state: Any, x: jax.Array) -> jax.Array:
    """Predictions [n] for evaluation (labels, or values for regression); a model with
    mutable state reads it (e.g. BatchNorm's running averages)."""
    if getattr(model, "stateful", False):
        return model.predict(params, x, model_state)
    return model.predict(params, x)


def hits(model: Any, predicted: jax.Array, y: jax.Array) -> jax.Array:
    """Per-row 1.0 where the prediction is right (NaN for regression: no accuracy)."""
    if task(model) == "regression":
        return jnp.full(y.shape, jnp.nan, jnp.float32)
    return (predicted == y).astype(jnp.float32)


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
        check = getattr(model, "check", None)
        if check is not None:
            check()  # a model that can test itself on a dummy batch (FlaxModel: shapes, rngs)
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
