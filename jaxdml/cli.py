"""Shared plumbing for the absl entry points in experiments/: clean exits for bad input,
and the result table they print."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags, logging

from jaxdml.config import ConfigError
from jaxdml.constants import EXIT_BAD_INPUT


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad flag or config override into exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown fields or mistyped overrides.
        _fail(f"bad config override: {e}")


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` where a ConfigError (bad config or data) is a one-line error, exit 2."""

    def guarded(argv: list[str]) -> None:
        quiet_library_logs()
        try:
            main(argv)
        except ConfigError as e:
            _fail(str(e))

    app.run(guarded, flags_parser=parse_flags)


class _QuietLibraries:
    """Drops INFO/DEBUG records from Orbax: it logs every save in detail."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps our INFO progress lines and Orbax's warnings, not its INFO chatter."""
    logging.get_absl_handler().addFilter(_QuietLibraries())


def describe(result: dict[str, Any], events: list[dict] = ()) -> str:
    """A one-screen table of a result, and the faults and recoveries of the run."""
    keys = ("model", "data", "num_devices", "steps", "loss", "train_accuracy", "test_accuracy",
            "wall_time_s", "goodput", "lost_steps", "params_sha256")  # fmt: skip
    lines = []
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
