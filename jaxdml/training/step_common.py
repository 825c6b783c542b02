"""What every step shares: the step signature, the finiteness check, the metrics row,
and the step that consumes a set-aside batch. Both step modules (gradient, boosting)
import this one; it imports neither.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdml.config import ConfigError, parse_compiler_options
from jaxdml.mesh import replicated
from jaxdml.training.state import TrainState

# (state, batch) -> (next state, the packed metrics row: see METRICS)
StepFn = Callable[[TrainState, dict], tuple[TrainState, jax.Array]]
# (state, batches, k) -> (the state k steps later, their metrics rows [max_steps, METRICS])
FusedFn = Callable[[TrainState, dict, Any], tuple[TrainState, jax.Array]]


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


def unpack_rows(values: Any) -> list[dict]:
    """[{name: value}] of fetched metrics rows ([METRICS] or [n, METRICS]; counts as ints),
    converted to Python numbers in one call (the loop reads 25 rows per fetch)."""
    table = np.asarray(values, np.float64).reshape(-1, len(METRICS)).tolist()
    rows = [dict(zip(METRICS, row, strict=True)) for row in table]
    for row in rows:
        for k in _COUNTS:
            row[k] = int(row[k])
    return rows


def step_metrics(sums: dict, pos: dict, loss: jax.Array, ok: jax.Array, grad_norm, param_norm):
    """The per-step metrics row every step function returns, packed (`unpack_rows`
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


# What "auto" sets, by platform, for a step whose compilation outweighs its run: the
# full-batch L-BFGS step (its line search makes the program ~3x a GD step's; a fit runs
# tens of steps). Measured on XLA:CPU (jax 0.10.2, 4 simulated devices, 2 cores): without
# the fusion emitters that step at 200k x 20 compiles in ~0.7 s instead of ~1.2 s. Other
# steps keep XLA's defaults: without the emitters a 200k x 20 GD step ran 15-20% slower
# (394-414 vs 456-524 steps/s) and a GBDT round 1.6x slower (its scatter became a loop).
AUTO_COMPILE_BOUND_OPTIONS = {"cpu": {"xla_cpu_use_fusion_emitters": False}}


def compiler_options(setting: str, platform: str, compile_bound: bool) -> dict | None:
    """The XLA options of the step programs for `config.train.compiler_options`:
    'auto' (AUTO_COMPILE_BOUND_OPTIONS on `platform` for a `compile_bound` step, else
    none), '' (none) or 'key=value,...'."""
    if setting == "auto":
        return AUTO_COMPILE_BOUND_OPTIONS.get(platform) if compile_bound else None
    options = parse_compiler_options(setting) or None
    if options:  # an option XLA does not know fails here, not at the step's compilation
        _check_with_xla(setting)
    return options


@functools.cache
def _check_with_xla(setting: str) -> None:
    """Compiles a trivial program with the options, once per process (a mesh rebuilt in
    a recovery does not pay it again)."""
    try:
        jax.jit(_nothing, compiler_options=parse_compiler_options(setting)).lower().compile()
    except Exception as e:  # noqa: BLE001 -- XLA's error says which option
        msg = f"config.train.compiler_options: XLA refused {setting!r}: {e}"
        raise ConfigError(msg) from e


def _nothing() -> int:
    return 0


def make_skip_step(mesh: Mesh, advance: Advance, compiler_options: dict | None = None) -> StepFn:
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
    return jax.jit(skip, out_shardings=(rep, rep), compiler_options=compiler_options)


def make_fused_step(
    step_fn: StepFn,
    mesh: Mesh,
    max_steps: int,
    full_batch: bool,
    donate: bool = False,
    compiler_options: dict | None = None,
) -> FusedFn:
    """`k` <= `max_steps` steps of `step_fn` in one XLA call (`train.steps_per_call`).

    A small step (8k x 20 logistic regression on 4 CPU devices: 0.3 ms) costs the host
    as much to dispatch as the devices to run: one call per k steps pays it once. `k` is
    an argument (a while loop), so every k up to `max_steps` runs one compiled program.
    `batches` is the one full batch (`full_batch`) or `max_steps` batches stacked on a
    leading axis (`GlobalBatcher.next_many`; those past `k` are not read). Row i of the
    metrics is step i's packed row; rows past `k` are NaN.
    """
    width = len(METRICS)
    # The step's own function (jit's __wrapped__), traced into the loop: a jit nested in
    # another may not carry compiler options.
    step_fn = getattr(step_fn, "__wrapped__", step_fn)

    def fused(state: TrainState, batches: dict, k: jax.Array) -> tuple[TrainState, jax.Array]:
        def body(i, carry):
            state, rows = carry
            batch = batches if full_batch else jax.tree.map(lambda b: b[i], batches)
            state, row = step_fn(state, batch)
            return state, rows.at[i].set(row)

        rows = jnp.full((max_steps, width), jnp.nan, jnp.float32)
        return jax.lax.fori_loop(0, k, body, (state, rows))

    rep = replicated(mesh)
    donated = (0,) if donate else ()
    return jax.jit(
        fused, out_shardings=(rep, rep), donate_argnums=donated, compiler_options=compiler_options
    )


def compile_together(programs: list, *beside: Callable[[], Any]) -> None:
    """Compiles lowered programs side by side, and runs `beside` meanwhile: XLA compiles
    without holding the GIL, so on a machine with idle cores the programs after the
    first cost little more than the first (the trainer's warm-up: 0.3-0.6 s of a GBDT or
    L-BFGS start-up on 2 cores)."""
    with concurrent.futures.ThreadPoolExecutor(len(programs) + len(beside)) as pool:
        futures = [pool.submit(p.compile) for p in programs] + [pool.submit(f) for f in beside]
        for future in futures:
            future.result()
