"""Runs a matrix of fault plans against a config and prints the chaos table.

  python -m experiments.chaos --config=configs/seed_logreg.py --workdir=runs/chaos
  python -m experiments.chaos --config=configs/seed_logreg.py --workdir=/tmp/c \
      --plans="nan@60;device_loss@100:3"

Each plan runs as `python -m experiments.train` processes, restarted until they
complete (hangs and kills end a process; the rerun resumes from its checkpoint).
"""

import json
import os
import sys

from absl import flags

from jaxdml import chaos, cli

_CONFIG = flags.DEFINE_string("config", None, "Config file (with an optional :arg).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Base folder: one subfolder per plan.")
_PLANS = flags.DEFINE_string("plans", "", "';'-separated fault plans (default: the matrix).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Extra --config.x=y for every run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    plans = [p for p in _PLANS.value.split(";") if p] or list(chaos.DEFAULT_PLANS)
    command = [sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}"]
    command += [o if o.startswith("--") else f"--{o}" for o in _OVERRIDES.value]
    outcomes = chaos.run_matrix(command, _WORKDIR.value, plans)
    text = chaos.table(outcomes)
    print(text)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "chaos.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(_WORKDIR.value, "chaos.json"), "w") as f:
        json.dump([o.__dict__ for o in outcomes], f, indent=2)


if __name__ == "__main__":
    cli.run(main)
