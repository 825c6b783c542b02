"""Warm standby: the next attempt's process, started and imported before it is needed.

A cold restart spends about a second here (more where site-packages sits on a network
file system) starting Python and importing jax, flax, optax, orbax and jaxdml before it
does any work of its own. A restart loop (jaxdml.launch, jaxdml.chaos.run_plan) starts
the next attempt's process while the current one runs: it waits `delay` seconds (so
that its imports do not compete with the running attempt's own start-up and compilation
for the cores), imports, and blocks on its stdin. One JSON line there,
{"env": {...}, "t": time sent}, runs the command with those environment variables set;
end of input (the loop finished, or died) makes it exit 0 having run nothing.

Nothing but imports happens before the line: no flag is parsed, no backend starts (the
device count, the distributed runtime and the collectives are set by the command
itself, after it), no file of the run is touched. So the command runs as it would in a
fresh process, and a process life in the goodput record (jaxdml.goodput) begins when the
line was sent: nothing waited for the imports before it.

  python -m jaxdml.standby --delay=5 -- -m experiments.train --config=...  (or a script)

Only Python commands of the form `python -m module ...` or `python script.py ...` can
wait this way (`can_wait` says); any other command is started cold.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence

# What a jaxdml training process imports before its first computation (~1.1 s of a
# 1.4-s start-up, seed_logreg on this machine). None of it starts a backend.
PRELOAD = (
    "jax",
    "jax.numpy",
    "optax",
    "flax.linen",
    "orbax.checkpoint",
    "jaxdml.training.trainer",
)
DEFAULT_DELAY_SECS = 5.0


def can_wait(command: Sequence[str]) -> bool:
    """Whether a standby can run `command`: a Python interpreter with a module (`-m`) or
    a script, and no interpreter options before them."""
    if len(command) < 2 or not os.path.basename(command[0]).startswith("python"):
        return False
    if command[1] == "-m":
        return len(command) > 2
    return not command[1].startswith("-")


def is_waiting(pid: int) -> bool:
    """Whether process `pid` is a standby not yet woken (Linux; False when unknown): its
    command line runs jaxdml.standby and its stdin is still the pipe it waits on (a
    woken one reads /dev/null). A fault sent from outside to a job's processes must
    skip these: no training runs in them yet."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"jaxdml.standby" not in f.read():
                return False
        return os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:")
    except OSError:
        return False


class Standby:
    """A process that runs `command` when woken; `popen` are subprocess.Popen's
    arguments for it (stdout, stderr, env, session), as for a cold start."""

    def __init__(self, command: Sequence[str], delay: float | None = None, **popen):
        if not can_wait(command):
            raise ValueError(f"a standby runs `python -m module` or `python script`: {command}")
        delay = DEFAULT_DELAY_SECS if delay is None else delay
        args = [command[0], "-m", "jaxdml.standby", f"--delay={delay}", "--", *command[1:]]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, **popen)

    def alive(self) -> bool:
        """Still waiting (not killed meanwhile: out of memory, a signal)."""
        return self.proc.poll() is None

    def wake(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Runs the command now, with `env` added to the environment; returns its process
        (the standby's own: same pid, pipes and session)."""
        line = json.dumps({"env": env or {}, "t": time.time()}) + "\n"
        with contextlib.suppress(BrokenPipeError):  # it died: the caller sees its exit
            os.write(self.proc.stdin.fileno(), line.encode())
        self._close_stdin()
        return self.proc

    def cancel(self, grace: float = 2.0) -> None:
        """Ends the standby without running anything (end of input; SIGKILL after
        `grace` seconds, as when it is still importing)."""
        self._close_stdin()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def _close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            self.proc.stdin = None  # communicate() must not flush a closed pipe


def _wait_for_line(timeout: float | None) -> str | None:
    """A line from stdin ("" at end of input), or None when `timeout` passed first."""
    if timeout is not None:
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, timeout))
        if not ready:
            return None
    return sys.stdin.readline()


def _run(target: list[str]) -> None:
    """Runs `target` (`-m module args` or `script args`) as __main__, like `python` would."""
    import runpy

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the command's stdin is empty, as under a scheduler
    os.close(devnull)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 -- fd 0 stays open for the process
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path[0] = os.path.dirname(os.path.abspath(target[0]))
        runpy.run_path(target[0], run_name="__main__")


def main(argv: list[str]) -> int:
    delay, target = DEFAULT_DELAY_SECS, argv[1:]
    if target and target[0].startswith("--delay="):
        delay, target = float(target[0].split("=", 1)[1]), target[1:]
    if target and target[0] == "--":
        target = target[1:]
    if not target:
        usage = "usage: python -m jaxdml.standby [--delay=S] -- (-m MODULE | SCRIPT) ARGS"
        print(usage, file=sys.stderr)
        return 2
    try:
        line = _wait_for_line(delay)  # woken early: import now, then run
        if line == "":
            return 0
        for name in PRELOAD:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        if line is None:
            line = _wait_for_line(None)
        if not line.strip():
            return 0
    except KeyboardInterrupt:  # Ctrl-C in the terminal while waiting: nothing to run
        return 130
    order = json.loads(line)
    from jaxdml import goodput

    goodput.life_began_at(float(order.get("t", time.time())))
    os.environ.update({str(k): str(v) for k, v in order.get("env", {}).items()})
    _run(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
