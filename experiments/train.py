"""Trains one config: python -m experiments.train --config=configs/X.py --workdir=DIR.

--dry_run       resolve the config (file + overrides), validate it, print it, exit 0
--mode=eval     score the workdir's newest valid checkpoint (eval.json, params.npz)
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

import jaxdml
from jaxdml import cli, distributed
from jaxdml.constants import EXIT_GAVE_UP, EXIT_INTERRUPTED
from jaxdml.faults.errors import GaveUp
from jaxdml.metrics import EventLog

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
__doc__ += "\n" + cli.config_listing(CONFIGS) + "\n"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (also where checkpoints live).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate and print the config; train nothing.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"],
    "train, or eval: score the newest valid checkpoint of --workdir (eval.json, params.npz).",
)  # fmt: skip
_EVAL_DATA = flags.DEFINE_string(
    "eval_data", "", "--mode=eval: a .npz file (X, y) to score instead of the test split."
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    del argv
    config = jaxdml.validate(cli.config_value(_CONFIG))
    if _DRY_RUN.value:
        print(config)
        return
    if not _WORKDIR.value:
        raise jaxdml.ConfigError("--workdir is required (except with --dry_run)")
    if _MODE.value == "eval":
        print(cli.describe_eval(jaxdml.evaluate(config, _WORKDIR.value, _EVAL_DATA.value)))
        return
    try:
        result = jaxdml.train(config, _WORKDIR.value)
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
