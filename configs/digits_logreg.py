"""Re-export of the shipped config jaxdml/configs/digits_logreg.py (the configs live in the package,
so the installed `jaxdml train --config=digits_logreg` finds them)."""

from jaxdml.configs.digits_logreg import get_config

__all__ = ["get_config"]
