"""Shared plumbing for the absl entry points in experiments/: clean exits for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging

from jaxdml.config import ConfigError

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a bad config value, flag or data file; nothing was trained
EXIT_GAVE_UP = 3  # the supervisor stopped: too few devices or recovery budget spent
EXIT_HANG = 4  # the step watchdog saw no progress: a hang turned into a crash

# jaxdml.launch decides on restarts by exit status; a restart cannot fix these
# (the same input fails the same way). Status 1 is Python's for an uncaught exception.
NO_RESTART_EXIT_CODES = frozenset({EXIT_BAD_INPUT})

# The environment jaxdml.launch gives each process it starts (read by jaxdml.distributed).
ENV_COORDINATOR = "JAXDML_COORDINATOR"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "JAXDML_NUM_PROCESSES"  # processes in the job
ENV_PROCESS_ID = "JAXDML_PROCESS_ID"  # this process, 0..N-1
ENV_NUM_CPU_DEVICES = "JAXDML_NUM_CPU_DEVICES"  # simulated CPU devices of this process
ENV_ATTEMPT = "JAXDML_ATTEMPT"  # 0 for the group's first start, k for its k-th restart


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
