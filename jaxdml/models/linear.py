"""Linear models: logistic regression (binary, multinomial) and linear SVM (hinge).

Math only: per-sample losses, the L2 regularizer and predictions. Weighting,
aggregation across devices and updates live in jaxdml.training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

LOSSES = ("logistic", "hinge", "squared_hinge")


@dataclasses.dataclass(frozen=True)
class LinearModel:
    """scores = x @ w + b with one output (binary) or one per class.

    Attributes:
      num_features: input columns.
      num_classes: label count K (labels are 0..K-1).
      loss: logistic | hinge | squared_hinge.
      l2: regularization strength; the objective is mean loss + l2/2 * ||w||^2.
      multinomial: K outputs (softmax for logistic, one-vs-rest for the SVM);
        otherwise K must be 2 and there is one output.
    """

    num_features: int
    num_classes: int
    loss: str = "logistic"
    l2: float = 0.0
    multinomial: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.multinomial and self.num_classes != 2:
            raise ValueError(f"a binary model needs 2 classes, got {self.num_classes}")

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.multinomial else 1

    def init(self, key: jax.Array) -> Params:
        """Zero weights (the convex problems here do not need random init)."""
        del key
        k = self.num_outputs
        return {"w": jnp.zeros((self.num_features, k), jnp.float32), "b": jnp.zeros((k,))}

    def scores(self, params: Params, x: jax.Array) -> jax.Array:
        """Raw scores [n, outputs]."""
        return x @ params["w"] + params["b"]

    def per_sample_loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        """Unweighted loss of each row [n]."""
        return self._loss_of_scores(self.scores(params, x), y)

    def loss_and_predictions(self, params: Params, x: jax.Array, y: jax.Array):
        """(per_sample_loss, predict) from one computation of the scores."""
        z = self.scores(params, x)
        return self._loss_of_scores(z, y), self._labels(z)

    def _loss_of_scores(self, z: jax.Array, y: jax.Array) -> jax.Array:
        if self.loss == "logistic":
            if self.multinomial:
                return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]
            z = z[:, 0]
            return jax.nn.softplus(z) - y * z
        if self.multinomial:
            sign = jnp.where(jax.nn.one_hot(y, self.num_classes) > 0, 1.0, -1.0)
        else:
            sign = (2.0 * y - 1.0)[:, None]
        margin = jnp.maximum(0.0, 1.0 - sign * z)
        if self.loss == "squared_hinge":
            margin = margin**2
        return margin.sum(-1)

    def regularizer(self, params: Params) -> jax.Array:
        """l2/2 * ||w||^2 (the bias is not regularized)."""
        return 0.5 * self.l2 * jnp.sum(params["w"] ** 2)

    def predict(self, params: Params, x: jax.Array) -> jax.Array:
        """Predicted labels [n] int32."""
        return self._labels(self.scores(params, x))

    def _labels(self, z: jax.Array) -> jax.Array:
        if self.multinomial:
            return jnp.argmax(z, axis=-1).astype(jnp.int32)
        return (z[:, 0] > 0).astype(jnp.int32)
