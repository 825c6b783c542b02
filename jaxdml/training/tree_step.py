"""The data-parallel boosting step: one step grows one round of trees.

Each device builds gradient/hessian histograms of its shard; a psum over 'data'
makes them global, and every device evaluates the same splits from them, so the
trees come out replicated without a broadcast. Nothing per-row is carried between
steps: the margins of a shard's rows are recomputed from the trees in the state at
the start of every step, so a restore or a change of devices needs only the state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdml.mesh import DATA_AXIS, replicated
from jaxdml.models.trees import Collectives
from jaxdml.training.state import TrainState
from jaxdml.training.step_common import StepFn, all_finite, step_metrics


def _psum(tree: Any) -> Any:
    return jax.lax.psum(tree, DATA_AXIS)


def _pmax(tree: Any) -> Any:
    return jax.lax.pmax(tree, DATA_AXIS)


ACROSS_DATA = Collectives(sum=_psum, max=_pmax)


def aggregated_histogram(model: Any, mesh: Mesh, num_nodes: int):
    """shard_map'd local histograms followed by psum: the global histogram, replicated.

    Returns:
      f(xb, pos, gh) -> [outputs, num_nodes, F, bins, 2] for row-sharded inputs.
    """

    def per_shard(xb, pos, gh):
        return _psum(model.histogram(xb, pos, gh, num_nodes))

    data = P(DATA_AXIS)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(data,) * 3, out_specs=P())


def _as_bins(x: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
    """The batch's bins, and whether they are valid.

    The batcher places integer bins; anything else is a corrupted batch (e.g. the NaN
    that faults.inject multiplies into x). Its round then runs on harmless in-range
    bins and is skipped like a non-finite gradient step.
    """
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x, jnp.bool_(True)
    valid = all_finite(x)
    return jnp.clip(jnp.nan_to_num(x), 0, num_bins - 1).astype(jnp.int32), valid


def make_tree_step(model: Any, mesh: Mesh, donate: bool = False) -> StepFn:
    """The jitted boosting step: state.step is the round grown, batch['x'] the binned rows.

    The batch must hold the model's encoding of the rows (`model.encode`, uint8 bins).
    A non-finite loss or tree skips the round: the trees are kept, the step and the
    data position advance (that round's slot stays empty) and metrics['skipped'] is 1.
    """

    def per_shard(params, round_index, xb, y, w):
        return model.boost_round(params, round_index, xb, y, w, ACROSS_DATA)

    data = P(DATA_AXIS)
    round_fn = jax.shard_map(
        per_shard, mesh=mesh, in_specs=(P(), P(), data, data, data), out_specs=P()
    )

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        xb, bins_ok = _as_bins(batch["x"], model.num_bins)
        params, sums = round_fn(state.params, state.step, xb, batch["y"], batch["w"])
        loss = sums["loss"] / sums["weight"]
        ok = bins_ok & jnp.isfinite(loss) & all_finite(params)
        params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), params, state.params)
        new_state = state.replace(step=state.step + 1, params=params, data_pos=batch["pos"])
        grad_norm = jnp.sqrt(sums["grad_sq"]) / sums["weight"]
        metrics = step_metrics(sums, batch, loss, ok, grad_norm, jnp.linalg.norm(params["leaf"]))
        return new_state, metrics

    rep = replicated(mesh)
    return jax.jit(step, out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())
