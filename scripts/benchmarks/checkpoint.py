"""Checkpoint blocking time: how long the training loop is blocked per save (async vs sync),
and the steady-state step-time overhead of saving every k steps vs not saving."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from .common import Context, Section, Settings, _median, _progress, _pyplot, _save, _table


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


def _restore_seconds(state, repeats: int) -> tuple[float, float]:
    """(median seconds to restore `state` from the memory tier, from the persistent tier):
    each tier saves it once, sealed, then restores it `repeats` times (read, placed on the
    device, checksum verified), as a warm and a cold restart would."""
    import jax

    from jaxdml.checkpoint import Checkpointer, fingerprint_hex
    from jaxdml.memory_tier import MemoryTier

    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    local = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folders = [
        tempfile.mkdtemp(prefix="bench_warm_", dir=local),
        tempfile.mkdtemp(prefix="bench_cold_"),
    ]
    tiers = [MemoryTier(os.path.join(folders[0], "t")), Checkpointer(os.path.join(folders[1], "t"))]
    try:
        out = []
        for tier in tiers:
            tier.save(1, state, {})
            tier.approve(1, fingerprint_hex(state))
            tier.wait()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                restored = tier.restore_step(1, abstract, {})
                jax.block_until_ready(restored[0])
                times.append(time.perf_counter() - t0)
            out.append(statistics.median(times))
            tier.close()
        return out[0], out[1]
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def run(ctx: Context) -> Section:
    """The checkpoint section: every state size of ctx.settings, a table and a bar plot."""
    s = ctx.settings
    data = [_measure(size, s) for size in _progress(s.ckpt_sizes_mb, "checkpoint sizes")]
    return Section("checkpoint", _body(s, data), {"sizes": data}, [_plot_checkpoint(ctx, data)])


def _measure(size: int, s: Settings) -> dict:
    """Blocking and committed seconds per save, async and sync, and the steady-state steps/s
    without saves and with a save every s.ckpt_every steps, for one `size` MB state."""
    state = _state(size)
    a_block, a_total = _blocking_seconds(state, True, s.ckpt_repeats)
    s_block, s_total = _blocking_seconds(state, False, s.ckpt_repeats)
    base, with_ck = [], []
    for _ in range(s.ckpt_repeats):  # interleaved, so drift hits both alike
        base.append(_steps_per_second(state, 0, s.ckpt_steps))
        with_ck.append(_steps_per_second(state, s.ckpt_every, s.ckpt_steps))
    warm, cold = _restore_seconds(state, s.ckpt_repeats)
    return {
        "size_mb": size,
        "restore_warm_s": warm,
        "restore_cold_s": cold,
        "async_blocked_s": a_block,
        "async_total_s": a_total,
        "sync_blocked_s": s_block,
        "sync_total_s": s_total,
        "steps_per_s_no_ckpt": _median(base),
        f"steps_per_s_ckpt_every_{s.ckpt_every}": _median(with_ck),
    }


def _body(s: Settings, data: list[dict]) -> str:
    rows = []
    for d in data:
        b, c = d["steps_per_s_no_ckpt"], d[f"steps_per_s_ckpt_every_{s.ckpt_every}"]
        rows.append(
            [
                f"{d['size_mb']} MB",
                f"{d['async_blocked_s']:.3f}",
                f"{d['sync_blocked_s']:.3f}",
                f"{d['async_blocked_s'] / d['sync_blocked_s']:.2f}",
                f"{d['async_total_s']:.3f}",
                f"{b:.1f}",
                f"{c:.1f}",
                f"{100 * (b / c - 1):+.1f}%",
            ]
        )
    return (
        f"One CPU device, local disk, medians of {s.ckpt_repeats} saves (after one warm-up "
        "save). *Blocked* is the time `Checkpointer.save` holds the training loop; "
        "*committed* is until the async save is on disk. The steady-state columns time a "
        f"jitted update loop of {s.ckpt_steps} steps with an async save every {s.ckpt_every} "
        "steps vs none (scripts/benchmarks/checkpoint.py).\n\n"
        + _table(
            [
                "state",
                "async blocked (s)",
                "sync blocked (s)",
                "async/sync",
                "async committed (s)",
                "steps/s no ckpt",
                f"steps/s ckpt every {s.ckpt_every}",
                "overhead",
            ],
            rows,
        )
    )


def _plot_checkpoint(ctx: Context, data: list[dict]) -> str:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = np.arange(len(data))
    ax.bar(x - 0.2, [d["async_blocked_s"] for d in data], 0.4, label="async: blocked")
    ax.bar(x + 0.2, [d["sync_blocked_s"] for d in data], 0.4, label="sync: blocked")
    ax.set_xticks(x, [f"{d['size_mb']} MB" for d in data])
    ax.set_yscale("log")
    ax.set_ylabel("seconds the loop waits per save")
    ax.legend(fontsize=8)
    return _save(fig, ctx.plot_path("checkpoint.png"))
