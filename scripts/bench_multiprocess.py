"""Where the time of a 2 x 2 step goes: sgd_logreg on 1 process x 4 devices against
2 processes x 2 devices (jaxdml.launch on loopback), supervisor on and off, beside a
bare loop of the step's one cross-device reduction (a jitted shard_map psum of the
gradient's size, waited for at each iteration) on both layouts.

  python scripts/bench_multiprocess.py [--steps=600] [--repeats=3] [--out=FILE.md]

Step time is the median interval between finished steps in metrics.jsonl (process 0),
the first 20 steps (compilation, warm-up) left out; the layouts are interleaved, and
each figure is the median over the repeats.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of each run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats of every layout.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown table here.")
_WORKER = flags.DEFINE_integer("worker_iters", 0, "Internal: time this many psums and exit.")

LAUNCH = [
    sys.executable, "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2",
    "--max_restarts=0", "--",
]  # fmt: skip


def _train(workdir: str, steps: int, supervisor: bool, launched: bool, span: int = 0) -> float:
    """Median step seconds of one run; `span` > 0: hot recovery (recoverable mode, steps
    in live_devices transactions of `span` steps)."""
    cmd = [
        sys.executable, "-m", "experiments.train", "--config=configs/sgd_logreg.py",
        f"--workdir={workdir}", f"--config.train.num_steps={steps}",
        "--config.train.progress=false", f"--config.supervisor.enabled={supervisor}",
        f"--config.distributed.steps_per_transaction={max(1, span)}",
    ]  # fmt: skip
    launch = [*LAUNCH[:-1], "--hot_recovery", "--"] if span else LAUNCH
    subprocess.run((launch if launched else []) + cmd, cwd=REPO, check=True,
                   capture_output=True, timeout=900)  # fmt: skip
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return statistics.median(r["seconds"] for r in rows[20:])


def _psum(launched: bool, iters: int) -> float:
    """Median seconds of one waited-for psum (its value: the bench's worker line)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker_iters={iters}"]
    env = {**os.environ, "JAXDML_NUM_CPU_DEVICES": "2" if launched else "4"}
    out = subprocess.run((LAUNCH if launched else []) + cmd, cwd=REPO, check=True,
                         capture_output=True, text=True, env=env, timeout=600).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if "psum_seconds" in x)
    return json.loads(line[line.index("{") :])["psum_seconds"]


def _worker(iters: int) -> None:
    """One process of the psum loop: the gradient of sgd_logreg (20 weights + bias) and
    the step's packed metrics (8 values), reduced over every device of the job."""
    sys.path.insert(0, REPO)
    from configs import sgd_logreg
    from jaxdml import distributed

    config = sgd_logreg.get_config()
    config.supervisor.enabled = False
    distributed.initialize(config)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = distributed.default_devices(config)
    mesh = Mesh(np.array(devices), ("data",))
    width = config.data.n_features + 1 + 8
    reduce = jax.jit(
        jax.shard_map(
            lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
        )  # fmt: skip
    )
    shards = [jax.device_put(np.ones((1, width), np.float32), d) for d in mesh.local_devices]
    x = jax.make_array_from_single_device_arrays(
        (len(devices), width), NamedSharding(mesh, P("data")), shards
    )
    jax.block_until_ready(reduce(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(reduce(x))
        times.append(time.perf_counter() - t0)
    if distributed.is_coordinator():
        print("psum_seconds " + json.dumps({"psum_seconds": statistics.median(times)}))
    if jax.process_count() > 1:
        distributed.shutdown(60)


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        return _worker(_WORKER.value)
    layouts = {
        "1 x 4, supervisor on": (True, False, 0),
        "1 x 4, supervisor off": (False, False, 0),
        "2 x 2, supervisor on": (True, True, 0),
        "2 x 2, supervisor off": (False, True, 0),
        "2 x 2, supervisor on, hot recovery, span 1": (True, True, 1),
        "2 x 2, supervisor on, hot recovery, span 10": (True, True, 10),
    }
    steps = {k: [] for k in layouts}
    psums = {"1 x 4": [], "2 x 2": []}
    for r in range(_REPEATS.value):
        for name, (supervisor, launched, span) in layouts.items():
            with tempfile.TemporaryDirectory() as work:
                steps[name].append(_train(work, _STEPS.value, supervisor, launched, span))
        for name in psums:
            psums[name].append(_psum(name == "2 x 2", 2000))
        print(f"repeat {r + 1}/{_REPEATS.value} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in steps.items()}
    psum = {k: statistics.median(v) for k, v in psums.items()}
    lines = [
        f"sgd_logreg, {_STEPS.value} steps, medians of {_REPEATS.value} interleaved repeats "
        "(2 CPU cores; 2 x 2 = two processes on loopback, gloo collectives)",
        "",
        "| layout | step ms | vs 1 x 4 (same supervisor) | one psum ms (bare loop) |",
        "|---|---:|---:|---:|",
    ]
    for name, value in med.items():
        base = med["1 x 4, supervisor " + name.split(", ")[1].rsplit(" ", 1)[1]]
        lines.append(
            f"| {name} | {1e3 * value:.2f} | {value / base:.2f} "
            f"| {1e3 * psum[name.split(',')[0]]:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
