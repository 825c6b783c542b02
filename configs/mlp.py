"""Re-export of the shipped config jaxdml/configs/mlp.py (the configs live in the package,
so the installed `jaxdml train --config=mlp` finds them)."""

from jaxdml.configs.mlp import get_config

__all__ = ["get_config"]
