"""Re-export of the shipped config jaxdml/configs/regression.py."""

from jaxdml.configs.regression import get_config

__all__ = ["get_config"]
