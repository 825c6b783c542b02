"""Re-export of the shipped config jaxdml/configs/wide_mlp.py (the configs live in the
package, so the installed `jaxdml train --config=wide_mlp` finds them)."""

from jaxdml.configs.wide_mlp import get_config

__all__ = ["get_config"]
