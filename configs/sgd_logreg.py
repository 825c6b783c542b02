"""Re-export of the shipped config jaxdml/configs/sgd_logreg.py (the configs live in the package,
so the installed `jaxdml train --config=sgd_logreg` finds them)."""

from jaxdml.configs.sgd_logreg import get_config

__all__ = ["get_config"]
