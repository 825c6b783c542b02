"""The replica fingerprint's cost: jaxdml's one-pass hash against the two-pass form it
replaced, on a replicated state of a real model's size (wide_mlp: 205 MB) over 4
simulated CPU devices, side by side and interleaved; medians of --repeats.

  python scripts/bench_fingerprint.py [--mb=205] [--repeats=5]

Both forms give the same fingerprint (checked): the one-pass form computes the two
wrapped sums in one variadic reduction, where two `jnp.sum`s made XLA:CPU read the
state twice. Each save and each replica check computes one fingerprint per replica.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

_MB = flags.DEFINE_integer("mb", 205, "State size in MB (float32).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repeats.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Simulated CPU devices (replicas).")


def two_pass(tree):
    """The fingerprint as it was until 2026-12-01: two `jnp.sum`s per leaf (the baseline)."""
    import jax
    import jax.numpy as jnp

    from jaxdml.faults import detect

    k1, k2, k3 = (jnp.uint32(k) for k in (detect._K1, detect._K2, detect._K3))
    h = jnp.zeros((2,), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        bits = detect._leaf_bits(leaf)
        pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        a = jnp.sum((bits ^ (pos * k1)) * k2, dtype=jnp.uint32)
        b = jnp.sum((bits + pos * k3) ^ (bits >> 7), dtype=jnp.uint32)
        salt = jnp.uint32(i + 1) * k3
        h = h + jnp.stack([a ^ salt, b * (salt | jnp.uint32(1))])
    return h


def _per_replica(fingerprint, mesh):
    """`fingerprint` of each device's own copy, as jaxdml.faults.detect.replica_fingerprints."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    axis, num = mesh.axis_names[0], mesh.devices.size

    def local(t):
        fp = fingerprint(jax.lax.pcast(t, axis, to="varying"))
        mine = (jnp.arange(num) == jax.lax.axis_index(axis))[:, None]
        return jax.lax.psum(jnp.where(mine, fp[None, :], jnp.uint32(0)), axis)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P()))


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdml.faults import detect

    mesh = jax.make_mesh((_DEVICES.value,), ("data",), devices=jax.devices()[: _DEVICES.value])
    words = _MB.value * 2**20 // 4
    side = 2048
    tree = {  # matrices and a remainder vector, like a model's leaves
        "w1": jnp.full((side, side), 0.5, jnp.float32),
        "w2": jnp.arange(side * side, dtype=jnp.float32).reshape(side, side),
        "rest": jnp.linspace(-1.0, 1.0, max(1, words - 2 * side * side), dtype=jnp.float32),
    }
    tree = jax.device_put(tree, NamedSharding(mesh, P()))
    forms = {"two-pass (baseline)": _per_replica(two_pass, mesh),
             "one-pass (jaxdml)": _per_replica(detect.fingerprint, mesh)}  # fmt: skip
    values = [np.asarray(f(tree)) for f in forms.values()]  # compiles both
    assert all((v == values[0]).all() for v in values), "the forms disagree"
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for r in range(_REPEATS.value):
        order = list(forms) if r % 2 == 0 else list(forms)[::-1]
        for name in order:
            t0 = time.perf_counter()
            forms[name](tree).block_until_ready()
            seconds[name].append(time.perf_counter() - t0)
    base, ours = (statistics.median(v) for v in seconds.values())
    print(f"{_MB.value} MB state x {_DEVICES.value} replicas, medians of {_REPEATS.value}:")
    for name, v in seconds.items():
        print(f"  {name}: {1e3 * statistics.median(v):.0f} ms")
    print(f"  one-pass / two-pass: {ours / base:.2f} (the same fingerprints)")


if __name__ == "__main__":
    app.run(main)
