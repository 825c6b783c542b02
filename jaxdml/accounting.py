"""Goodput and recovery accounting of a supervised run: an observer of the loop.

It watches finished steps (their times) and the recoveries the trainer reports, writes
one event per recovery once training is going again (with the seconds it cost), and
sums everything up for result.json.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from jaxdml.metrics import EventLog
from jaxdml.training.hooks import Hook, StepInfo

# Event kinds that count as faults in result.json's `faults`.
FAULT_KINDS = ("device_loss", "host_loss", "nan", "loss_spike", "sdc", "rollback", "hang")


class Accounting(Hook):
    """Step times, recoveries and goodput (productive step time / wall time).

    Args:
      events: the run's event log (recovery events are written to it).
      clock: monotonic clock (injectable for tests).
    """

    def __init__(self, events: EventLog, goodput=None, clock: Callable[[], float] = time.monotonic):
        self.events, self.clock, self.goodput = events, clock, goodput
        self.recoveries: list[dict] = []  # one per recovery, as written to events.jsonl
        self.step_seconds: dict[int, float] = {}  # latest execution time of each step
        self.last_progress = clock()  # when the newest step was dispatched
        self._pending: dict | None = None  # a recovery waiting for its first good step
        self.device_seconds: dict[int, float] = {}  # step time less the loop's host work
        self._first_of_loop = True
        self._compile_steps: set[int] = set()
        self._t0 = self.last_progress
        self._wall: float | None = None

    def start(self) -> None:
        self._t0 = self.last_progress = self.clock()
        self._wall = None
        self._first_of_loop = True

    def loop_started(self) -> None:
        """A new loop (after a recovery): its first step compiles."""
        self._first_of_loop = True

    def stop(self) -> None:
        self._wall = self.clock() - self._t0

    def after_step(self, info: StepInfo) -> bool:
        self.last_progress = self.clock()
        return False

    def on_metrics(self, rows: list[dict]) -> None:
        for row in rows:
            if self._first_of_loop:  # compilation for this mesh: not a step's own time
                self._first_of_loop = False
                self._compile_steps.add(row["step"])
            self.step_seconds[row["step"]] = row["seconds"]
            self.device_seconds[row["step"]] = max(0.0, row["seconds"] - row["stall_seconds"])
        if self.goodput is not None:  # first: the in-loop spans they resolve are charged
            self.goodput.steps(rows)  # before the recovery takes out the spans within it
        if self._pending is not None:
            self._close_recovery(rows[0])

    def begin_recovery(self, recovery: dict) -> None:
        """A recovery was made (kind, step, devices, action, steps_redone, `detected`: the
        clock when the failure surfaced); its event is written at the next finished step.
        Detection time is how long the loop had waited since its last progress (a host
        loss: the heartbeat timeout); recovery time counts from `detected` on."""
        recovery = dict(recovery)
        recovery["detect_seconds"] = max(0.0, recovery["detected"] - self.last_progress)
        # Spans recorded while it lasted, from the last progress on (a save that blocked,
        # the new mesh's compilation, a restore), are theirs, not the recovery's: goodput
        # counts each second once. (Wall clock: the goodput log's.)
        recovery["began"] = time.time() - (self.clock() - self.last_progress)
        if self._pending is not None:  # the previous one failed before a step finished
            self._close_recovery({"step": self._pending["step"], "time": time.time()}, False)
        self._pending = recovery

    def _close_recovery(self, row: dict, finished: bool = True) -> None:
        """The recovery ends when its first step finished (the row's own wall time: rows
        arrive in bulk, later); not `finished`: another failure came first."""
        p, self._pending, step = self._pending, None, row["step"]
        done_at = self.clock() - max(0.0, time.time() - row["time"])
        p["recover_seconds"] = max(0.0, done_at - p.pop("detected"))
        seconds = p["recover_seconds"] + p["detect_seconds"]
        began = p.pop("began")
        if self.goodput is not None:
            within = self.goodput.spent_before(row["time"]) - self.goodput.spent_before(began)
            self.goodput.span("recovery", max(0.0, seconds - within))
        # This step's time (recompilation for the new mesh) is in seconds_lost already;
        # count a typical step's worth of it as productive.
        if finished:
            others = [t for s, t in self.step_seconds.items() if s != step]
            self.step_seconds[step] = statistics.median(others) if others else 0.0
        kind, at = p.pop("kind"), p.pop("step")
        p.setdefault("devices", [])
        event = self.events.record(kind, at, seconds_lost=seconds, resumed_at=step, **p)
        self.recoveries.append(event)

    def report(self) -> dict:
        """Fault accounting for result.json: goodput, counts, lost steps, recovery times."""
        wall = self._wall if self._wall is not None else self.clock() - self._t0
        productive = sum(self.step_seconds.values())
        counts: dict[str, int] = {}
        for e in self.events.rows():
            if e["kind"] in FAULT_KINDS:
                counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        times = [r["seconds_lost"] for r in self.recoveries]
        step_times = list(self.step_seconds.values()) or [0.0]
        median = statistics.median(step_times)
        device = [t for s, t in self.device_seconds.items() if s not in self._compile_steps]
        return {
            "goodput": productive / wall if wall > 0 else 0.0,
            "faults": counts,
            "recoveries": len(self.recoveries),
            "lost_steps": sum(r.get("steps_redone", 0) for r in self.recoveries),
            "recovery_seconds_mean": statistics.fmean(times) if times else 0.0,
            "recovery_seconds_max": max(times) if times else 0.0,
            "step_seconds_median": median,
            "step_seconds_max": max(step_times),
            "slow_steps": slow_steps(device),
        }


def slow_steps(seconds: list[float]) -> int:
    """Stragglers among step times (host work of the loop and compilations left out): a
    step slower than 5x the median and by more than 100 ms. A shared machine's jitter (a
    descheduled process on a loaded 2-core box loses tens of ms) and a checkpoint's
    background write stay below that; a device that stalls does not."""
    if not seconds:
        return 0
    median = statistics.median(seconds)
    return sum(t > max(5 * median, median + 0.1) for t in seconds)
