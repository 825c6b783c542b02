"""The supervisor: classify a failure and choose the recovery; the trainer carries it out.

  failure            detected by           recovery (verbs of `Recoverable`)
  device lost        step's runtime error  reform(survivors): state from a live replica
  host lost          live_devices          reform(survivors) among the surviving processes
  NaN/Inf, spike     step guard / z-score  update skipped; repeated: rollback(batches set aside)
  silent corruption  replica fingerprints  reform(agreeing devices) + rollback (the newest
                     (checks, every save)  sealed checkpoint: its replicas agreed)
  hang               step watchdog         record, exit EXIT_HANG; the rerun resumes
  too few devices,   here                  reform + checkpoint_now, then GaveUp (report.json,
  budget spent                             EXIT_GAVE_UP)

The supervisor only reads the target's devices and finished step and calls its verbs: it
never assigns the state, and never does arithmetic on parameters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import ml_collections
from absl import logging

from jaxdml import liveness
from jaxdml.constants import EXIT_HANG
from jaxdml.faults import detect
from jaxdml.faults.errors import DeviceLost, GaveUp, RollbackNeeded, SilentCorruption
from jaxdml.training.hooks import Hook


class Recoverable(Protocol):
    """What the supervisor may ask of a training run (jaxdml.training.trainer.Trainer)."""

    @property
    def devices(self) -> list[jax.Device]:
        """The devices of the current mesh."""

    @property
    def finished_step(self) -> int:
        """The newest step that finished without error."""

    def reform(self, devices: Sequence[jax.Device]) -> int:
        """Mesh on `devices`, state of the finished step from their own replicas."""

    def rollback(self, set_aside_batches: Sequence[int] = ()) -> int:
        """The newest valid checkpoint; those steps' batches are skipped when rerun."""

    def checkpoint_now(self) -> int:
        """A synchronous checkpoint of the current state."""

    def record(self, kind: str, step: int, **fields) -> dict:
        """One line of events.jsonl."""


class Supervisor:
    """Classifies failures and chooses recoveries, within a budget.

    Args:
      config: the run's ConfigDict (reads config.supervisor).
      clock: monotonic clock (injectable for tests).
      exit_process: called with EXIT_HANG when the watchdog fires (os._exit).
      sleep: time.sleep-like, for recovery backoff.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], None] = os._exit,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg = config.supervisor
        self.clock, self.exit_process, self.sleep = clock, exit_process, sleep
        self.guard = detect.AnomalyGuard(
            self.cfg.nan_max_skips, self.cfg.nan_window, self.cfg.spike_zscore
        )
        self.recoveries = 0  # made so far, against cfg.max_recoveries

    # ------------------------------------------------------------------ detection

    def hooks(self, target: Recoverable) -> list[Hook]:
        """The detectors that run in the loop and belong to the supervisor: the anomaly
        guard. (Replica checks run with the checkpoint tiers: every save is verified.)"""
        return [_Guard(self.guard, target)]

    def on_hang(self, idle: float, target: Recoverable) -> None:
        """Watchdog thread: record the hang and exit; the restart resumes from a checkpoint."""
        step = target.finished_step
        logging.error("no progress for %.1f s after step %d: exiting (hang)", idle, step)
        target.record(
            "hang",
            step,
            action=f"exit {EXIT_HANG} for a restart from checkpoint",
            seconds_lost=idle,
        )
        self.exit_process(EXIT_HANG)

    # ------------------------------------------------------------------ recovery

    def recover(self, error: Exception, target: Recoverable) -> dict:
        """Chooses and carries out the recovery from `error` (through `target`'s verbs).

        Returns:
          What was done: kind, step, devices, action, steps_redone and `detected` (the
          clock when the failure surfaced), for the accounting.

        Raises:
          the error itself when it is not a failure we recover from (a bug, bad input);
          GaveUp when too few devices are left or the budget is spent.
        """
        kind = _kind(error)
        if kind == detect.PROGRAMMING:
            raise error
        detected = self.clock()
        self.recoveries += 1
        if self.recoveries > self.cfg.max_recoveries:
            self._give_up(f"recovery budget spent ({self.cfg.max_recoveries}) at {kind}", target)
        if self.cfg.backoff_secs:
            self.sleep(min(30.0, self.cfg.backoff_secs * 2 ** (self.recoveries - 1)))
        # The operator's one warning line per recovery comes when it is done, with its
        # cost (jaxdml.training.progress); the error itself is for --v=1.
        logging.vlog(1, "recovering from %s: %s", kind, error)
        if isinstance(error, RollbackNeeded):
            done = self._rollback(error, target)
        elif isinstance(error, SilentCorruption):
            done = self._exclude_and_replay(error, target)
        else:
            done = self._shrink(kind, error, target)
        return {"kind": kind, "detected": detected, **done}

    def _shrink(self, kind: str, error: Exception, target: Recoverable) -> dict:
        """Device/host loss: mesh on the healthy devices, state from a live replica."""
        old = target.devices
        if kind == detect.HOST_LOSS and liveness.multi_process():
            healthy = liveness.agree_on_live(old)
        else:
            known = set(error.devices) if isinstance(error, DeviceLost) else set()
            healthy = [d for d in old if int(d.id) not in known and liveness.answers(d)]
        lost = sorted(int(d.id) for d in old if d not in healthy)
        if not lost and kind == detect.HOST_LOSS:
            # Every device of the mesh is live: an error left over from before an earlier
            # loss (a collective that still had the dead peer). Go on from the newest
            # finished step on the same mesh; the budget bounds how often.
            step = target.reform(old)
            action = f"no device lost; the same mesh goes on from step {step}"
            return {"step": step, "devices": [], "action": action, "steps_redone": 0}
        if not lost:
            raise error  # nothing to exclude: retrying the same mesh would fail the same way
        if len(healthy) < self.cfg.min_devices:
            reason = f"{len(healthy)} healthy devices left, min_devices={self.cfg.min_devices}"
            self._give_up(reason, target, healthy=healthy, lost=lost)
        step = target.reform(healthy)
        action = (
            f"mesh {len(old)}->{len(healthy)} devices; state of step {step} from the "
            "survivors' own replicas"
        )
        return {"step": step, "devices": lost, "action": action, "steps_redone": 0}

    def _rollback(self, error: RollbackNeeded, target: Recoverable) -> dict:
        """Repeated NaN/spikes: newest valid checkpoint, offending batches set aside. The
        steps redone are all that finished past it (metrics arrive in bulk: the loop may
        be past the step that tripped the guard)."""
        reached = max(target.finished_step, error.step)
        to = target.rollback(set_aside_batches=error.steps)
        self.guard.reset()
        action = f"rolled back to checkpoint step {to}; batches of steps {error.steps} set aside"
        return {
            "step": error.step,
            "devices": [],
            "action": action,
            "steps_redone": max(0, reached - to),
            "restored_step": to,
        }

    def _exclude_and_replay(self, error: SilentCorruption, target: Recoverable) -> dict:
        """SDC: every update since the flip is polluted. The agreeing devices go on from the
        newest sealed checkpoint, whose replicas agreed when it was written."""
        keep = [d for d in target.devices if int(d.id) in error.good]
        if len(keep) < self.cfg.min_devices:
            self._give_up(f"replicas disagree at step {error.step}: too few agree", target)
        reached = max(target.finished_step, error.step)  # the checked step did finish
        target.reform(keep)
        to = target.rollback()
        action = (
            f"excluded devices {error.odd}; mesh on {len(keep)} devices; replay from the "
            f"newest verified checkpoint, step {to}"
        )
        return {
            "step": error.step,
            "devices": error.odd,
            "action": action,
            "steps_redone": max(0, reached - to),
            "restored_step": to,
        }

    def _give_up(self, reason: str, target: Recoverable, healthy=(), lost=()) -> None:
        """A final checkpoint from a live replica where one exists, then GaveUp."""
        step = target.finished_step
        saved = None
        if healthy:
            target.reform(healthy)
            saved = target.checkpoint_now()
        report = {
            "status": "gave_up",
            "reason": reason,
            "step": step,
            "lost_devices": list(lost),
            "checkpoint_step": saved,
        }
        raise GaveUp(report)


class _Guard(Hook):
    """Feeds finished steps' loss and skip flags to the anomaly guard; records each
    anomaly; asks for a rollback when they pile up."""

    def __init__(self, guard: detect.AnomalyGuard, target: Recoverable):
        self.guard, self.target = guard, target

    def on_metrics(self, rows: list[dict]) -> None:
        for row in rows:
            if row.get("set_aside"):
                continue
            step = row["step"]
            anomaly = self.guard.observe(step, float(row["loss"]), bool(row["skipped"]))
            if anomaly is None:
                continue
            action = "update skipped" if anomaly == "nan" else "update kept (spike recorded)"
            self.target.record(
                anomaly, step, devices=[], action=action, seconds_lost=row["seconds"]
            )
            if self.guard.rollback_due:
                raise RollbackNeeded(step, self.guard.recent())


def _kind(error: Exception) -> str:
    if isinstance(error, RollbackNeeded):
        return "rollback"
    if isinstance(error, SilentCorruption):
        return "sdc"
    return detect.classify(error)
