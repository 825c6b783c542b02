"""Re-export of the shipped config jaxdml/configs/seed_logreg.py (the configs live in the package,
so the installed `jaxdml train --config=seed_logreg` finds them)."""

from jaxdml.configs.seed_logreg import get_config

__all__ = ["get_config"]
