"""Trains one config: python -m experiments.train --config=configs/X.py --workdir=DIR.

The same main as the installed `jaxdml train` command (jaxdml/commands.py), which also
takes a shipped config by name (--config=seed_logreg).

--dry_run       resolve the config (file + overrides), validate it, print it, exit 0
--mode=eval     score the workdir's newest valid checkpoint (eval.json, params.npz)
"""

import sys

from jaxdml import cli
from jaxdml.commands import CONFIG_DIR, resolve_config_flags, train_main

__doc__ += "\n" + cli.config_listing(CONFIG_DIR) + "\n"

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resolve_config_flags(sys.argv[1:])]
    cli.run(train_main, training=True)
