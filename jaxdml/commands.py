"""The installed `jaxdml` command: `jaxdml train --config=NAME_OR_PATH --workdir=DIR`.

`--config` takes a shipped config's name (jaxdml/configs: seed_logreg, mlp, ...) or a
config file's path, each with an optional `:arg` variant; `--config.<field>=<value>`
overrides any field. `python -m experiments.train` in the repository is the same main.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxdml import cli, configs

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

CONFIG_DIR = os.path.dirname(os.path.abspath(configs.__file__))

USAGE = "usage: jaxdml train --config=NAME_OR_PATH[:arg] --workdir=DIR [--config.FIELD=VALUE ...]"


def train_main(argv: list[str]) -> None:
    """Trains one config (the absl main of `jaxdml train` and `experiments.train`)."""
    del argv
    import jaxdml
    from jaxdml import distributed
    from jaxdml.constants import EXIT_GAVE_UP, EXIT_INTERRUPTED
    from jaxdml.faults.errors import GaveUp
    from jaxdml.metrics import EventLog

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


def resolve_config_flags(args: list[str]) -> list[str]:
    """`--config=NAME[:arg]` (or `--config NAME`) of a shipped config -> its file's path;
    a path that exists is left as it is."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            prefix, value = "--config=", arg[len("--config=") :]
        elif arg == "--config" and i + 1 < len(out):
            prefix, value, i = "", out[i + 1], i + 1
        else:
            continue
        spec, colon, variant = value.partition(":")
        shipped = configs.path_of(spec)
        if shipped and not os.path.exists(spec):
            out[i] = f"{prefix}{shipped}{colon}{variant}"
    return out


def main() -> None:
    """Entry point of the `jaxdml` console script."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE + "\n" + cli.config_listing(CONFIG_DIR))
        sys.exit(0 if args else 2)
    if args[0] != "train":
        print(f"error: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"{os.path.basename(sys.argv[0])} train", *resolve_config_flags(args[1:])]
    cli.run(train_main, training=True)


if __name__ == "__main__":
    main()
