"""The failures the supervisor tells apart, as exceptions.

Detectors raise them (or the runtime raises its own, which `detect.classify` names);
the supervisor catches them and chooses a recovery.
"""

from __future__ import annotations


class DeviceLost(RuntimeError):
    """A device stopped answering. `devices` are the ids known to be lost (empty: unknown;
    the supervisor then probes every device of the mesh).

    The injector raises it with XLA's wording ("UNAVAILABLE: ... lost"), so the message
    reads like the runtime error a real loss gives.
    """

    def __init__(self, message: str, devices: tuple[int, ...] = ()):
        super().__init__(message)
        self.devices = tuple(devices)


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
