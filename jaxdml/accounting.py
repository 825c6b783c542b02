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

    def __init__(self, events: EventLog, clock: Callable[[], float] = time.monotonic):
        self.events, self.clock = events, clock
        self.recoveries: list[dict] = []  # one per recovery, as written to events.jsonl
        self.step_seconds: dict[int, float] = {}  # latest execution time of each step
        self.last_progress = clock()  # when the newest step was dispatched
        self._pending: dict | None = None  # a recovery waiting for its first good step
        self._t0 = self.last_progress
        self._wall: float | None = None

    def start(self) -> None:
        self._t0 = self.last_progress = self.clock()
        self._wall = None

    def stop(self) -> None:
        self._wall = self.clock() - self._t0

    def after_step(self, info: StepInfo) -> bool:
        self.last_progress = self.clock()
        return False

    def on_metrics(self, rows: list[dict]) -> None:
        for row in rows:
            self.step_seconds[row["step"]] = row["seconds"]
        if self._pending is not None:
            self._close_recovery(rows[0]["step"])

    def begin_recovery(self, recovery: dict) -> None:
        """A recovery was made (kind, step, devices, action, steps_redone, `detected`: the
        clock when the failure surfaced); its event is written at the next finished step.
        Detection time is how long the loop had waited since its last progress (a host
        loss: the heartbeat timeout); recovery time counts from `detected` on."""
        recovery = dict(recovery)
        recovery["detect_seconds"] = max(0.0, recovery["detected"] - self.last_progress)
        self._pending = recovery

    def _close_recovery(self, step: int) -> None:
        p, self._pending = self._pending, None
        p["recover_seconds"] = self.clock() - p.pop("detected")
        seconds = p["recover_seconds"] + p["detect_seconds"]
        # This step's time (recompilation for the new mesh) is in seconds_lost already;
        # count a typical step's worth of it as productive.
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
        return {
            "goodput": productive / wall if wall > 0 else 0.0,
            "faults": counts,
            "recoveries": len(self.recoveries),
            "lost_steps": sum(r.get("steps_redone", 0) for r in self.recoveries),
            "recovery_seconds_mean": statistics.fmean(times) if times else 0.0,
            "recovery_seconds_max": max(times) if times else 0.0,
            "step_seconds_median": median,
            "step_seconds_max": max(step_times),
            "slow_steps": sum(t > 3 * median for t in step_times),
        }
