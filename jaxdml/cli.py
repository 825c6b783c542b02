"""Shared plumbing for the absl entry points in experiments/: clean exits for bad input,
and the result table they print."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags, logging

from jaxdml.config import ConfigError
from jaxdml.constants import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from jaxdml.faults import detect


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad flag, config file or override is exit status 2.

    A config file is Python: one that is missing, does not parse or raises while building
    its ConfigDict is bad input like an unknown flag, so any error here is one line.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for an override of a field that does not exist.
        _fail(f"unknown config field in an override: {e}")
    except (TypeError, ValueError) as e:
        _fail(f"bad config override: {e}")
    except Exception as e:  # noqa: BLE001 -- the config file's own code failed: bad input
        _fail(f"cannot load the config: {type(e).__name__}: {e}")


def config_value(holder) -> Any:
    """The ConfigDict of a `config_flags.DEFINE_config_file` flag; a config file that could
    not be loaded (ml_collections defers that error to the first use) is exit status 2."""
    try:
        config = holder.value
        config.keys()
    except OSError as e:
        _fail("cannot load the config: " + " ".join(str(e).split()))
    return config


def run(main: Callable[[list[str]], None], training: bool = False) -> None:
    """`app.run(main)` where a ConfigError (bad config or data) is a one-line error, exit 2,
    and a Ctrl-C outside training (which saves and exits 130 itself) is a quiet exit 130.
    `training`: a Ctrl-C during start-up is kept for the training loop
    (jaxdml.faults.detect.catch_early)."""

    def guarded(argv: list[str]) -> None:
        quiet_library_logs()
        try:
            main(argv)
        except ConfigError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    if training:
        detect.catch_early()
    app.run(guarded, flags_parser=parse_flags)


class _QuietLibraries:
    """Drops INFO/DEBUG records from Orbax (it logs every save in detail), and its warning
    that a process-local memory-tier save has no other processes' parts to merge."""

    def filter(self, record) -> bool:
        if "orbax" not in record.pathname:
            return True
        return record.levelno >= 30 and "Skipping merge of OCDBT" not in record.getMessage()


def quiet_library_logs() -> None:
    """Keeps our INFO progress lines and Orbax's warnings, not its INFO chatter."""
    logging.get_absl_handler().addFilter(_QuietLibraries())


def config_variants(path: str) -> list[str]:
    """The `:variant` arguments a config file's get_config(arg) tests for (`arg == "x"`,
    `arg in ("x", "y")`), read from its source without running it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found: list[str] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)):
            continue
        if node.left.id != "arg":
            continue
        for value in node.comparators:
            items = value.elts if isinstance(value, ast.Tuple | ast.List | ast.Set) else [value]
            for item in items:
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    found.append(item.value)
    return list(dict.fromkeys(found))


def config_listing(directory: str) -> str:
    """The shipped configs (directory/*.py) with their variants and the first line of their
    docstring, for --help."""
    lines = ["Shipped configs (--config=configs/NAME.py or configs/NAME.py:VARIANT):"]
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        path = os.path.join(directory, name)
        with open(path) as f:
            doc = (ast.get_docstring(ast.parse(f.read())) or "").strip().splitlines()
        variants = "".join(f" :{v}" for v in config_variants(path))
        lines.append(f"  configs/{name}{variants}")
        if doc:
            lines.append(f"      {doc[0]}")
    lines.append(
        "Every field (--config.SECTION.FIELD=VALUE), its default and its meaning: the\n"
        "schema in jaxdml/config.py (default_config). --dry_run prints the resolved config."
    )
    return "\n".join(lines)


def describe_eval(result: dict[str, Any]) -> str:
    """eval.json as a few lines."""
    return "\n".join(
        f"{k:<16} {result[k]:.4f}" if isinstance(result[k], float) else f"{k:<16} {result[k]}"
        for k in ("step", "accuracy", "loss", "rows", "data", "restored_from")
    )


def describe(result: dict[str, Any], events: list[dict] = ()) -> str:
    """A one-screen table of a result, and the faults and recoveries of the run."""
    keys = ("model", "data", "num_devices", "steps", "loss", "train_accuracy", "test_accuracy",
            "test_rmse", "test_r2", "baseline_rmse", "wall_time_s", "goodput", "lost_steps",
            "params_sha256")  # fmt: skip
    lines = []
    if result.get("already_finished"):
        lines.append("already finished: nothing trained; the run's result:")
    for k in keys:
        v = result.get(k)
        if v is not None:
            lines.append(f"{k:<16} {v:.4f}" if isinstance(v, float) else f"{k:<16} {v}")
    shown = [e for e in events if e["kind"] != "fault_injected"]
    if shown:
        lines.append("events:")
    for e in shown:
        lost = e.get("seconds_lost")
        lines.append(
            f"  step {e['step'] if e['step'] is not None else '-':>5}  {e['kind']:<12} "
            f"devices {e.get('devices', [])}  "
            f"{e.get('action', '')}" + (f"  ({lost:.2f} s lost)" if lost is not None else "")
        )
    return "\n".join(lines)
