"""Every jaxdml benchmark in one command: results/benchmarks.md plus PNG plots.

  python scripts/bench.py                  # the full suite (about half an hour on 2 CPU cores)
  python scripts/bench.py --quick          # reduced sizes, under 3 minutes (CI smoke test)
  python scripts/bench.py --only=overhead,scaling --out=/tmp/results
  python scripts/bench.py --only=models --set=models_repeats=5 --set=models_only=gbdt
  python scripts/bench.py --gpu            # GD step time vs the memory-bandwidth floor (GPU/TPU)

Sections (each one heading of benchmarks.md and one module of scripts/benchmarks/; a
section that fails says so there and the command exits 1 after writing everything else):

  overhead    steps/s of the supervised Trainer with every protection on vs a bare
              hand-written jitted shard_map loop on the same model and data (and vs
              the unprotected Trainer), at one and at K steps per call
              (train.steps_per_call); repeats interleaved, median ratio
  checkpoint  seconds the loop is blocked per save, async vs sync, and the steady-state
              steps/s with a save every few steps vs none
  recovery    recovery seconds and lost steps per fault kind, in-process (hot) vs
              process restart (cold), through jaxdml.chaos; then a host loss on 2
              processes, hot vs cold (jaxdml.launch)
  goodput     a run with a fault every 30 s for 5 minutes vs the same run without
              faults, restarted like a scheduler would (jaxdml.chaos.run_plan)
  models      speed and accuracy vs scikit-learn / XGBoost, in a fresh process
  scaling     step time and peak memory vs rows (1e4 .. 1e6) and vs simulated device
              count (1 .. 8), one subprocess per point, with log-log slopes

results/benchmarks.json holds the raw numbers of every section. The sizes of a run are
scripts/benchmarks/common.py's FULL or QUICK Settings; --set=FIELD=VALUE changes one.
Python puts this script's folder on sys.path, so `benchmarks` imports as a package; jaxdml
is the installed package (`pip install -e .`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from benchmarks import checkpoint, common, goodput, gpu, models, overhead, recovery, scaling

RUNNERS = {
    "overhead": overhead.run,
    "checkpoint": checkpoint.run,
    "recovery": recovery.run,
    "goodput": goodput.run,
    "models": models.run,
    "scaling": scaling.run,
}
assert tuple(RUNNERS) == common.SECTIONS  # the report's order and titles

_OUT = flags.DEFINE_string("out", "results", "Folder for benchmarks.md, .json and the PNGs.")
_QUICK = flags.DEFINE_bool("quick", False, "Reduced sizes (< 3 min): a smoke test, not numbers.")
_ONLY = flags.DEFINE_list("only", list(RUNNERS), f"Sections to run, from {list(RUNNERS)}.")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE: one field of the run's Settings.")
_GPU = flags.DEFINE_bool("gpu", False, "Only the GPU/TPU figure: GD step vs bandwidth floor.")
_GPU_ANY = flags.DEFINE_bool("gpu_any_backend", False, "--gpu on any backend (tests its code).")
_KEEP = flags.DEFINE_bool("keep_work", False, "Keep the runs' work folder (printed at the end).")
_WORKER = flags.DEFINE_enum(
    "worker", "", ["", "scaling", "models"], "Internal: run one scaling point or the models table."
)
_W_ROWS = flags.DEFINE_integer("worker_rows", 10_000, "Internal: rows of the scaling point.")
_W_DEVICES = flags.DEFINE_integer("worker_devices", 1, "Internal: devices of the worker.")
_W_SECONDS = flags.DEFINE_float("worker_seconds", 1.0, "Internal: seconds of timed steps.")
_W_REPEATS = flags.DEFINE_integer("worker_repeats", 3, "Internal: repeats of the models table.")
_W_MODELS = flags.DEFINE_list("worker_models", [], "Internal: models of the table (all: empty).")
_W_DATA = flags.DEFINE_list("worker_data", [], "Internal: data sets of the table (all: empty).")


def _worker() -> None:
    """One measurement in this fresh process: a scaling point (JSON on stdout) or the
    models table (markdown on stdout)."""
    if _WORKER.value == "scaling":
        print(json.dumps(scaling.scaling_point(_W_ROWS.value, _W_DEVICES.value, _W_SECONDS.value)))
    else:
        only, data = _W_MODELS.value or None, _W_DATA.value or None
        models.worker(models.Args(_W_REPEATS.value, _W_DEVICES.value, only, data))


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if _WORKER.value:
        _worker()
        return
    os.chdir(common.REPO)  # chaos runs start `python -m experiments.train` from the checkout
    out = os.path.abspath(os.path.join(_START_DIR, _OUT.value))
    if _GPU.value:
        sys.exit(gpu.gpu_figures(out, _GPU_ANY.value))
    unknown = sorted(set(_ONLY.value) - set(RUNNERS))
    if unknown:
        raise app.UsageError(f"--only: unknown sections {unknown}; choose from {list(RUNNERS)}")
    try:
        settings = common.with_overrides(common.QUICK if _QUICK.value else common.FULL, _SET.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    runners = {n: run for n, run in RUNNERS.items() if n in _ONLY.value}
    sys.exit(common.run_all(out, runners, settings, _QUICK.value, _KEEP.value))


_START_DIR = os.getcwd()

if __name__ == "__main__":
    app.run(main)
