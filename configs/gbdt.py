"""Re-export of the shipped config jaxdml/configs/gbdt.py (the configs live in the package,
so the installed `jaxdml train --config=gbdt` finds them)."""

from jaxdml.configs.gbdt import get_config

__all__ = ["get_config"]
