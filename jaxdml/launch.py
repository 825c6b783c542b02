"""Local multi-process launcher with cold restart: several "hosts" on one machine.

  python -m jaxdml.launch --num_processes=2 --devices_per_process=2 --max_restarts=3 -- \\
      python -m experiments.train --config=configs/seed_logreg.py:smoke --workdir=/tmp/run

Starts N copies of the command with the coordinator settings in the environment
(JAXDML_COORDINATOR, JAXDML_NUM_PROCESSES, JAXDML_PROCESS_ID,
JAXDML_NUM_CPU_DEVICES; see jaxdml/distributed.py), streams their output
prefixed with `[pI]`, and watches them:

- a process exits 0: done; the group is done when all are.
- a process exits with a failure status, or the coordinator (process 0) dies:
  the job cannot go on in-process, so the others are stopped (SIGTERM, SIGKILL
  after --failure_grace_secs) and the whole group is started again, up to
  --max_restarts times with exponential backoff. Status 2 (bad input) is never
  restarted: the same input fails the same way.
- a non-coordinator dies (killed by a signal, or exits with a failure status other than
  2): with --hot_recovery the survivors go on in-process (or exit with a failure
  status themselves, which restarts the group); without it, it is a failure like any
  other. A process of this CPU backend cannot rejoin a running group, so the group
  grows back to full size by a planned restart --grow_back_secs after the loss: the
  survivors are told to stop (SIGTERM: they agree on a step, save it in both tiers and
  exit 0) and every process starts again, resuming from the memory tier.

While a group runs, the next start's processes wait started and imported (--standby,
jaxdml.standby): a restart skips starting Python and importing jax, flax, optax and
orbax (about 1 s a process here), and gets its coordinator settings when woken.

Every restart is a JSON line in <workdir>/events.jsonl when the command names a
--workdir. The launcher exits with the group's status (0 when all exited 0).

Cleanup: each child runs in its own session (process group), so a Ctrl-C in the
terminal reaches only the launcher, which stops the children in order, and a
stop reaches whatever a child started. If the launcher itself is SIGKILLed no
code of it runs, so on Linux each child asks the kernel for SIGKILL when its
parent dies (prctl PR_SET_PDEATHSIG). The kernel ties that to the thread that
forked the child, so this launcher has one thread and multiplexes the
children's output with selectors. A child's own children are not covered by
that signal (it is not inherited across fork); training processes start none.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

from jaxdml.cli import parse_flags
from jaxdml.constants import (
    ENV_ATTEMPT,
    ENV_COORDINATOR,
    ENV_NUM_CPU_DEVICES,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    EXIT_BAD_INPUT,
    EXIT_OK,
    NO_RESTART_EXIT_CODES,
)
from jaxdml.standby import Standby, can_wait

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
_DEVICES = flags.DEFINE_integer(
    "devices_per_process",
    0,
    "Simulated CPU devices per process (0: as the config says).",
    lower_bound=0,
)
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "Cold restarts of the whole group at most.", lower_bound=0
)
_PORT = flags.DEFINE_integer(
    "coordinator_port", 0, "Coordinator port (0: a free port for each start).", lower_bound=0
)
_BACKOFF = flags.DEFINE_float(
    "backoff_secs", 1.0, "Wait before the first restart; doubles each time.", lower_bound=0.0
)
_MAX_BACKOFF = flags.DEFINE_float(
    "max_backoff_secs", 30.0, "Longest wait between restarts.", lower_bound=0.0
)
_HOT_RECOVERY = flags.DEFINE_bool(
    "hot_recovery",
    False,
    "The processes survive the loss of a non-coordinator in-process (live_devices): leave a "
    "process killed by a signal to them. False: any lost process restarts the group.",
)
_GROW_BACK = flags.DEFINE_float(
    "grow_back_secs",
    10.0,
    "With --hot_recovery: seconds after a process was lost before the group is restarted at "
    "full size (the survivors save and stop first); negative: never, finish on the survivors.",
)
_GRACE = flags.DEFINE_float(
    "grace_secs",
    10.0,
    "When the launcher is stopped (Ctrl-C, SIGTERM): after SIGTERM to the processes, wait "
    "this long before SIGKILL (time for a healthy process to checkpoint and exit).",
    lower_bound=0.0,
)
_FAILURE_GRACE = flags.DEFINE_float(
    "failure_grace_secs",
    2.0,
    "When the group failed: the same wait for its survivors. Short, because they are "
    "usually blocked in a collective with the dead process and cannot act on SIGTERM.",
    lower_bound=0.0,
)
_STANDBY = flags.DEFINE_bool(
    "standby",
    True,
    "While a group runs, keep the next start's processes started and imported, waiting "
    "(jaxdml.standby: ~250 MB each); only for `python -m MODULE` or `python SCRIPT`.",
)

_PR_SET_PDEATHSIG = 1
_POLL_SECS = 0.1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# ---- policy (pure functions) ----


def signal_status(returncode: int) -> int:
    """A Popen returncode as a shell exit status: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def classify_exit(process_id: int, returncode: int, hot_recovery: bool) -> str:
    """What one process's exit means for the group.

    Returns:
      'done' (exited 0), 'lost' (with hot recovery, a non-coordinator that died: killed by
      a signal or failed; the survivors recover in-process or fail themselves), or
      'fail' (any other exit: the group cannot go on). Bad input (status 2) is a failure
      everywhere: the survivors would meet the same input. Without hot recovery a lost
      process is a failure: its peers would wait for it in their next collective.
    """
    if returncode == 0:
        return "done"
    if hot_recovery and process_id != 0 and signal_status(returncode) not in NO_RESTART_EXIT_CODES:
        return "lost"
    return "fail"


def should_restart(status: int, restarts_done: int, max_restarts: int) -> bool:
    """True when a group that failed with `status` gets another start."""
    return status not in NO_RESTART_EXIT_CODES and restarts_done < max_restarts


def backoff_secs(restarts_done: int, base: float, cap: float) -> float:
    """Wait before restart number `restarts_done + 1`: base, 2*base, 4*base, ... at most cap."""
    return min(base * 2.0**restarts_done, cap)


def workdir_of(command: Sequence[str]) -> str | None:
    """The value of a `--workdir=X` or `--workdir X` argument of `command`, if any."""
    for i, arg in enumerate(command):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- processes ----


def _die_with_parent(launcher_pid: int) -> None:
    """preexec_fn: SIGKILL this child when the launcher dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)


@dataclasses.dataclass
class Child:
    """One started process, its output buffer and how it ended."""

    process_id: int
    proc: subprocess.Popen
    partial: bytes = b""
    outcome: str | None = None  # classify_exit's verdict once it exited

    def signal_group(self, sig: int) -> None:
        """Sends `sig` to the child's process group, if the child is not yet reaped."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def child_env(process_id: int, num_processes: int, devices: int, port: int, attempt: int) -> dict:
    """The environment of process `process_id`: coordinator settings for jaxdml.distributed."""
    env = dict(os.environ)
    env.update(
        {
            ENV_COORDINATOR: f"127.0.0.1:{port}",
            # Bind the coordination service to loopback: a local job exposes nothing.
            "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_id),
            ENV_ATTEMPT: str(attempt),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if devices > 0:
        env[ENV_NUM_CPU_DEVICES] = str(devices)
    return env


def _pipes() -> dict:
    """How a child is started: its output to the launcher, its own session, and a
    SIGKILL from the kernel when the launcher dies."""
    launcher_pid = os.getpid()
    return dict(
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(launcher_pid),
    )


def _popen(command: Sequence[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL, **_pipes())


def _spares(command: Sequence[str], n: int, devices: int) -> list[Standby]:
    """The next start's processes, waiting (none when the command cannot wait). Started
    with the environment they will have but for the start's port and attempt, which
    come when they are woken; variables read at interpreter start
    (PYTHONUNBUFFERED) are already right."""
    if not _STANDBY.value or not can_wait(command):
        return []
    return [Standby(command, env=child_env(i, n, devices, 0, 0), **_pipes()) for i in range(n)]


class Group:
    """N processes of one start: launched together, watched together, stopped together."""

    def __init__(
        self,
        command: Sequence[str],
        num_processes: int,
        devices: int,
        attempt: int,
        spares: Sequence[Standby] = (),
    ):
        """`spares`: processes waiting to run `command` (one per process), woken in
        place of cold starts."""
        self.port = _PORT.value or free_port()
        self.children: list[Child] = []
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.failed_at: float | None = None  # time.monotonic() when a failure was seen
        try:
            for i in range(num_processes):
                env = child_env(i, num_processes, devices, self.port, attempt)
                spare = spares[i] if len(spares) == num_processes else None
                if spare is not None and not spare.alive():
                    spare.cancel()  # it died waiting: start cold
                    spare = None
                self._add(i, spare.wake(env) if spare else _popen(command, env))
        except BaseException:
            self.stop(grace=0.0)  # a failed start (no such program) leaves no process behind
            raise

    def _add(self, i: int, proc: subprocess.Popen) -> None:
        child = Child(i, proc)
        os.set_blocking(proc.stdout.fileno(), False)
        self.selector.register(proc.stdout, selectors.EVENT_READ, child)
        self.children.append(child)

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def pump(self, timeout: float) -> None:
        """Copies whatever output is ready to stdout, each line prefixed with [pI]."""
        for key, _ in self.selector.select(timeout):
            child: Child = key.data
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                self.selector.unregister(key.fileobj)
                self._emit(child, child.partial, final=True)
                continue
            lines = (child.partial + chunk).split(b"\n")
            child.partial = lines.pop()
            for line in lines:
                self._emit(child, line)

    def _emit(self, child: Child, line: bytes, final: bool = False) -> None:
        if final and not line:
            return
        sys.stdout.buffer.write(b"[p%d] %s\n" % (child.process_id, line))
        sys.stdout.flush()

    def poll(self) -> Child | None:
        """Reaps exited children; returns the first one whose exit fails the group."""
        failed = None
        for child in self.children:
            if child.outcome is None and child.proc.poll() is not None:
                child.outcome = (
                    "stopped"
                    if self.stopping
                    else classify_exit(child.process_id, child.proc.returncode, _HOT_RECOVERY.value)
                )
                rc = child.proc.returncode
                logging.info(
                    "[launch] process %d exited %d (%s)", child.process_id, rc, child.outcome
                )
                if child.outcome == "fail" and failed is None:
                    failed = child
                    self.failed_at = time.monotonic()
        return failed

    def running(self) -> list[Child]:
        return [c for c in self.children if c.proc.returncode is None]

    def stop(self, grace: float) -> None:
        """SIGTERM to every running child's group; SIGKILL to what is left after `grace`."""
        self.poll()  # who exited on its own before the stop keeps its verdict
        self.stopping = True
        for child in self.running():
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            self.pump(_POLL_SECS)
            self.poll()
        for child in self.running():
            logging.warning("[launch] process %d ignored SIGTERM; SIGKILL", child.process_id)
            child.signal_group(signal.SIGKILL)
        for child in self.children:
            child.proc.wait()
        self.poll()
        self.close()

    def close(self, drain_secs: float = 2.0) -> None:
        """Copies the output left in the pipes (for at most `drain_secs`: a process the
        child started may hold its pipe open) and closes them."""
        deadline = time.monotonic() + drain_secs
        while self.selector.get_map() and time.monotonic() < deadline:
            self.pump(_POLL_SECS)
        self.selector.close()
        for child in self.children:
            child.proc.stdout.close()


# ---- the launcher ----

# Set by the SIGTERM/SIGINT handler and checked by the loops below. A flag, not an
# exception: an exception raised mid-Popen would lose track of a half-started group.
_stop_signal: list[int] = []


def _on_stop_signal(signum: int, frame) -> None:
    del frame
    _stop_signal.append(signum)


GROW_BACK = -1  # run_group's status for a planned restart at full size


def run_group(
    group: Group, grace: float, failure_grace: float, grow_back_secs: float = -1.0, events=None
) -> tuple[int, Child | None]:
    """Watches `group` until all exited, one failed, or the launcher was told to stop;
    in the last two cases stops the rest. `grow_back_secs` (>= 0) after a process was
    lost, the survivors are asked to stop (SIGTERM: save and exit 0) and the status is
    GROW_BACK: the caller restarts the whole group.

    Returns:
      (the group's exit status, the child that failed it or None); status is
      128 + signal when the launcher was stopped.
    """
    lost_at: float | None = None
    asked_at: float | None = None
    while group.running():
        if _stop_signal:
            logging.warning("[launch] got signal %d; stopping the group", _stop_signal[0])
            group.stop(grace)
            return 128 + _stop_signal[0], None
        group.pump(_POLL_SECS)
        failed = group.poll()
        if failed is not None:
            status = signal_status(failed.proc.returncode)
            who = "coordinator" if failed.process_id == 0 else f"process {failed.process_id}"
            logging.warning("[launch] %s failed (status %d); stopping the group", who, status)
            group.stop(failure_grace)
            return status, failed
        now = time.monotonic()
        if lost_at is None and any(c.outcome == "lost" for c in group.children):
            lost_at = now
            _record_lost(group, events)
        if asked_at is None and lost_at is not None and 0 <= grow_back_secs <= now - lost_at:
            logging.info("[launch] growing back: the survivors save and stop, then all restart")
            asked_at = now
            for child in group.running():
                child.signal_group(signal.SIGTERM)
        if asked_at is not None and now - asked_at > grace:
            group.stop(0.0)  # a survivor that did not stop in time: its tiers still hold state
    group.close()
    return (GROW_BACK if asked_at is not None else EXIT_OK), None


def _record_lost(group: Group, events: str | None) -> None:
    for child in group.children:
        if child.outcome == "lost":
            _record(
                events,
                kind="process_lost",
                action="the survivors go on in-process",
                process=child.process_id,
                exit_code=signal_status(child.proc.returncode),
            )


def _sleep_unless_stopped(secs: float) -> None:
    deadline = time.monotonic() + secs
    while not _stop_signal and time.monotonic() < deadline:
        time.sleep(min(_POLL_SECS, max(deadline - time.monotonic(), 0.0)))


def _record(path: str | None, **row) -> None:
    logging.info("[launch] %s", json.dumps(row))
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), "step": None, **row}) + "\n")


def launch(command: Sequence[str]) -> int:
    """Runs `command` as a group of processes, cold-restarting it on failure.

    Returns:
      The exit status: 0 when every process of the last start exited 0, the failing
      status otherwise, 128 + signal when the launcher itself was stopped.
    """
    n, devices = _NUM_PROCESSES.value, _DEVICES.value
    workdir = workdir_of(command)
    events = os.path.join(workdir, "events.jsonl") if workdir else None
    spares: list[Standby] = []
    try:
        return _restart_loop(command, n, devices, events, spares)
    finally:
        for spare in spares:
            spare.cancel()


def _restart_loop(
    command: Sequence[str], n: int, devices: int, events: str | None, spares: list[Standby]
) -> int:
    """launch()'s loop; `spares` holds the processes waiting for the next start."""
    restarts = 0
    grow_back = _GROW_BACK.value if _HOT_RECOVERY.value else -1.0
    while True:
        started = time.monotonic()
        waiting, spares[:] = list(spares), []
        try:
            group = Group(command, n, devices, restarts, waiting)
        except OSError as e:  # no such program, not executable: a restart cannot help
            print(f"error: cannot start {command[0]!r}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if restarts < _MAX_RESTARTS.value or grow_back >= 0:
            spares[:] = _spares(command, n, devices)
        logging.info(
            "[launch] start %d: %d processes, pids %s, port %d",
            restarts,
            n,
            group.pids(),
            group.port,
        )
        status, failed = run_group(group, _GRACE.value, _FAILURE_GRACE.value, grow_back, events)
        if status == GROW_BACK:
            if _stop_signal:
                return 128 + _stop_signal[0]
            _record(events, kind="grow_back", action="restart at full size", num_processes=n)
            continue
        if status == EXIT_OK:
            logging.info("[launch] all processes exited 0 after %.1f s", time.monotonic() - started)
            return EXIT_OK
        if failed is None:  # the launcher was stopped
            return status
        fields = dict(
            process=failed.process_id,
            exit_code=status,
            num_processes=n,
            devices_per_process=devices or None,
            group_seconds=round(group.failed_at - started, 3),  # start -> failure seen
            stop_seconds=round(time.monotonic() - group.failed_at, 3),  # -> all stopped
        )
        if not should_restart(status, restarts, _MAX_RESTARTS.value):
            why = "bad input" if status == EXIT_BAD_INPUT else "max_restarts reached"
            _record(events, kind="launcher_stop", action="stop", reason=why, **fields)
            return status
        wait = backoff_secs(restarts, _BACKOFF.value, _MAX_BACKOFF.value)
        restarts += 1
        _record(
            events,
            kind="cold_restart",
            action="cold_restart",
            attempt=restarts,
            backoff_s=wait,
            **fields,
        )
        _sleep_unless_stopped(wait)
        if _stop_signal:
            return 128 + _stop_signal[0]


def main(argv: list[str]) -> int:
    command = argv[1:]
    if not command:
        print(
            "error: no command; usage: python -m jaxdml.launch [flags] -- CMD ...", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    return launch(command)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
