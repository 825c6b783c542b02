"""The data-parallel step: per-shard weighted sums -> psum -> one optax update.

Each device computes the gradient of the *sum* of its rows' weighted losses;
the psum of those sums divided by the psum of the weights is the exact global
mean gradient for any device count (padding rows carry weight 0). The update
is then the same replicated computation on every device.

Models with mutable state (BatchNorm's batch_stats) return their next state from the
forward pass; its statistics are summed over the devices inside the shard_map
(jaxdml.models.flax_hooks), so it is replicated like the params. Randomness (dropout)
comes from the step's key in `StepContext`, folded with each row's global index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdml.mesh import DATA_AXIS, replicated
from jaxdml.models.base import StepContext, hits, train_outputs
from jaxdml.training.state import TrainState
from jaxdml.training.step_common import Advance, StepFn, all_finite, step_metrics


def step_key(state: TrainState) -> jax.Array:
    """The step's key: the run's key folded with 1 (0 is the init's) and the step."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)


def local_sums(model: Any, params, model_state, x, y, w, ctx: StepContext) -> tuple[dict, Any]:
    """This shard's weighted loss sum, gradient sum, weight sum and correct count (the
    predictions come from the loss's own forward pass), and the model's next state."""

    def weighted_loss(p):
        losses, predicted, new_state = train_outputs(model, p, model_state, x, y, ctx)
        return jnp.sum(w * losses), (jnp.sum(w * hits(model, predicted, y)), new_state)

    (loss_sum, (correct, new_state)), grad_sum = jax.value_and_grad(weighted_loss, has_aux=True)(
        params
    )
    sums = {"loss": loss_sum, "grad": grad_sum, "weight": jnp.sum(w), "correct": correct}
    return sums, new_state


def _replicated(tree: Any) -> Any:
    """Leaves that still vary over the devices (a model's own per-device state) averaged,
    so the state leaves the shard_map replicated; statistics summed inside are left as
    they are."""

    def one(v):
        aval = jax.typeof(v)  # jax 0.10: manual_axis_type.varying; later: vma
        manual = getattr(aval, "manual_axis_type", None)
        varying = manual.varying if manual is not None else getattr(aval, "vma", ())
        return jax.lax.pmean(v, DATA_AXIS) if DATA_AXIS in varying else v

    return jax.tree.map(one, tree)


def aggregated_sums(model: Any, mesh: Mesh) -> Callable:
    """shard_map'd `local_sums` followed by psum over 'data': global sums, replicated,
    and the model's next state."""

    def per_shard(params, model_state, x, y, w, rows, rng):
        # Mark the replicated params as per-device values: the gradient is then this
        # shard's own sum (no implicit psum from differentiating a replicated input),
        # and the one explicit psum below aggregates it. One psum of one flat vector:
        # on CPU every collective is a rendezvous of the device threads, and one per
        # leaf cost as much as the rest of a small step (2.0 -> 1.1 ms, 8k x 20, 4 devices).
        params = jax.lax.pcast(params, DATA_AXIS, to="varying")
        ctx = StepContext(rng, rows, w, DATA_AXIS)
        sums, new_state = local_sums(model, params, model_state, x, y, w, ctx)
        flat, unravel = ravel_pytree(sums)
        return unravel(jax.lax.psum(flat, DATA_AXIS)), _replicated(new_state)

    data = P(DATA_AXIS)
    in_specs = (P(), P(), data, data, data, data, P())
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()))


def aggregated_loss(model: Any, mesh: Mesh) -> Callable:
    """The global mean data loss of `params` (no gradient): the objective a line search
    (L-BFGS's `value_fn`) evaluates."""

    def per_shard(params, model_state, x, y, w, rows, rng):
        ctx = StepContext(rng, rows, w, DATA_AXIS)
        losses, _, _ = train_outputs(model, params, model_state, x, y, ctx)
        both = jax.lax.psum(jnp.stack([jnp.sum(w * losses), jnp.sum(w)]), DATA_AXIS)
        return both[0] / both[1]

    data = P(DATA_AXIS)
    in_specs = (P(), P(), data, data, data, data, P())
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P())


def make_gradient_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    advance: Advance,
    donate: bool = False,
    compiler_options: dict | None = None,
) -> StepFn:
    """The jitted step for gradient-trained models (`compiler_options`: XLA's, for jit).

    A non-finite loss or gradient skips the update: params, optimizer state and model
    state are kept, the batch is consumed (step and data position advance) and
    metrics['skipped'] is 1. An optimizer that takes extra arguments (optax's
    GradientTransformationExtraArgs, e.g. `optax.lbfgs`) gets the objective's value, its
    gradient and `value_fn` (the full objective of this batch) for its line search.
    """
    sums_fn = aggregated_sums(model, mesh)
    loss_fn = aggregated_loss(model, mesh)
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        inputs = (batch["x"], batch["y"], batch["w"], batch["i"], step_key(state))
        sums, model_state = sums_fn(state.params, state.model_state, *inputs)
        reg, reg_grad = jax.value_and_grad(model.regularizer)(state.params)
        grads = jax.tree.map(lambda g, r: g / sums["weight"] + r, sums["grad"], reg_grad)
        loss = sums["loss"] / sums["weight"] + reg
        extra = {}
        if extra_args:
            value_fn = lambda p: loss_fn(p, state.model_state, *inputs) + model.regularizer(p)  # noqa: E731
            extra = {"value": loss, "grad": grads, "value_fn": value_fn}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        pos = advance(state.data_pos)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            model_state=keep(model_state, state.model_state),
            data_pos=pos,
        )
        metrics = step_metrics(
            sums, pos, loss, ok, optax.tree.norm(grads), optax.tree.norm(new_state.params)
        )
        return new_state, metrics

    rep = replicated(mesh)
    donated = (0,) if donate else ()
    return jax.jit(
        step, out_shardings=(rep, rep), donate_argnums=donated, compiler_options=compiler_options
    )
