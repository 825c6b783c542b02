"""Trains one config: python -m experiments.train --config=configs/X.py --workdir=DIR.

The same main as the installed `jaxdml train` command (jaxdml/commands.py), which also
takes a shipped config by name (--config=seed_logreg).
"""

import sys

from jaxdml import cli
from jaxdml.commands import resolve_config_flags, train_main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resolve_config_flags(sys.argv[1:])]
    cli.run(train_main)
