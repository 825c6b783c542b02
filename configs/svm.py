"""Re-export of the shipped config jaxdml/configs/svm.py (the configs live in the package,
so the installed `jaxdml train --config=svm` finds them)."""

from jaxdml.configs.svm import get_config

__all__ = ["get_config"]
