"""The supervisor: classify a failure, choose the recovery, resume the one loop.

  device lost        step's runtime error  mesh on the survivors, state from a live replica
  NaN/Inf, spike     step guard / z-score  update skipped; repeated: newest valid checkpoint,
                                           offending batches set aside
  silent corruption  replica fingerprints  exclude the odd device, replay from the last
                                           state all replicas agreed on
  hang               step watchdog         record, exit EXIT_HANG; the rerun resumes
  too few devices,   here                  final checkpoint, report.json, EXIT_GAVE_UP
  budget spent

The supervisor moves and chooses state; it never does arithmetic on parameters.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxdml import cli
from jaxdml.faults import detect
from jaxdml.training.loop import Loop, Periodic
from jaxdml.training.state import from_replica, to_host


class RollbackNeeded(Exception):
    """Too many non-finite updates / loss spikes within the window."""

    def __init__(self, step: int, steps: list[int]):
        super().__init__(f"{len(steps)} anomalies at steps {steps} (last at step {step})")
        self.step, self.steps = step, steps


class SilentCorruption(Exception):
    """Replica fingerprints disagree: `odd` devices hold different parameters."""

    def __init__(self, step: int, odd: list[int], good: list[int]):
        super().__init__(f"replicas disagree at step {step}: odd devices {odd}, agreeing {good}")
        self.step, self.odd, self.good = step, odd, good


class HostLost(RuntimeError):
    """Devices of the mesh are no longer live: their process died (ProcessFailure)."""

    def __init__(self, device_ids: list[int]):
        super().__init__(f"ProcessFailure: devices {device_ids} are not live")
        self.device_ids = device_ids


class GaveUp(Exception):
    """Recovery is impossible (too few devices) or its budget is spent."""

    def __init__(self, report: dict):
        super().__init__(report["reason"])
        self.report = report


class Supervisor:
    """Runs a Trainer's loop and recovers it from failures, in the same process.

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
        self.recoveries: list[dict] = []  # one per recovery, as written to events.jsonl
        self.snapshot: tuple[int, Any] | None = None  # (step, host state) all replicas agreed on
        self._pending: dict | None = None  # recovery event waiting for its first good step
        self._step_seconds: dict[int, float] = {}  # latest execution time of each step
        self._loop: Loop | None = None
        self._last_step = 0

    # ------------------------------------------------------------------ loop

    def run(self, trainer, should_stop: Callable[[int], bool]) -> None:
        """Trains `trainer` to its last step (or `should_stop`), recovering on failures."""
        self.trainer = trainer
        self._t0 = self._last_progress = self.clock()
        trainer.observers.append(self._observe)
        with detect.Watchdog(self.cfg.watchdog_secs, self._on_hang, self.clock) as self.watchdog:
            while True:
                hooks = trainer.checkpoint_hooks() + self._replica_check_hooks()
                guard = self._live_step if self._multi_process else None
                self._loop = trainer.make_loop(
                    hooks=hooks, should_stop=should_stop, step_guard=guard
                )
                try:
                    trainer.state = self._loop.run(trainer.state)
                    break
                except Exception as error:  # noqa: BLE001 -- classified; bugs are re-raised
                    self._recover(error)
                    self.watchdog.pet()
        self._wall = self.clock() - self._t0

    def _replica_check_hooks(self) -> list[Periodic]:
        every = self.cfg.fingerprint_every
        return [Periodic(self._check_replicas, every_steps=every)] if every else []

    def _observe(self, step: int, row: dict) -> None:
        """Called with every finished step's metrics row."""
        self.watchdog.pet()
        self._last_step = step
        self._last_progress = self.clock()
        if self._loop is not None and self._loop.step_seconds:
            self._step_seconds[step] = self._loop.step_seconds[-1]
        if self._pending is not None:
            self._close_recovery(step)
        if row.get("set_aside"):
            return
        anomaly = self.guard.observe(step, float(row["loss"]), bool(row["skipped"]))
        if anomaly is not None:
            action = "update skipped" if anomaly == "nan" else "update kept (spike recorded)"
            self._event(anomaly, step, action=action, seconds_lost=self._step_seconds.get(step, 0))
            if self.guard.rollback_due:
                raise RollbackNeeded(step, self.guard.recent())

    def _check_replicas(self, step: int, state) -> None:
        mesh = self.trainer.mesh
        ids = [int(d.id) for d in mesh.devices.flat]
        good, odd = detect.majority(detect.replica_fingerprints(state.params, mesh), ids)
        if odd:
            raise SilentCorruption(step, odd, good)
        self.snapshot = (step, to_host(state))

    # -------------------------------------------------------------- recovery

    def _recover(self, error: Exception) -> None:
        kind = self._kind(error)
        if kind == detect.PROGRAMMING:
            raise error
        detected = self.clock()
        n = len(self.recoveries) + 1
        step = self._loop.last_good[0] if self._loop and self._loop.last_good else 0
        if n > self.cfg.max_recoveries:
            self._give_up(f"recovery budget spent ({self.cfg.max_recoveries}) at {kind}", step)
        if self.cfg.backoff_secs:
            self.sleep(min(30.0, self.cfg.backoff_secs * 2 ** (n - 1)))
        logging.warning("recovering from %s: %s", kind, error)
        if isinstance(error, RollbackNeeded):
            fields = self._rollback_to_checkpoint(error)
        elif isinstance(error, SilentCorruption):
            fields = self._exclude_and_replay(error)
        else:
            fields = self._shrink_mesh(kind, error)
        # How long the loop waited before the failure surfaced (a host loss: the
        # heartbeat timeout); recovery time is counted from `detected` on.
        waited = detected - getattr(self, "_last_progress", detected)
        self._pending = {"kind": kind, "detected": detected, "detect_seconds": waited, **fields}

    @staticmethod
    def _kind(error: Exception) -> str:
        if isinstance(error, RollbackNeeded):
            return "rollback"
        if isinstance(error, SilentCorruption):
            return "sdc"
        return detect.classify(error)

    def _shrink_mesh(self, kind: str, error: Exception) -> dict:
        """Device/host loss: mesh on the healthy devices, state from a live replica."""
        tr = self.trainer
        step, state = self._loop.last_good
        old = list(tr.mesh.devices.flat)
        if kind == detect.HOST_LOSS and self._multi_process:
            healthy = self._agree_on_live(old)
        else:
            healthy = [d for d in old if self._alive(d)]
        lost = sorted(int(d.id) for d in old if d not in healthy)
        if not lost:
            raise error  # nothing to exclude: retrying the same mesh would fail the same way
        if len(healthy) < self.cfg.min_devices:
            self._give_up(
                f"{len(healthy)} healthy devices left, min_devices={self.cfg.min_devices}",
                step,
                devices=healthy,
                state=state,
                lost=lost,
            )
        tr.set_devices(healthy)
        tr.state = from_replica(state, tr.mesh)
        if kind == detect.HOST_LOSS:
            survivors = sorted({int(d.process_index) for d in healthy})
            tr.checkpointer.restrict_to(survivors)
            tr.live_processes = survivors
        action = (
            f"mesh {len(old)}->{len(healthy)} devices; state of step {step} from the "
            "survivors' own replicas"
        )
        return {"step": step, "devices": lost, "action": action, "steps_redone": 0}

    @property
    def _multi_process(self) -> bool:
        """Hot recovery across processes needs JAX's recoverability mode."""
        return jax.process_count() > 1 and bool(jax.config.jax_enable_recoverability)

    @contextlib.contextmanager
    def _live_step(self):
        """One step as a live_devices transaction: it completes on every process or
        raises on every process (ProcessFailureError when a peer died during it).

        The empty block first is a barrier of the living: a peer that died since the
        last step is found here, before a collective waits for it. (Measured: on CPU
        with gloo in recoverable mode, a collective with a dead peer blocks forever;
        a death in the middle of a step is left to the watchdog, which turns it into
        an exit and a restart.)
        """
        from jax.experimental.multihost_utils import live_devices

        with live_devices(jax.devices()):
            pass
        with live_devices(jax.devices()) as live:
            missing = set(self.trainer.mesh.devices.flat) - set(live)
            if missing:
                raise HostLost(sorted(int(d.id) for d in missing))
            yield

    @staticmethod
    def _agree_on_live(devices: list[jax.Device]) -> list[jax.Device]:
        """The survivors' common view of which of `devices` are alive (a barrier)."""
        from jax.experimental.multihost_utils import live_devices

        with live_devices(jax.devices()) as live:
            alive = set(live)
        return [d for d in devices if d in alive]

    def _alive(self, device: jax.Device) -> bool:
        if int(device.id) in self.trainer.injector.lost_devices:
            return False
        try:
            jax.device_put(np.zeros((), np.float32), device).block_until_ready()
        except Exception:  # noqa: BLE001 -- a dead device fails any transfer
            return False
        return True

    def _rollback_to_checkpoint(self, error: RollbackNeeded) -> dict:
        """Repeated NaN/spikes: newest valid checkpoint, offending batches set aside."""
        tr = self.trainer
        tr.checkpointer.wait()
        tr.skip_steps.update(error.steps)
        tr.state = tr.restore_latest()
        to = int(to_host(tr.state.step))
        self.guard.reset()
        action = f"rolled back to checkpoint step {to}; batches of steps {error.steps} set aside"
        return {
            "step": error.step,
            "devices": [],
            "action": action,
            "steps_redone": error.step - to,
            "restored_step": to,
        }

    def _exclude_and_replay(self, error: SilentCorruption) -> dict:
        """SDC: every update since the flip is polluted; go back to the last agreed state."""
        tr = self.trainer
        tr.checkpointer.wait()
        keep = [d for d in tr.mesh.devices.flat if int(d.id) in error.good]
        if len(keep) < self.cfg.min_devices or self.snapshot is None:
            self._give_up(
                f"replicas disagree at step {error.step} and no trusted state", error.step
            )
        to, host_state = self.snapshot
        for step in tr.checkpointer.steps():
            if step > to:  # written after the last agreement: may hold polluted parameters
                tr.checkpointer.set_aside(step, f"written after last replica agreement ({to})")
        tr.set_devices(keep)
        tr.state = jax.device_put(host_state, tr.replicated_sharding())
        tr.metrics.truncate_after(to)
        action = (
            f"excluded devices {error.odd}; mesh on {len(keep)} devices; replay from the "
            f"agreed state of step {to}"
        )
        return {
            "step": error.step,
            "devices": error.odd,
            "action": action,
            "steps_redone": error.step - to,
            "restored_step": to,
        }

    def _close_recovery(self, step: int) -> None:
        """Writes the pending recovery event once its first step after recovery finished."""
        p, self._pending = self._pending, None
        recover = self.clock() - p.pop("detected")
        p["recover_seconds"] = recover
        seconds = recover + p["detect_seconds"]
        # This step's time (recompilation for the new mesh) is in seconds_lost already;
        # count a typical step's worth of it as productive.
        others = [t for s, t in self._step_seconds.items() if s != step]
        self._step_seconds[step] = statistics.median(others) if others else 0.0
        kind = p.pop("kind")
        event = self._event(kind, p.pop("step"), seconds_lost=seconds, resumed_at=step, **p)
        self.recoveries.append(event)

    def _event(self, kind: str, step: int, **fields) -> dict:
        fields.setdefault("devices", [])
        return self.trainer.events.record(kind, step, **fields)

    # -------------------------------------------------------------- stopping

    def _give_up(self, reason: str, step: int, devices=None, state=None, lost=()) -> None:
        """Final checkpoint (from a live replica where one exists), report, GaveUp."""
        tr = self.trainer
        saved = None
        if devices and state is not None:
            tr.set_devices(devices)
            tr.state = from_replica(state, tr.mesh)
            tr.save_checkpoint(step, tr.state, wait=True)
            saved = step
        report = {
            "status": "gave_up",
            "reason": reason,
            "step": step,
            "lost_devices": list(lost),
            "checkpoint_step": saved,
            **self.report(),
        }
        self._event("gave_up", step, devices=list(lost), action=reason, checkpoint_step=saved)
        with open(os.path.join(tr.workdir, "report.json"), "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        tr.close()
        raise GaveUp(report)

    def _on_hang(self, idle: float) -> None:
        """Watchdog thread: record the hang and exit; the restart resumes from a checkpoint."""
        step = self._last_step
        logging.error("no progress for %.1f s after step %d: exiting (hang)", idle, step)
        self._event(
            "hang",
            step,
            action=f"exit {cli.EXIT_HANG} for a restart from checkpoint",
            seconds_lost=idle,
        )
        self.exit_process(cli.EXIT_HANG)

    def report(self) -> dict:
        """Fault accounting for result.json: goodput, counts, lost steps, recovery times."""
        wall = getattr(self, "_wall", None) or (self.clock() - self._t0)
        productive = sum(self._step_seconds.values())
        counts: dict[str, int] = {}
        for e in self.trainer.events.rows():
            if e["kind"] == "fault_injected":
                continue
            if e["kind"] in (
                "device_loss",
                "host_loss",
                "nan",
                "loss_spike",
                "sdc",
                "rollback",
                "hang",
            ):
                counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        times = [r["seconds_lost"] for r in self.recoveries]
        step_times = list(self._step_seconds.values()) or [0.0]
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
