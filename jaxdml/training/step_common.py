"""What every step shares: the step signature, the finiteness check, the metrics row,
and the step that consumes a set-aside batch. Both step modules (gradient, boosting)
import this one; it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdml.mesh import replicated
from jaxdml.training.state import TrainState

# (state, batch) -> (next state, the packed metrics row: see METRICS)
StepFn = Callable[[TrainState, dict], tuple[TrainState, jax.Array]]


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


Advance = Callable[[dict], dict]  # data position -> the position after its batch

# The metrics row of a step travels as one float32 vector in this order: one buffer per
# step to read back instead of one per metric (each read costs tens of microseconds of
# host work). The counts are exact in float32 (below 2**24).
METRICS = (
    "loss", "batch_accuracy", "grad_norm", "param_norm", "skipped", "set_aside", "samples",
    "epoch",
)  # fmt: skip
_COUNTS = frozenset({"skipped", "set_aside", "epoch"})


def pack_metrics(metrics: dict) -> jax.Array:
    """The metrics row as the float32 vector a step returns (METRICS order)."""
    return jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in METRICS])


def unpack_metrics(values: Any) -> dict:
    """{name: value} of a fetched metrics vector (counts as ints)."""
    values = np.asarray(values)
    return {k: int(v) if k in _COUNTS else float(v) for k, v in zip(METRICS, values, strict=True)}


def step_metrics(sums: dict, pos: dict, loss: jax.Array, ok: jax.Array, grad_norm, param_norm):
    """The per-step metrics row every step function returns, packed (`unpack_metrics`
    reads it); `pos` is the data position after the step (its epoch is the step's,
    unless the step ended one)."""
    return pack_metrics(
        {
            "loss": loss,
            "batch_accuracy": sums["correct"] / sums["weight"],
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "skipped": ~ok,
            "set_aside": 0,
            "samples": sums["weight"],
            "epoch": pos["epoch"] - (pos["index"] == 0),
        }
    )


def make_skip_step(mesh: Mesh, advance: Advance) -> StepFn:
    """A step that consumes its batch and changes nothing else (a batch set aside
    after a rollback). Its metrics say set_aside=1."""

    def skip(state: TrainState, batch: dict) -> tuple[TrainState, jax.Array]:
        pos = advance(state.data_pos)
        new_state = state.replace(step=state.step + 1, data_pos=pos)
        nan = jnp.float32(jnp.nan)
        metrics = {
            "loss": nan,
            "batch_accuracy": nan,
            "grad_norm": nan,
            "param_norm": optax.tree.norm(state.params),
            "skipped": 0,
            "set_aside": 1,
            "samples": 0,
            "epoch": pos["epoch"] - (pos["index"] == 0),
        }
        return new_state, pack_metrics(metrics)

    rep = replicated(mesh)
    return jax.jit(skip, out_shardings=(rep, rep))
