"""Models: the math only. They know nothing of devices, faults or checkpoints."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdml.models.base import (
    BoostedModel,
    GradientModel,
    check_model,
    is_boosted,
    loss_and_predictions,
    row_losses,
)
from jaxdml.models.linear import LinearModel
from jaxdml.models.mlp import mlp_classifier
from jaxdml.models.trees import GBDTModel, quantile_bin_edges


def build_model(
    config: ml_collections.ConfigDict,
    num_features: int,
    num_classes: int,
    x_train: np.ndarray | None = None,
):
    """The model named by `config.model.name` for data of this shape.

    Args:
      config: the run's config.
      num_features, num_classes: the data's shape.
      x_train: the training features; gbdt computes its bin edges from them.
    """
    m = config.model
    multinomial = m.multiclass == "multinomial" or (m.multiclass == "auto" and num_classes > 2)
    if m.name == "logreg":
        return LinearModel(num_features, num_classes, "logistic", m.l2, multinomial)
    if m.name == "svm":
        return LinearModel(num_features, num_classes, m.svm_loss, m.l2, multinomial)
    if m.name == "mlp":
        loss = m.loss
        if loss == "auto":
            loss = "squared_error" if config.data.task == "regression" else "cross_entropy"
        return mlp_classifier(num_features, num_classes, m.hidden_sizes, m.l2, loss, m.dropout)
    if m.name == "gbdt":
        if x_train is None:
            raise ValueError("gbdt needs x_train to compute its bin edges")
        return GBDTModel(
            num_features,
            num_classes,
            quantile_bin_edges(x_train, m.num_bins),
            num_trees=m.num_trees,
            max_depth=m.max_depth,
            learning_rate=m.tree_learning_rate,
            min_child_weight=m.min_child_weight,
            gamma=m.gamma,
            l2=m.tree_l2,
            # Measured on XLA:CPU (docs/architecture.md); accelerators keep int32 pairs.
            packed_sums=jax.default_backend() == "cpu",
        )
    raise NotImplementedError(f"config.model.name={m.name!r} is not built yet")


def model_inputs(model: Any, x: np.ndarray) -> np.ndarray:
    """The rows as the model's step reads them: `model.encode(x)` for boosted models
    (integer bins, computed once on the host), x itself for gradient-trained ones."""
    return model.encode(x) if is_boosted(model) else x


def num_steps(model: Any, config: ml_collections.ConfigDict) -> int:
    """Steps of a run: one per boosting round for trees, else `config.train.num_steps`."""
    return model.num_trees if is_boosted(model) else config.train.num_steps


__all__ = [
    "BoostedModel",
    "GradientModel",
    "build_model",
    "check_model",
    "is_boosted",
    "loss_and_predictions",
    "model_inputs",
    "num_steps",
    "row_losses",
]
