"""GPU/TPU mode (`bench.py --gpu`): jaxdml's GD step time vs the memory-bandwidth floor."""

from __future__ import annotations

import json
import os
import time

from .common import _median, _table


def gpu_figures(out: str, any_backend: bool) -> int:
    """GD step time vs the memory-bandwidth floor on the first GPU/TPU; writes
    out/gpu_<device>.md and .json. Returns the exit status (0 also when there is none)."""
    import jax

    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm", "tpu") and not any_backend:
        print(f"--gpu: no GPU or TPU available (JAX backend: {backend}); nothing measured.")
        return 0
    device = jax.devices()[0]
    small = backend == "cpu"
    bandwidth = _copy_bandwidth(device, 2**24 if small else 2**28)
    rows_list = (20_000, 200_000) if small else (100_000, 1_000_000, 10_000_000, 40_000_000)
    points = [_gpu_step(device, rows, 128, bandwidth) for rows in rows_list]
    name = device.device_kind.replace(" ", "_").replace("/", "_")
    body = _table(
        ["rows", "features", "X GB", "step ms", "floor ms (X / bandwidth)", "step / floor"],
        [
            [
                p["rows"],
                p["features"],
                f"{p['x_bytes'] / 1e9:.3f}",
                f"{1e3 * p['step_s']:.3f}",
                f"{1e3 * p['floor_s']:.3f}",
                f"{p['step_s'] / p['floor_s']:.2f}",
            ]
            for p in points
        ],
    )
    text = (
        f"# GD step vs memory-bandwidth floor: {device.device_kind}\n\n"
        f"`python scripts/bench.py --gpu`, {time.strftime('%Y-%m-%d %H:%M')}, JAX "
        f"{jax.__version__}, backend {backend}, device {device}.\n\n"
        f"Measured copy bandwidth (jitted `a + 1` over {bandwidth['bytes'] / 1e9:.2f} GB, "
        f"read + write counted, median of 10): **{bandwidth['gb_per_s']:.0f} GB/s**.\n\n"
        "The floor is the time to read X once at that bandwidth; the step (jaxdml's "
        "full-batch GD step on one device, float32, median of 20 after warm-up) reads X "
        "for the forward pass and again for the gradient unless XLA fuses them, so a "
        "ratio near 2 is already bandwidth-bound.\n\n" + body + "\n"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"gpu_{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"gpu_{name}.json"), "w") as f:
        json.dump(
            {"device": device.device_kind, "bandwidth": bandwidth, "points": points}, f, indent=2
        )
    print(text)
    return 0


def _copy_bandwidth(device, n: int) -> dict:
    """Device memory bandwidth from a jitted `a + 1` over n float32 (read + write counted),
    its buffer donated so that each call reuses the memory instead of allocating."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    a = f(jax.device_put(jnp.zeros((n,), jnp.float32), device)).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        a = f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    nbytes = 2 * n * 4
    return {"bytes": nbytes, "seconds": _median(times), "gb_per_s": nbytes / _median(times) / 1e9}


def _gpu_step(device, rows: int, features: int, bandwidth: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdml.mesh import data_sharded, make_mesh
    from jaxdml.models.linear import LinearModel
    from jaxdml.training.state import init_state
    from jaxdml.training.step import make_gradient_step

    mesh = make_mesh([device])
    model, opt = LinearModel(features, 2), optax.sgd(0.1)
    full_batch = lambda pos: {"epoch": pos["epoch"] + 1, "index": pos["index"]}  # noqa: E731
    step = make_gradient_step(model, opt, mesh, full_batch, donate=True)
    state = init_state(model, opt, 0, mesh)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    sharded = data_sharded(mesh)
    x = jax.jit(lambda k: jax.random.normal(k, (rows, features)), out_shardings=sharded)(k1)
    y = jax.jit(
        lambda k: jax.random.bernoulli(k, 0.5, (rows,)).astype(jnp.int32), out_shardings=sharded
    )(k2)
    w = jax.device_put(jnp.ones((rows,), jnp.float32), sharded)
    batch = {"x": x, "y": y, "w": w}
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    x_bytes = rows * features * 4
    step_s = _median(times)
    return {
        "rows": rows,
        "features": features,
        "x_bytes": x_bytes,
        "step_s": step_s,
        "floor_s": x_bytes / (bandwidth["gb_per_s"] * 1e9),
    }
