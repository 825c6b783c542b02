"""Flax models behind the GradientModel protocol: linen modules (`FlaxModel`) and NNX
modules (`NnxModel`), classifiers or regressors, with dropout and batch statistics.

The params are the 'params' collection (a plain pytree); every other collection a
module keeps (BatchNorm's 'batch_stats') is the model state, `TrainState.model_state`,
updated by each training step and replicated like the params. Training-mode forward
passes run under `flax_hooks.invariant_layers`: dropout masks per global sample index,
batch statistics summed over the devices (device-count invariant up to float order).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdml.models.base import StepContext
from jaxdml.models.flax_hooks import invariant_layers

Params = Any
REGRESSION_LOSSES = ("squared_error", "huber")
LOSSES = ("cross_entropy", *REGRESSION_LOSSES)
_TRAIN_ARGS = {"train": True, "training": True, "is_training": True, "deterministic": False}


def _cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0]


def _values(z: jax.Array) -> jax.Array:
    """Regression outputs [n] from [n] or [n, 1]."""
    return z[:, 0] if z.ndim == 2 else z


def per_sample_loss_fn(loss: str | Callable) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(outputs, targets) -> per-sample loss [n] for a loss name or a callable."""
    if callable(loss):
        return loss
    if loss == "squared_error":
        return lambda z, y: optax.squared_error(_values(z), y)
    if loss == "huber":
        return lambda z, y: optax.huber_loss(_values(z), y, delta=1.0)
    if loss == "cross_entropy":
        return _cross_entropy
    raise ValueError(f"loss must be one of {list(LOSSES)} or a callable, got {loss!r}")


def _is_weight_matrix(path: tuple) -> bool:
    return getattr(path[-1], "key", None) == "kernel"


def l2_penalty(params: Params, l2: float) -> jax.Array:
    """l2/2 * the squared norm of every 'kernel' leaf (biases and scales are free)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    squares = [jnp.sum(v**2) for path, v in leaves if _is_weight_matrix(path)]
    return 0.5 * l2 * sum(squares, jnp.zeros(()))


class _Head:
    """What a Flax classifier or regressor shares: loss, predictions, checks (the
    dataclasses below hold num_features, num_classes, l2, loss and task)."""

    stateful = True  # predict reads the model state

    def __post_init__(self):
        loss, task = self.loss, self.task
        if task == "auto":
            task = "regression" if loss in REGRESSION_LOSSES else "classification"
        if loss == "auto":
            loss = "squared_error" if task == "regression" else "cross_entropy"
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        per_sample_loss_fn(loss)  # a bad name fails here
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "task", task)

    def _labels(self, z: jax.Array) -> jax.Array:
        if self.task == "regression":
            return _values(z).astype(jnp.float32)
        return jnp.argmax(z, axis=-1).astype(jnp.int32)

    def _check_outputs(self, shape: tuple) -> None:
        want = [(2, 1), (2,)] if self.task == "regression" else [(2, self.num_classes)]
        if tuple(shape) not in want:
            raise ValueError(
                f"{self._name()} maps x [2, {self.num_features}] to shape {tuple(shape)}; "
                f"a {self.task} model must give {' or '.join(str(list(w)) for w in want)}"
            )

    def _name(self) -> str:
        return type(getattr(self, "module", self)).__name__

    def init(self, key: jax.Array) -> Params:
        """Fresh parameters."""
        return self.init_variables(key)[0]

    def regularizer(self, params: Params) -> jax.Array:
        """l2/2 * the squared norm of every kernel."""
        return l2_penalty(params, self.l2)

    def per_sample_loss(self, params: Params, x: jax.Array, y: jax.Array, model_state=None):
        """Unweighted loss of each row [n] (evaluation mode)."""
        return per_sample_loss_fn(self.loss)(self.outputs(params, model_state, x), y)

    def predict(self, params: Params, x: jax.Array, model_state: Any = None) -> jax.Array:
        """Labels [n] int32 (regression: values [n] float32), evaluation mode."""
        return self._labels(self.outputs(params, model_state, x))

    def train_outputs(self, params, model_state, x, y, ctx: StepContext):
        """(losses, predictions, next model state) of a training-mode forward pass."""
        z, new_state = self.train_apply(params, model_state, x, ctx)
        return per_sample_loss_fn(self.loss)(z, y), self._labels(z), new_state

    def check(self) -> None:
        """Runs init and both forward passes on 2 dummy rows (shapes only); raises
        ValueError in one line naming what does not fit."""
        key = jax.random.PRNGKey(0)
        x = jnp.zeros((2, self.num_features), jnp.float32)
        ctx = StepContext(key, jnp.zeros(2, jnp.int32), jnp.ones(2), None)
        try:
            params, state = jax.eval_shape(self.init_variables, key)
            out = jax.eval_shape(lambda p, s: self.outputs(p, s, x), params, state)
            trained = jax.eval_shape(lambda p, s: self.train_apply(p, s, x, ctx)[0], params, state)
        except flax.errors.FlaxError as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"{self._name()} does not fit jaxdml: {first}") from None
        self._check_outputs(out.shape)
        self._check_outputs(trained.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModel(_Head):
    """A classifier or regressor around a Flax linen module.

    The module maps x [n, num_features] to scores [n, K] (regression: [n] or [n, 1]).
    Dropout and BatchNorm work in training mode when the module's `__call__` takes a
    `train` (or `training`, `is_training`, `deterministic`) argument; it is passed as
    the mode requires. The only rng streams are 'params' (init) and 'dropout' (training);
    a module asking for another is refused by `check()` in one line.

    Attributes:
      module: the linen module.
      num_features, num_classes: the data's shape (regression: num_classes is ignored).
      l2: the objective is mean loss + l2/2 * sum of squared kernels.
      loss: 'cross_entropy' (classification), 'squared_error' or 'huber' (regression),
        or a function (outputs, y) -> per-sample loss [n].
      task: 'classification' | 'regression' (default: from the loss).
    """

    module: nn.Module
    num_features: int
    num_classes: int
    l2: float = 0.0
    loss: str | Callable = "auto"
    task: str = "auto"

    @functools.cached_property
    def _mode_arg(self) -> str | None:
        params = inspect.signature(self.module.__call__).parameters
        return next((name for name in _TRAIN_ARGS if name in params), None)

    def _mode(self, train: bool) -> dict:
        name = self._mode_arg
        if name is None:
            return {}
        return {name: train if _TRAIN_ARGS[name] else not train}

    def init_variables(self, key: jax.Array) -> tuple[Params, dict]:
        """(the 'params' collection, every other collection) initialized from `key`."""
        x = jnp.zeros((1, self.num_features), jnp.float32)
        rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
        variables = dict(self.module.init(rngs, x, **self._mode(False)))
        return variables.pop("params", {}), variables

    def outputs(self, params: Params, model_state: Any, x: jax.Array) -> jax.Array:
        """Evaluation-mode outputs (running averages, no dropout)."""
        return self.module.apply({"params": params, **(model_state or {})}, x, **self._mode(False))

    def train_apply(self, params, model_state, x, ctx: StepContext):
        """Training-mode outputs and the next model state."""
        model_state = model_state or {}
        with invariant_layers(ctx):
            z, new_state = self.module.apply(
                {"params": params, **model_state}, x, **self._mode(True),
                rngs={"dropout": ctx.rng}, mutable=list(model_state),
            )  # fmt: skip
        return z, {**model_state, **dict(new_state)}


def _nnx():
    from flax import nnx

    return nnx


@dataclasses.dataclass(frozen=True, eq=False)
class NnxModel(_Head):
    """A classifier or regressor around a Flax NNX module, through nnx.split / nnx.merge.

    `make(rngs)` builds the module from an `nnx.Rngs` (so init follows the run's seed).
    The nnx.Param variables are the params; every other variable (BatchStat, ...) is the
    model state. Training mode is `module.train()`, evaluation `module.eval()`. NNX
    layers keep their own state per device, so an NNX BatchNorm's statistics are those
    of each device's shard, averaged over the devices after the step (not exactly the
    batch's: use a linen module for device-count invariant BatchNorm). Modules holding
    rng state (nnx.Dropout with nnx.Rngs) are refused: use a linen module for dropout.
    """

    make: Callable[[Any], Any]
    num_features: int
    num_classes: int
    l2: float = 0.0
    loss: str | Callable = "auto"
    task: str = "auto"

    def _split(self, key: jax.Array):
        nnx = _nnx()
        return nnx.split(self.make(nnx.Rngs(params=key)), nnx.Param, ...)

    @functools.cached_property
    def _abstract(self):
        nnx = _nnx()
        graphdef, params, rest = jax.eval_shape(lambda: self._split(jax.random.PRNGKey(0)))
        rngs = [path for path, _ in rest.flat_state() if "rngs" in map(str, path)]
        if nnx.split(rest, nnx.RngState, ...)[1].flat_state() or rngs:
            raise ValueError(
                f"{self._name()} holds nnx.Rngs state (e.g. nnx.Dropout): not supported in "
                "an NnxModel; use a linen module (FlaxModel) for dropout"
            )
        return graphdef, params, rest

    def _name(self) -> str:
        return f"NNX module from {getattr(self.make, '__name__', 'make')}"

    def init_variables(self, key: jax.Array) -> tuple[Params, dict]:
        """(the nnx.Param values, every other variable's value) as plain dicts."""
        nnx = _nnx()
        self._abstract  # noqa: B018 -- refuses rng state before anything is built
        _, params, rest = self._split(key)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def _module(self, params: Params, model_state: Any):
        nnx = _nnx()
        graphdef, abstract_params, abstract_rest = self._abstract
        p = nnx.State(abstract_params)
        nnx.replace_by_pure_dict(p, params)
        r = nnx.State(abstract_rest)
        nnx.replace_by_pure_dict(r, model_state or {})
        return nnx.merge(graphdef, p, r)

    def outputs(self, params: Params, model_state: Any, x: jax.Array) -> jax.Array:
        module = self._module(params, model_state)
        module.eval()
        return module(x)

    def train_apply(self, params, model_state, x, ctx: StepContext):
        nnx = _nnx()
        module = self._module(params, model_state)
        module.train()
        z = module(x)
        return z, nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])
