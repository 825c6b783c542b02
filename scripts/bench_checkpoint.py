"""Checkpoint cost: how long the training loop is blocked per save (async vs sync), and
the steady-state step-time overhead of saving every k steps vs not saving.

  python scripts/bench_checkpoint.py                      # 10 MB, 100 MB, 1 GB states
  python scripts/bench_checkpoint.py --sizes_mb=10 --repeats=2

Medians over --repeats; one run measures async and sync side by side. Prints a
markdown table (pasted into the README).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes_mb", ["10", "100", "1000"], "State sizes in MB.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Saves measured per mode (median reported).")
_EVERY = flags.DEFINE_integer("every", 10, "Steady-state test: save every k steps.")
_STEPS = flags.DEFINE_integer("steps", 60, "Steady-state test: steps per measurement.")


def _state(size_mb: int):
    import jax.numpy as jnp

    n = size_mb * 2**20 // 4
    return {"params": {"w": jnp.ones((n,), jnp.float32)}, "step": jnp.zeros((), jnp.int32)}


def _blocking_seconds(state, async_save: bool, repeats: int) -> tuple[float, float]:
    """(median seconds the caller is blocked per save, median seconds until committed)."""
    from jaxdml.checkpoint import Checkpointer

    blocked, total = [], []
    workdir = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        ck = Checkpointer(workdir, max_to_keep=2, async_save=async_save)
        for step in range(repeats + 1):  # the first save warms up compilation
            t0 = time.perf_counter()
            ck.save(step, state, {})
            t1 = time.perf_counter()
            ck.wait()
            t2 = time.perf_counter()
            if step:
                blocked.append(t1 - t0)
                total.append(t2 - t0)
        ck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return statistics.median(blocked), statistics.median(total)


def _steps_per_second(state, every: int, steps: int) -> float:
    """Steps/s of a jitted update loop with an async save every `every` steps (0: none)."""
    import jax

    from jaxdml.checkpoint import Checkpointer

    update = jax.jit(
        lambda s: {"params": {"w": s["params"]["w"] * 0.999 + 1e-3}, "step": s["step"] + 1}
    )
    workdir = tempfile.mkdtemp(prefix="bench_loop_")
    try:
        ck = Checkpointer(workdir, max_to_keep=2, async_save=True)
        state = jax.block_until_ready(update(state))
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            state = update(state)
            if every and i % every == 0:
                ck.save(i, state, {})
            jax.block_until_ready(state)
        ck.wait()
        elapsed = time.perf_counter() - t0
        ck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return steps / elapsed


def main(argv):
    del argv
    from jaxdml.cli import quiet_library_logs

    quiet_library_logs()
    print(
        "| state | async: blocked per save (s) | sync: blocked per save (s) | async/sync "
        f"| steps/s no ckpt | steps/s ckpt every {_EVERY.value} | overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in map(int, _SIZES.value):
        state = _state(size)
        a_block, _ = _blocking_seconds(state, True, _REPEATS.value)
        s_block, _ = _blocking_seconds(state, False, _REPEATS.value)
        base, with_ck = [], []
        for _ in range(_REPEATS.value):  # interleaved, so drift hits both alike
            base.append(_steps_per_second(state, 0, _STEPS.value))
            with_ck.append(_steps_per_second(state, _EVERY.value, _STEPS.value))
        b, c = statistics.median(base), statistics.median(with_ck)
        print(
            f"| {size} MB | {a_block:.3f} | {s_block:.3f} | {a_block / s_block:.2f} "
            f"| {b:.1f} | {c:.1f} | {100 * (b / c - 1):+.1f}% |",
            flush=True,
        )
        del state


if __name__ == "__main__":
    app.run(main)
