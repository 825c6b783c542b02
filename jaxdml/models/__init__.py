"""Models: the math only. They know nothing of devices, faults or checkpoints."""

from __future__ import annotations

import ml_collections

from jaxdml.models.linear import LinearModel
from jaxdml.models.mlp import mlp_classifier


def build_model(config: ml_collections.ConfigDict, num_features: int, num_classes: int):
    """The model named by `config.model.name` for data of this shape."""
    m = config.model
    multinomial = m.multiclass == "multinomial" or (m.multiclass == "auto" and num_classes > 2)
    if m.name == "logreg":
        return LinearModel(num_features, num_classes, "logistic", m.l2, multinomial)
    if m.name == "svm":
        return LinearModel(num_features, num_classes, m.svm_loss, m.l2, multinomial)
    if m.name == "mlp":
        return mlp_classifier(num_features, num_classes, m.hidden_sizes, m.l2)
    raise NotImplementedError(f"config.model.name={m.name!r} is not built yet")
