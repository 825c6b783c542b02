"""Trains one config: python -m experiments.train --config=configs/X.py --workdir=DIR."""

import sys

from absl import flags
from ml_collections import config_flags

import jaxdml
from jaxdml import cli, distributed
from jaxdml.constants import EXIT_GAVE_UP, EXIT_INTERRUPTED
from jaxdml.faults.errors import GaveUp
from jaxdml.metrics import EventLog

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (also where checkpoints live).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    try:
        result = jaxdml.train(cli.config_value(_CONFIG), _WORKDIR.value)
    except GaveUp as e:
        print(f"gave up: {e} (report: {_WORKDIR.value}/report.json)", file=sys.stderr)
        sys.exit(EXIT_GAVE_UP)
    if result.get("interrupted"):
        print(f"interrupted at step {result['steps']}: checkpoint saved; rerun to resume")
        sys.exit(EXIT_INTERRUPTED)
    if not distributed.is_coordinator():
        return  # process 0 reports for the job
    if result.get("preempted"):
        print(f"preempted at step {result['steps']}: checkpoint saved; rerun to resume")
        return
    print(cli.describe(result, EventLog.read(_WORKDIR.value)))


if __name__ == "__main__":
    cli.run(main)
