"""What every step shares: the step signature, the finiteness check, the metrics row,
and the step that consumes a set-aside batch. Both step modules (gradient, boosting)
import this one; it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdml.mesh import replicated
from jaxdml.training.state import TrainState

StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def step_metrics(
    sums: dict, batch: dict, loss: jax.Array, ok: jax.Array, grad_norm, param_norm
) -> dict:
    """The per-step metrics row every step function returns (same keys for all models)."""
    return {
        "loss": loss,
        "batch_accuracy": sums["correct"] / sums["weight"],
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "skipped": (~ok).astype(jnp.int32),
        "set_aside": jnp.int32(0),
        "samples": sums["weight"],
        "epoch": batch["pos"]["epoch"] - (batch["pos"]["index"] == 0),
    }


def make_skip_step(mesh: Mesh) -> StepFn:
    """A step that consumes its batch and changes nothing else (a batch set aside
    after a rollback). Its metrics say set_aside=1."""

    def skip(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        new_state = state.replace(step=state.step + 1, data_pos=batch["pos"])
        nan = jnp.float32(jnp.nan)
        metrics = {
            "loss": nan,
            "batch_accuracy": nan,
            "grad_norm": nan,
            "param_norm": optax.tree.norm(state.params),
            "skipped": jnp.int32(0),
            "set_aside": jnp.int32(1),
            "samples": jnp.float32(0),
            "epoch": batch["pos"]["epoch"] - (batch["pos"]["index"] == 0),
        }
        return new_state, metrics

    rep = replicated(mesh)
    return jax.jit(skip, out_shardings=(rep, rep))
