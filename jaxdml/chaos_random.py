"""Random-moment chaos: signals sent from outside, at seeded random moments, to a live job.

Two modes. `single`: one `experiments.train` process, run again with the same command
until it exits 0 with result.json, as a scheduler would. `launcher`: the jaxdml.launch
group (--hot_recovery, --max_restarts), itself run again the same way. A schedule drawn
from a seed gives every fault its signal, the phase it aims at and its delay; the runner
tails metrics.jsonl (by size: a resume rewrites it) and events.jsonl, watches the worker
processes in /proc, fires each fault and measures:

- kill -> training: from the signal to the first metrics row of the recovered job, i.e.
  the first row after a new process started (a restart), after the survivors' host_loss
  recovery (the row of its `resumed_at` step), or after SIGCONT (a held SIGSTOP);
- steps redone: the highest step written between the signal and that row, minus the
  step the row resumed from (its step - 1);
- the path: hot (a host_loss event: the survivors went on in-process), warm / cold (a
  `resumed` event from the memory / persistent tier), scratch (a restart from step 0),
  continued (the stopped process went on);
- hung: no recovery within `hang_secs`: every process of the job is killed, and the
  job started again.

Phases: `any` (a delay after training was seen again), `save` (after the delay, the
moment a checkpoint's temporary folder appears: Orbax's in workdir/checkpoints or the
memory tier's .tmp-STEP) and `restore` (a delay after a process (re)started, before its
first metrics row: imports, restore, compilation). A detector that missed its phase says
so in the record (`hit`), and the fault is fired anyway.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import time

from jaxdml import standby
from jaxdml.chaos_report import FaultRecord, Summary, summarize, table  # noqa: F401
from jaxdml.constants import ENV_PROCESS_ID, EXIT_BAD_INPUT

KINDS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGSTOP+KILL", "SIGSTOP")
PHASES = ("any", "save", "restore")
_SIGNALS = {
    "SIGKILL": signal.SIGKILL,
    "SIGTERM": signal.SIGTERM,
    "SIGINT": signal.SIGINT,
    "SIGSTOP+KILL": signal.SIGSTOP,
    "SIGSTOP": signal.SIGSTOP,
}


@dataclasses.dataclass(frozen=True)
class Fault:
    """One scheduled fault."""

    index: int
    kind: str  # one of KINDS
    phase: str  # one of PHASES
    delay: float  # seconds after the moment the phase waits for
    coordinator: bool  # launcher mode: aim at process 0 (else at another process)
    stop_secs: float  # SIGSTOP kinds: seconds stopped before SIGKILL / SIGCONT


def schedule(
    seed: int,
    faults: int,
    kinds=("SIGKILL",),
    phases=("any",),
    gap=(0.5, 3.0),
    restore_gap=(0.2, 3.0),
    coordinator_share: float = 0.4,
    stop_secs=(1.0, 8.0),
) -> list[Fault]:
    """The seeded fault schedule: the same seed gives the same faults and moments.

    Args:
      seed: the random seed.
      faults: how many faults.
      kinds, phases: drawn uniformly from these sequences (repeat a name to weight it).
      gap: (low, high) delay after training was seen again (phases any and save).
      restore_gap: (low, high) delay after a process started (phase restore).
      coordinator_share: launcher mode: the chance a fault aims at process 0.
      stop_secs: (low, high) seconds a SIGSTOPped process stays stopped.

    Returns:
      One Fault per fault, in firing order.
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown signal kind {k!r}; known: {', '.join(KINDS)}")
    for p in phases:
        if p not in PHASES:
            raise ValueError(f"unknown phase {p!r}; known: {', '.join(PHASES)}")
    rng = random.Random(seed)
    out = []
    for i in range(faults):
        kind, phase = rng.choice(list(kinds)), rng.choice(list(phases))
        delay = rng.uniform(*(restore_gap if phase == "restore" else gap))
        coordinator = rng.random() < coordinator_share
        out.append(Fault(i, kind, phase, delay, coordinator, rng.uniform(*stop_secs)))
    return out


class JsonlTail:
    """The rows a writer appends to a .jsonl file, read from the last offset. The file may
    be rewritten shorter (a resume drops rows past its step): when it shrank or the bytes
    before the offset changed, it is read again whole. Rows are new by their `time`."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.tail = b""  # the bytes just before the offset, as last read
        self.last_time = float("-inf")
        self.max_step = 0  # highest step in the file as last read

    def poll(self) -> list[dict]:
        """Rows written since the last poll (a torn last line waits for the next one)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            self.offset, self.tail, self.max_step = 0, b"", 0
            return []
        with f:
            size = os.fstat(f.fileno()).st_size
            before = os.pread(f.fileno(), len(self.tail), self.offset - len(self.tail))
            if size < self.offset or before != self.tail:  # rewritten: read it again whole
                self.offset, self.tail, self.max_step = 0, b"", 0
            data = os.pread(f.fileno(), size - self.offset, self.offset)
        data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        self.tail = (self.tail + data)[-64:]
        new = []
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.max_step = max(self.max_step, int(row.get("step") or 0))
            if row.get("time", 0.0) > self.last_time:
                self.last_time = row["time"]
                new.append(row)
        return new


def save_in_progress(folders: list[str]) -> str | None:
    """The temporary folder of a checkpoint being written in one of `folders` (Orbax's
    '<step>.orbax-checkpoint-tmp-*', the memory tier's '.tmp-<step>'), else None."""
    for folder in folders:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith(".tmp-") or "orbax-checkpoint-tmp" in e.name:
                    return e.path
    return None


def _proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ours(pid: int, marker: str) -> bool:
    """True when `pid` runs and its command line holds `marker` (our --workdir): a pid
    the kernel gave to someone else's process is never signalled."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read() and _proc_alive(pid)
    except OSError:
        return False


def _process_id(pid: int) -> int | None:
    """JAXDML_PROCESS_ID of a launcher child (None until it has exec'd)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    value = env.get(ENV_PROCESS_ID.encode())
    return None if value is None else int(value)


class Job:
    """The job under test: started, watched and restarted as a scheduler would."""

    def __init__(self, command: list[str], workdir: str, log_dir: str, launcher: bool, cwd=None):
        self.command, self.workdir, self.launcher, self.cwd = command, workdir, launcher, cwd
        self.log_dir = log_dir
        self.marker = f"--workdir={workdir}"
        self.proc: subprocess.Popen | None = None
        self.first_seen: dict[int, float] = {}  # worker pid -> wall clock first seen
        self.ids: dict[int, int] = {}  # worker pid -> its process id
        self.seen: set[int] = set()  # every pid of the job, for the leftover check
        self.live: set[int] = set()  # the worker pids of the last look
        self.starts = 0
        self.started = float("-inf")  # wall clock of the newest start()
        self.exit_codes: list[int] = []

    def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"start_{self.starts:03d}.log"), "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        self.started = time.time()
        self.live = set()  # the kernel may give the new process a pid seen before
        self.seen.add(self.proc.pid)
        self.workers()

    def workers(self) -> dict[int, int]:
        """{pid: process id} of the running training processes."""
        if self.proc is None or self.proc.poll() is not None:
            return {}
        if not self.launcher:
            pids = {self.proc.pid: 0}
        else:
            pids = {}
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                    with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                        for p in map(int, f.read().split()):
                            if p not in self.live or p not in self.ids:
                                self.ids[p] = _process_id(p)  # None until it has exec'd
                            if standby.is_waiting(p):
                                continue  # the next start's spare: no training in it yet
                            if self.ids[p] is not None and _proc_alive(p):
                                pids[p] = self.ids[p]
        now = time.time()
        for p in pids:
            if p not in self.live:  # a new process, also one with a pid used before
                self.first_seen[p] = now
            self.seen.add(p)
        self.live = set(pids)
        return pids

    def newest_start(self) -> float:
        """When the newest process started (or the job, before its workers are seen)."""
        return max([self.started, *self.first_seen.values()])

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL to the job's process group and to every process of it still running."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.kill_leftovers()

    def leftovers(self) -> list[int]:
        return sorted(p for p in self.seen if _ours(p, self.marker))

    def kill_leftovers(self, wait: float = 2.0) -> list[int]:
        """Kills (by pid) what is left of the job after `wait`; returns what was left."""
        deadline = time.monotonic() + wait
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.leftovers()
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        return left


class RandomChaos:
    """Runs `job` and fires `plan`'s faults at it (see the module docstring)."""

    def __init__(self, job: Job, plan: list[Fault], save_folders: list[str], hang_secs=120.0,
                 save_wait=10.0, restore_wait=60.0, max_starts=None, tick=0.02,
                 no_effect_secs=20.0):  # fmt: skip
        self.job, self.plan, self.save_folders = job, plan, save_folders
        self.hang_secs, self.save_wait, self.restore_wait = hang_secs, save_wait, restore_wait
        self.max_starts = max_starts or 2 * len(plan) + 5
        self.tick_secs, self.no_effect_secs = tick, no_effect_secs
        self.metrics = JsonlTail(os.path.join(job.workdir, "metrics.jsonl"))
        self.events = JsonlTail(os.path.join(job.workdir, "events.jsonl"))
        self.event_rows: list[dict] = []
        self.recent: collections.deque = collections.deque(maxlen=50_000)  # (step, time)
        self.records: list[FaultRecord] = []
        self.open: list[FaultRecord] = []
        self.followups: list[tuple[float, FaultRecord, int]] = []  # (when, record, signal)
        self.done = self.failed = False
        self.stalls = 0  # no progress for hang_secs with no fault open
        self.last_progress = time.time()

    # ---- the loop

    def run(self) -> None:
        self.job.start()
        try:
            for fault in self.plan:
                if self.done or self.failed:
                    break
                self._fire_when_ready(fault)
            self._wait(lambda: False, timeout=None)
            self._poll_rows()  # the rows the last process wrote before its exit
            self.event_rows += self.events.poll()
            for record in list(self.open):
                self._update(record)
            for record in list(self.open):
                self._after_the_last_step(record)
        finally:
            self.job.kill()

    def _after_the_last_step(self, record: FaultRecord) -> None:
        """A fault that found training over (in the run's last save, or as the process
        finished): no row follows it. With a restart, that restart resumed at the last
        step with nothing left to run, and its `resumed` event shows the recovery;
        without one, the process finished the job anyway: no effect, nothing redone."""
        if not self.done or any(t > record.fired for _, t in self.recent):
            return
        if record.restarted_at is None:
            record.seen, record.resumed_from = record.fired, record.reached
            self.open.remove(record)
            return
        after = [e for e in self.event_rows
                 if e["kind"] == "resumed" and e["time"] >= record.restarted_at]  # fmt: skip
        if after:
            record.seen, record.resumed_from = after[0]["time"], int(after[0]["step"])
            self.open.remove(record)

    def _wait(self, cond, timeout: float | None) -> bool:
        """Ticks until cond() (True), the job ended or `timeout` passed (False)."""
        deadline = None if timeout is None else time.time() + timeout
        while not (self.done or self.failed):
            self._tick()
            if cond():
                return True
            if deadline is not None and time.time() >= deadline:
                return False
            time.sleep(self.tick_secs)
        return False

    def _tick(self) -> None:
        now = time.time()
        for item in [f for f in self.followups if f[0] <= now]:
            self.followups.remove(item)
            _, record, sig = item
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, sig)
            if sig == signal.SIGCONT:
                record.continued_at = time.time()
        self._poll_rows()
        self.event_rows += self.events.poll()
        self.job.workers()
        for record in list(self.open):
            self._update(record)
        self._check_exit()
        self._check_hang(now)

    def _poll_rows(self) -> None:
        for row in self.metrics.poll():
            self.recent.append((int(row["step"]), float(row["time"])))
            self.last_progress = time.time()

    def _check_exit(self) -> None:
        rc = self.job.exited()
        if rc is None:
            return
        self.job.exit_codes.append(rc)
        self.job.kill_leftovers()
        if rc == 0 and os.path.exists(os.path.join(self.job.workdir, "result.json")):
            self.done = True
        elif rc == EXIT_BAD_INPUT or self.job.starts >= self.max_starts:
            self.failed = True
        else:
            self.job.start()  # a scheduler's rerun of the same command
            self.last_progress = time.time()

    def _check_hang(self, now: float) -> None:
        for record in list(self.open):
            stopped = 10.0 if record.kind.startswith("SIGSTOP") else 0.0  # > stop_secs
            if now - record.fired > self.hang_secs + stopped:
                record.hung = True
                self.open.remove(record)
                self._restart_hung()
        if not self.open and now - self.last_progress > self.hang_secs:
            self.stalls += 1
            self._restart_hung()

    def _restart_hung(self) -> None:
        self.job.kill()
        self.job.exit_codes.append(-9)
        self.followups.clear()
        if self.job.starts >= self.max_starts:
            self.failed = True
        else:
            self.job.start()
        self.last_progress = time.time()

    # ---- one fault

    def _fire_when_ready(self, fault: Fault) -> None:
        if fault.phase == "restore":
            # A (re)start to aim at: the first start, or one a fault still open will cause
            # (a fault that recovered without one, a held SIGSTOP, leaves none: 'missed').
            since = self.records[-1].fired if self.records else float("-inf")
            restarted = lambda: self.job.newest_start() > since  # noqa: E731
            self._wait(lambda: restarted() or not (self.open or self._restarting()),
                       self.restore_wait)  # fmt: skip
        elif not self._wait(self._training, timeout=None):
            return
        self._wait(lambda: False, fault.delay)
        target = self._target(fault)
        if target is None or self.done or self.failed:
            return
        hit = self._wait_for_save() if fault.phase == "save" else ""
        self._poll_rows()  # the newest rows, just before the signal
        if fault.phase == "restore":
            hit = "before first row" if self._restarting() else "missed"
        self._fire(fault, hit, *target)

    def _training(self) -> bool:
        """No fault open and a row written by the newest process."""
        return not self.open and not self._restarting()

    def _restarting(self) -> bool:
        """The newest process has written no metrics row yet."""
        return self.metrics.last_time < self.job.newest_start()

    def _wait_for_save(self) -> str:
        deadline = time.time() + self.save_wait
        next_tick = 0.0
        while time.time() < deadline and not (self.done or self.failed):
            found = save_in_progress(self.save_folders)
            if found:
                return "orbax tmp" if "orbax" in found else "memory tmp"
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.tick_secs
            time.sleep(0.002)
        return "missed"

    def _target(self, fault: Fault) -> tuple[int, int] | None:
        """(pid, process id) to signal: process 0 or another, as the fault says; when the
        one it wants is not running (a lost process not yet back), waits a little."""
        want = None
        self._wait(lambda: len(self.job.workers()) > 0, timeout=30)
        if not self.job.launcher:
            return next(iter(self.job.workers().items()), None)
        for _ in range(2):
            workers = self.job.workers()
            picks = [(p, i) for p, i in workers.items() if (i == 0) == fault.coordinator]
            if picks:
                return min(picks, key=lambda x: x[1])
            want = sorted(workers.items(), key=lambda x: x[1])
            self._wait(lambda: False, 2.0)
        return want[0] if want else None

    def _fire(self, fault: Fault, hit: str, pid: int, process_id: int) -> None:
        record = FaultRecord(fault.index, fault.kind, fault.phase, hit=hit, pid=pid)
        record.target = f"p{process_id}" if self.job.launcher else "single"
        record.reached = self.metrics.max_step
        for prev in self.open:
            prev.superseded_by = fault.index
            record.reached = max(record.reached, prev.reached)
        self.open = [record]
        record.fired = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, _SIGNALS[fault.kind])
        if fault.kind == "SIGSTOP+KILL":
            self.followups.append((record.fired + fault.stop_secs, record, signal.SIGKILL))
        elif fault.kind == "SIGSTOP":
            self.followups.append((record.fired + fault.stop_secs, record, signal.SIGCONT))
        self.records.append(record)

    def _update(self, record: FaultRecord) -> None:
        """Looks for the row that shows `record`'s recovery among the rows since it."""
        if record.restarted_at is None:
            starts = [t for p, t in self.job.first_seen.items() if t > record.fired]
            record.restarted_at = min(starts, default=None)
        hot = [e for e in self.event_rows if e["kind"] == "host_loss" and e["time"] > record.fired]
        hot_step = hot[0].get("resumed_at") if hot else None
        rows = []
        for row in reversed(self.recent):  # the rows since the signal, newest first
            if row[1] <= record.fired:
                break
            rows.append(row)
        rows.reverse()  # oldest first
        for step, t in rows:
            after_restart = record.restarted_at is not None and t >= record.restarted_at
            after_cont = record.continued_at is not None and t > record.continued_at
            if after_restart or after_cont or step == hot_step:
                record.seen, record.resumed_from = t, step - 1
                self.open.remove(record)
                return
            record.reached = max(record.reached, step)
        # No effect: the target still runs and the job trained on well past the signal
        # (a SIGINT that Python swallowed: raised inside a garbage-collection callback).
        quiet = record.restarted_at is None and not record.kind.startswith("SIGSTOP")
        late = bool(rows) and rows[-1][1] > record.fired + self.no_effect_secs
        if quiet and late and _proc_alive(record.pid):
            record.seen, record.resumed_from = rows[0][1], rows[0][0] - 1
            record.reached = record.resumed_from  # nothing redone
            self.open.remove(record)


def run_random(
    command: list[str],
    base_dir: str,
    plan: list[Fault],
    mode: str,
    seed: int,
    reference: bool = True,
    hang_secs: float = 120.0,
    cwd: str | None = None,
) -> tuple[list[FaultRecord], Summary]:
    """A fault-free run of `command` (in base_dir/fault_free, when `reference`), then the
    same command under `plan` (in base_dir/random); `command` lacks --workdir and runs
    in `cwd` (default: this process's).

    Returns:
      (one record per fired fault, the summary).
    """
    ref_dir = os.path.join(base_dir, "fault_free") if reference else None
    if ref_dir and not os.path.exists(os.path.join(ref_dir, "result.json")):
        ref_job = Job([*command, f"--workdir={ref_dir}"], ref_dir, os.path.join(ref_dir, "logs"),
                      mode == "launcher", cwd)  # fmt: skip
        RandomChaos(ref_job, [], []).run()
    workdir = os.path.join(base_dir, "random")
    job = Job([*command, f"--workdir={workdir}"], workdir, os.path.join(base_dir, "logs"),
              mode == "launcher", cwd)  # fmt: skip
    chaos = RandomChaos(job, plan, save_folders(workdir), hang_secs=hang_secs)
    t0 = time.time()
    chaos.run()
    wall = time.time() - t0
    summary = summarize(
        chaos.records, workdir, ref_dir, mode=mode, seed=seed, done=chaos.done,
        stalls=chaos.stalls, starts=job.starts, exit_codes=job.exit_codes,
        leftovers=len(job.kill_leftovers(wait=0.5)), wall=wall,
    )  # fmt: skip
    return chaos.records, summary


def save_folders(workdir: str, num_processes: int = 2) -> list[str]:
    """Where a checkpoint of `workdir`'s run is written: Orbax's folder and the memory
    tier's per-process folders."""
    from jaxdml.config import default_config
    from jaxdml.training.tiers import local_root

    root = local_root(default_config(), workdir)
    return [os.path.join(workdir, "checkpoints")] + [
        os.path.join(root, f"process_{i}") for i in range(num_processes)
    ]
