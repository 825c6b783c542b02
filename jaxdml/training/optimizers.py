"""Optimizers: the optax transformation a config asks for."""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from jaxdml.models import is_boosted


def build_optimizer(config: ml_collections.ConfigDict, model: Any) -> optax.GradientTransformation:
    """The optax optimizer named by `config.train.optimizer` (the identity for boosted
    models: their trees are grown by the boosting step, not by an optimizer)."""
    t = config.train
    if is_boosted(model):
        return optax.identity()  # trees are grown by the boosting step, not by an optimizer
    if t.optimizer == "sgd":
        return optax.sgd(t.learning_rate)
    if t.optimizer == "momentum":
        return optax.sgd(t.learning_rate, momentum=t.momentum)
    if t.optimizer == "adam":
        return optax.adam(t.learning_rate)
    if t.optimizer == "adamw":
        return optax.adamw(t.learning_rate)
    # Pegasos: eta_t = 1 / (lambda * t), t counted from 1.
    lam = config.model.l2
    return optax.sgd(lambda count: 1.0 / (lam * (count + 1.0)))
