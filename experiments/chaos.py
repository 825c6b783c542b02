"""Chaos runs against a config: a matrix of injected fault plans (the default), or
signals sent from outside at seeded random moments (--mode=random).

  python -m experiments.chaos --config=configs/seed_logreg.py --workdir=runs/chaos
  python -m experiments.chaos --config=configs/seed_logreg.py --workdir=/tmp/c \
      --plans="nan@60;device_loss@100:3"
  python -m experiments.chaos --mode=random --config=configs/seed_logreg.py \
      --workdir=/tmp/r --seed=1 --faults=20 --kinds=SIGKILL,SIGTERM,SIGINT \
      --phases=any,save,restore --override=config.train.num_steps=6000 --out=/tmp/r.md
  python -m experiments.chaos --mode=random --launcher --config=configs/sgd_logreg.py ...

Each plan runs as `python -m experiments.train` processes, restarted until they
complete (hangs and kills end a process; the rerun resumes from its checkpoint).
Random mode runs the same command (under the 2 x 2 jaxdml.launch group with --launcher)
fault-free first, then with the faults; see jaxdml/chaos_random.py.
"""

import dataclasses
import json
import os
import signal
import sys

from absl import flags

from jaxdml import chaos, chaos_random, cli
from jaxdml.config import ConfigError

_CONFIG = flags.DEFINE_string("config", None, "Config file (with an optional :arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Base folder: one subfolder per plan.")
_PLANS = flags.DEFINE_string("plans", "", "';'-separated fault plans (default: the matrix).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra --config.x=y for every run.")
_MODE = flags.DEFINE_enum("mode", "matrix", ["matrix", "random"], "Injected plans or signals.")
_SEED = flags.DEFINE_integer("seed", 0, "Random mode: the schedule's seed.")
_FAULTS = flags.DEFINE_integer("faults", 10, "Random mode: how many faults.", lower_bound=0)
_KINDS = flags.DEFINE_list(
    "kinds",
    ["SIGKILL"],
    f"Random mode: signal kinds, drawn uniformly ({', '.join(chaos_random.KINDS)}; "
    "repeat one to weight it).",
)
_PHASES = flags.DEFINE_list(
    "phases", ["any"], f"Random mode: phases to aim at ({', '.join(chaos_random.PHASES)})."
)
_GAP = flags.DEFINE_list("gap", ["0.5", "3.0"], "Random mode: low,high seconds between faults.")
_LAUNCHER = flags.DEFINE_bool(
    "launcher",
    False,
    "Random mode: the 2 x 2 jaxdml.launch group (--hot_recovery); "
    "--nolauncher (default): one process, rerun until it completes.",
)
_HANG = flags.DEFINE_float("hang_secs", 120.0, "Random mode: no recovery this long = hung.")
_REFERENCE = flags.DEFINE_bool(
    "reference", True, "Random mode: run the config fault-free first and compare params."
)
_OUT = flags.DEFINE_string("out", "", "Random mode: also write the markdown table here.")
flags.mark_flags_as_required(["config", "workdir"])

# The launcher mode's group: loopback, hot recovery, grow back after 2 s.
LAUNCHER = (
    "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2", "--max_restarts=50",
    "--hot_recovery", "--grow_back_secs=2", "--grace_secs=10", "--failure_grace_secs=1",
    "--backoff_secs=0.1", "--",
)  # fmt: skip
# Short failure detection for the random mode (as tests/test_hot_recovery.py).
RANDOM_OVERRIDES = (
    "--config.checkpoint.every_steps=20",
    "--config.checkpoint.local_every_steps=5",
    "--config.distributed.heartbeat_timeout_secs=3",
    "--config.distributed.collective_timeout_secs=5",
    "--config.supervisor.watchdog_secs=15",
)


def main(argv: list[str]) -> None:
    del argv
    overrides = [o if o.startswith("--") else f"--{o}" for o in _OVERRIDES.value]
    if _MODE.value == "random":
        return random_mode(overrides)
    plans = [p for p in _PLANS.value.split(";") if p] or list(chaos.DEFAULT_PLANS)
    command = [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}", *overrides]
    outcomes = chaos.run_matrix(command, _WORKDIR.value, plans, progress=True)
    text = chaos.table(outcomes)
    print(text)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "chaos.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(_WORKDIR.value, "chaos.json"), "w") as f:
        json.dump([o.__dict__ for o in outcomes], f, indent=2)


def random_mode(overrides: list[str]) -> None:
    # A SIGTERM to the runner unwinds it, so that it stops the job it runs on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    train = ["-m", "experiments.train", f"--config={_CONFIG.value}", *RANDOM_OVERRIDES, *overrides]
    launcher = [sys.executable, *LAUNCHER] if _LAUNCHER.value else []
    command = [*launcher, sys.executable, *train]
    mode = "launcher" if _LAUNCHER.value else "single"
    try:
        gap = tuple(float(g) for g in _GAP.value)
        plan = chaos_random.schedule(
            _SEED.value, _FAULTS.value, _KINDS.value, _PHASES.value, gap=gap
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"random mode: {e}") from e
    records, summary = chaos_random.run_random(
        command, os.path.abspath(_WORKDIR.value), plan, mode, _SEED.value,
        reference=_REFERENCE.value, hang_secs=_HANG.value,
    )  # fmt: skip
    text = chaos_random.table(records, summary)
    print(text)
    for path in [os.path.join(_WORKDIR.value, "chaos_random.md"), _OUT.value]:
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
    with open(os.path.join(_WORKDIR.value, "chaos_random.json"), "w") as f:
        rows = [dataclasses.asdict(r) for r in records]
        json.dump({"summary": dataclasses.asdict(summary), "faults": rows}, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
