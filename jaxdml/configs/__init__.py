"""The shipped configs, by name: `load("seed_logreg")`, `load("mlp:smoke")`, or a path.

Each module here has `get_config(arg="")` returning a ConfigDict built on
`jaxdml.config.default_config()`; the `jaxdml train --config=NAME` command and
`jaxdml.load_config` find them by name from any folder once jaxdml is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import ml_collections

from jaxdml.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configs' names."""
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f[0] != "_")


def path_of(name: str) -> str | None:
    """The file of shipped config `name` (None if there is none)."""
    return os.path.join(HERE, f"{name}.py") if name in names() else None


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """The ConfigDict of a shipped config name or a config file path, each with an
    optional ':arg' (a variant such as 'smoke').

    Raises:
      ConfigError: no such shipped config or file.
    """
    spec, _, arg = name_or_path.partition(":")
    if os.path.exists(spec):
        loader = importlib.util.spec_from_file_location("_jaxdml_user_config", spec)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    elif spec in names():
        module = importlib.import_module(f"jaxdml.configs.{spec}")
    else:
        raise ConfigError(
            f"config {spec!r} is neither a file nor a shipped config (one of {names()})"
        )
    return module.get_config(arg) if arg else module.get_config()
