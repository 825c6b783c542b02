"""TrainState: one pytree holding everything a resume needs."""

from __future__ import annotations

import hashlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from jaxdml import mesh as mesh_lib
from jaxdml.batcher import initial_position
from jaxdml.models.base import init_variables


@flax.struct.dataclass
class TrainState:
    """Everything needed to resume: params, optimizer state, step, RNG key,
    the batcher position and model-specific state (e.g. trees grown so far)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    data_pos: dict[str, jax.Array]
    model_state: Any


def _initializer(model: Any, optimizer: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        rng = jax.random.PRNGKey(seed)
        params, model_state = init_variables(model, jax.random.fold_in(rng, 0))
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=rng,
            data_pos={k: jnp.asarray(v) for k, v in initial_position().items()},
            model_state=model_state,
        )
        # No weak types: an optimizer's init may hold Python scalars (optax.lbfgs's line
        # search info), weakly typed, while the step returns them strongly typed, so the
        # second step would not match the first one's compilation and compile again
        # (3 s for L-BFGS on 200k x 20). Same dtypes, same values.
        return jax.tree.map(lambda x: lax.convert_element_type(x, x.dtype), state)

    return init


def init_state(model: Any, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh):
    """A fresh TrainState, born replicated on `mesh`."""
    init = _initializer(model, optimizer, seed)
    return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))()


def abstract_state(model: Any, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh):
    """Shapes, dtypes and (replicated) shardings of the TrainState, with no arrays made."""
    shapes = jax.eval_shape(_initializer(model, optimizer, seed))
    rep = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def to_host(tree: Any, device_index: int = 0) -> Any:
    """A host numpy copy of a replicated pytree, read from one of this process's replicas.

    Works when the arrays span several processes: only addressable shards are read.
    Raises ValueError for an array that is not replicated (a shard is not the whole).
    """

    def one(x):
        if isinstance(x, jax.Array):
            if not x.sharding.is_fully_replicated:
                raise ValueError(f"to_host needs replicated arrays, got sharding {x.sharding}")
            shards = x.addressable_shards
            return np.asarray(shards[min(device_index, len(shards) - 1)].data)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def fetch(tree: Any) -> Any:
    """Host numpy copies of a pytree of replicated arrays, each leaf read from its local
    replica (which also works when the arrays span several processes). On an accelerator
    every copy starts before the first is waited for (one batched transfer); CPU arrays
    are host memory already, read directly (`jax.device_get` cost the loop's bulk metrics
    fetch ~7 us per array on CPU, a direct read ~1.3 us). The loop's bulk metrics fetch."""
    leaves, treedef = jax.tree.flatten(tree)
    local = [x.addressable_data(0) if isinstance(x, jax.Array) else x for x in leaves]
    arrays = [x for x in local if isinstance(x, jax.Array)]
    if arrays and next(iter(arrays[0].devices())).platform != "cpu":
        for x in arrays:
            x.copy_to_host_async()
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in local])


def from_replica(tree: Any, mesh: Mesh, source: jax.Device | None = None) -> Any:
    """Re-replicates a replicated pytree over `mesh` from replicas that still exist.

    Each device of `mesh` that this process holds keeps its own replica when it has
    one (no copy at all); others get a copy of the replica on `source` (default: any
    local one). No checkpoint is read and no process needs another's data, so the
    survivors of a lost device or host rebuild their state from what they hold.
    """
    rep = mesh_lib.replicated(mesh)
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

    def one(x):
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        local = {s.device: s.data for s in x.addressable_shards}
        src = local[source] if source in local else next(iter(local.values()))
        bufs = [local[d] if d in local else jax.device_put(src, d) for d in mine]
        return jax.make_array_from_single_device_arrays(x.shape, rep, bufs)

    return jax.tree.map(one, tree)


def params_sha256(params: Any) -> str:
    """sha256 over the bytes of every parameter leaf, in pytree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(to_host(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def param_name(path: tuple) -> str:
    """A parameter's readable name: its key path joined by '/' ("Dense_0/kernel", "w")."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flat_params(params: Any) -> dict[str, np.ndarray]:
    """{name: host array} of the parameters (what params.npz holds; see `param_name`)."""
    flat = jax.tree_util.tree_flatten_with_path(to_host(params))[0]
    return {param_name(path): leaf for path, leaf in flat}


def unflat_params(flat: dict[str, np.ndarray], like: Any) -> Any:
    """The pytree of `like` (e.g. `jax.eval_shape(model.init, key)`) with its leaves taken
    from `flat` by name, as `flat_params` wrote them.

    Raises:
      KeyError: a leaf of `like` has no array in `flat` (another model's parameters).
      ValueError: an array has the wrong shape.
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, want in paths:
        name = param_name(path)
        if name not in flat:
            raise KeyError(f"no parameter {name!r} (found {sorted(flat)})")
        got = np.asarray(flat[name])
        if got.shape != tuple(want.shape):
            raise ValueError(f"parameter {name!r} has shape {got.shape}, expected {want.shape}")
        leaves.append(got)
    return jax.tree_util.tree_unflatten(treedef, leaves)
