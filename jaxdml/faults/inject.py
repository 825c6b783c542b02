"""Fault plans: what fails, when, and on which device, for tests, demos and chaos runs.

A plan is a comma-separated list of `kind@step[:devices]` entries:

  device_loss@120:3     device 3 is lost before step 121 (its step raises)
  device_loss@300:1+2   devices 1 and 2 are lost at once
  nan@50                the batch of step 51 carries NaN (the update must be skipped)
  nan@60-64             NaN on steps 61..65 (repeated: rollback)
  bitflip@200:1         an exponent bit of one parameter flips on device 1 only
  hang@300:2            step 301 never finishes in the process holding device 2 (the
                        watchdog must fire)
  slow@80-160:0         device 0 is a straggler (sleeps) for steps 81..161
  sigterm@400           the process receives SIGTERM (preemption)
  sigkill@450           the process is SIGKILLed (a crash)
  host_loss@500:1       (multi-host) process 1 is SIGKILLed (the devices field names
                        processes here)

`@N` means "after N completed steps, before the next one is dispatched". Device
numbers are positions in jax.devices() (the ids, on one CPU host).
A fault fires once per workdir: fired faults are recorded in events.jsonl and a
rerun of the same command (resuming) does not fire them again.
"""

from __future__ import annotations

import dataclasses
import re

from jaxdml.constants import UNLIMITED_STEPS
from jaxdml.faults.errors import DeviceLost

KINDS = (
    "device_loss",
    "host_loss",
    "nan",
    "bitflip",
    "hang",
    "slow",
    "sigterm",
    "sigkill",
)
NEEDS_DEVICE = ("device_loss", "host_loss", "bitflip")

_ENTRY = re.compile(r"^(?P<kind>[a-z_]+)@(?P<start>\d+)(?:-(?P<end>\d+))?(?::(?P<dev>[\d+]+))?$")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One planned fault: `kind` on `devices` for steps start..end (inclusive)."""

    kind: str
    start: int
    end: int
    devices: tuple[int, ...] = ()

    @property
    def spec(self) -> str:
        """The plan entry this fault was parsed from (canonical spelling)."""
        span = str(self.start) if self.end == self.start else f"{self.start}-{self.end}"
        devs = ":" + "+".join(map(str, self.devices)) if self.devices else ""
        return f"{self.kind}@{span}{devs}"

    def active_at(self, step: int) -> bool:
        return self.start <= step <= self.end


class FaultPlanError(ValueError):
    """A fault plan string that cannot be parsed."""


def parse(plan: str) -> list[Fault]:
    """Parses a fault plan string (see the module docstring) into Faults, by step.

    Raises:
      FaultPlanError: naming the bad entry.
    """
    faults = []
    for raw in (p.strip() for p in plan.split(",")):
        if not raw:
            continue
        m = _ENTRY.match(raw)
        if not m or m["kind"] not in KINDS:
            raise FaultPlanError(
                f"bad fault entry {raw!r}: expected kind@step[-end][:dev[+dev]] with kind in "
                f"{list(KINDS)}"
            )
        start = int(m["start"])
        end = int(m["end"]) if m["end"] else start
        if end < start:
            raise FaultPlanError(f"bad fault entry {raw!r}: end step before start step")
        devices = tuple(int(d) for d in m["dev"].split("+") if d) if m["dev"] else ()
        if m["kind"] in NEEDS_DEVICE and not devices:
            raise FaultPlanError(f"bad fault entry {raw!r}: {m['kind']} needs :device")
        faults.append(Fault(m["kind"], start, end, devices))
    return sorted(faults, key=lambda f: (f.start, f.kind))


def check_targets(faults: list[Fault], num_devices: int, num_processes: int) -> None:
    """Every device (and, for host_loss, process) a plan names exists in this job.

    Raises:
      FaultPlanError: naming the entry and what the job has.
    """
    for f in faults:
        if f.kind == "host_loss":
            bad = [p for p in f.devices if p >= num_processes]
            if bad:
                raise FaultPlanError(
                    f"{f.spec}: process {bad[0]} does not exist (the job has {num_processes})"
                )
        elif any(d >= num_devices for d in f.devices):
            bad = next(d for d in f.devices if d >= num_devices)
            raise FaultPlanError(
                f"{f.spec}: device {bad} does not exist (the job has devices 0..{num_devices - 1})"
            )


class Injector:
    """Fires the faults of a plan at the step boundary where each would appear.

    Args:
      faults: the parsed plan.
      already_fired: specs recorded as fired by an earlier run of this workdir.
      record: callback(kind, step, **fields) that writes events.jsonl (flushed).
      kill: os.kill-like callable (injectable for tests).
      sleep: time.sleep-like callable (injectable for tests).
    """

    def __init__(self, faults, already_fired=(), record=None, kill=None, sleep=None):
        import os
        import signal
        import time

        self.faults = list(faults)
        self.fired: set[str] = set(already_fired)
        self._record = record or (lambda *a, **k: None)
        self._kill = kill or (lambda sig: os.kill(os.getpid(), sig))
        self._sleep = sleep or time.sleep
        self._signal = signal

    @staticmethod
    def _holds_device(index: int | None) -> bool:
        """Whether this process holds device number `index` of the job (None: yes).
        Devices are numbered by their position in jax.devices()."""
        import jax

        if index is None:
            return True
        devices = jax.devices()
        return index < len(devices) and devices[index].process_index == jax.process_index()

    @staticmethod
    def _process_index() -> int:
        import jax

        return jax.process_index()

    def _due(self, step: int, kind: str):
        for f in self.faults:
            if f.kind == kind and f.active_at(step) and self._key(f, step) not in self.fired:
                yield f

    @staticmethod
    def _key(f: Fault, step: int) -> str:
        return f.spec if f.start == f.end else f"{f.spec}#{step}"

    def _fire(self, f: Fault, step: int, **fields) -> None:
        self.fired.add(self._key(f, step))
        self._record(
            "fault_injected",
            step,
            fault=self._key(f, step),
            fault_kind=f.kind,
            devices=list(f.devices),
            **fields,
        )

    def max_fused(self, step: int) -> int:
        """Steps from `step` before the next fault is due: a fused call
        (`train.steps_per_call`) ends there, and the faulty step runs alone."""
        due = [
            max(f.start, step)
            for f in self.faults
            if f.end >= step and not (f.start == f.end and self._key(f, f.start) in self.fired)
        ]
        return max(1, min(due) - step) if due else UNLIMITED_STEPS

    def before_step(self, step: int, state, batch: dict):
        """Applies the faults due after `step` completed steps; returns (state, batch)."""
        if not self.faults:  # the loop calls this at every step
            return state, batch
        for f in self._due(step, "slow"):
            self._sleep(0.05)  # a straggler: recorded once per span start, slows every step
            if step == f.start:
                self._fire(f, step)
        for f in self._due(step, "nan"):
            self._fire(f, step)
            batch = {**batch, "x": batch["x"] * float("nan")}
        for f in self._due(step, "bitflip"):
            self._fire(f, step)
            state = state.replace(params=flip_bit(state.params, f.devices[0]))
        for f in self._due(step, "sigterm"):
            self._fire(f, step)
            self._kill(self._signal.SIGTERM)
        for f in self._due(step, "sigkill"):
            self._fire(f, step)
            self._kill(self._signal.SIGKILL)
        for f in self._due(step, "host_loss"):
            if self._process_index() in f.devices:  # the lost host is this process
                self._fire(f, step)
                self._kill(self._signal.SIGKILL)
        for f in self._due(step, "device_loss"):
            self._fire(f, step)
            raise DeviceLost(
                f"UNAVAILABLE: device(s) {list(f.devices)} lost during step {step + 1} (injected)",
                f.devices,
            )
        for f in self._due(step, "hang"):
            if not self._holds_device(f.devices[0] if f.devices else None):
                continue
            self._fire(f, step)
            while True:  # a hung collective: only the watchdog ends this
                self._sleep(3600)
        return state, batch


def flip_bit(params, device_id: int, bit: int = 26):
    """Flips `bit` of the first element of the first parameter leaf, in the replica on
    device `device_id` only. Bit 26 is a float32 exponent bit: the value is scaled by
    2^8 or 2^-8, a large but finite error that only the replica fingerprints catch."""
    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(params)
    leaf = leaves[0]
    shards = []
    for shard in leaf.addressable_shards:
        data = shard.data
        if shard.device.id == device_id:
            host = np.array(data)
            flat = host.reshape(-1).view(np.uint32)
            flat[0] ^= np.uint32(1 << bit)
            data = jax.device_put(host, shard.device)
        shards.append(data)
    leaves[0] = jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, shards)
    return jax.tree.unflatten(treedef, leaves)
