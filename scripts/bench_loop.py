"""The training loop's own host work per step: `jaxdml.training.loop.Loop` around a step that
does nothing (it returns its state and a metrics row that is ready), so that all the time
is the loop's, against a bare Python loop at the same dispatch depth around the same
no-op step; interleaved repeats, medians.

  python scripts/bench_loop.py [--steps=20000] [--repeats=5] [--devices=4]

The trainer is configs/seed_logreg.py's (dispatch depth 4) on 2000 generated rows.
Rows: the bare loop; the Loop alone (a dispatch-depth queue, the bulk metrics fetch every
`train.fetch_every` steps, the rows); the Loop with the hooks of a plain `Trainer.fit()`
(fault injector, accounting and goodput record, evaluation rows, checkpoint schedules,
replica verdicts, metrics.jsonl, progress). The step a real run dispatches costs the host
more (a jitted call: ~60 us on one CPU device); what this measures is what the loop adds
to it, the time a small step's devices wait for (8k x 20 on 4 CPU devices: ~0.35 ms a
step). Noise on a shared machine moves single runs by 10-20%; the medians of interleaved
repeats are the figures.
"""

from __future__ import annotations

import collections
import shutil
import statistics
import tempfile
import time

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 20000, "Steps per timed loop.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repeats.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Simulated CPU devices.")


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    from jaxdml.configs.seed_logreg import get_config
    from jaxdml.training.loop import Loop
    from jaxdml.training.trainer import Trainer

    steps = _STEPS.value
    config = get_config()
    config.data.source, config.data.n_samples = "synthetic", 2000
    config.train.num_steps = steps
    config.train.log_every = 10**9
    config.supervisor.enabled = False
    config.checkpoint.every_steps = 0
    workdir = tempfile.mkdtemp(prefix="jaxdml_bench_loop_")
    trainer = Trainer(config, workdir, devices=jax.devices()[: _DEVICES.value])
    state = trainer.restore_or_init()
    batch, _ = trainer.batcher.next(jax.device_get(state.data_pos), trainer.mesh)
    _, row = trainer.step_fn(state, batch)  # a real metrics row, ready
    row.block_until_ready()
    depth, fetch_every = config.train.dispatch_depth, config.train.fetch_every

    def noop(state, batch):
        del batch
        return state, row

    def bare() -> float:
        inflight: collections.deque = collections.deque()
        t0 = time.perf_counter()
        for _ in range(steps):
            if len(inflight) >= depth:
                inflight.popleft().block_until_ready()
            _, metrics = noop(state, batch)
            inflight.append(metrics)
        return time.perf_counter() - t0

    def loop(hooks: list) -> float:
        t0 = time.perf_counter()
        Loop(noop, trainer.batcher, trainer.mesh, steps, hooks=hooks, dispatch_depth=depth,
             fetch_every=fetch_every).run(state)  # fmt: skip
        return time.perf_counter() - t0

    kinds = {
        "bare Python loop": bare,
        "Loop, no hooks": lambda: loop([]),
        "Loop, plain Trainer.fit() hooks": lambda: loop(
            trainer._hooks(checkpoints=True, supervised=False)
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(_REPEATS.value):
        for name in kinds if r % 2 == 0 else list(kinds)[::-1]:
            seconds[name].append(kinds[name]())
    trainer.close()
    shutil.rmtree(workdir, ignore_errors=True)
    head = f"{steps} no-op steps on {_DEVICES.value} CPU devices, dispatch depth {depth}"
    print(f"{head}, fetch every {fetch_every}, medians of {_REPEATS.value} interleaved repeats:\n")
    print("| loop | us per step | runs (us per step) |\n|---|---|---|")
    for name, values in seconds.items():
        each = ", ".join(f"{1e6 * v / steps:.1f}" for v in values)
        print(f"| {name} | {1e6 * statistics.median(values) / steps:.1f} | {each} |")


if __name__ == "__main__":
    app.run(main)
