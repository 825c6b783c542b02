"""Which devices are alive: the health probe of one host and JAX's `live_devices` agreement
across processes.

Multi-host, each step runs as a `live_devices` transaction: it completes on every live
process or raises on every one, so the survivors of a dead peer never disagree on
whether a step happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from jaxdml.faults.errors import HostLost


def multi_process() -> bool:
    """Hot recovery across processes needs JAX's recoverability mode."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_recoverability)


@contextlib.contextmanager
def live_step(mesh_devices: Sequence[jax.Device]) -> Iterator[None]:
    """One step as a live_devices transaction (its body must also wait for the step).

    The empty block first is a barrier of the living: a peer that died since the last
    step is found here, before a collective waits for it. (Measured: on CPU with gloo in
    recoverable mode, a collective with a dead peer blocks forever; a death in the
    middle of a step is left to the watchdog, which turns it into an exit and a restart.)

    Raises:
      HostLost: devices of the mesh are not live any more.
    """
    from jax.experimental.multihost_utils import live_devices

    with live_devices(jax.devices()):
        pass
    with live_devices(jax.devices()) as live:
        missing = set(mesh_devices) - set(live)
        if missing:
            raise HostLost(sorted(int(d.id) for d in missing))
        yield


def agree_on_live(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """The surviving processes' common view of which of `devices` are alive (a barrier)."""
    from jax.experimental.multihost_utils import live_devices

    with live_devices(jax.devices()) as live:
        alive = set(live)
    return [d for d in devices if d in alive]


def answers(device: jax.Device) -> bool:
    """Whether `device` still takes a transfer (a dead device fails any)."""
    try:
        jax.device_put(np.zeros((), np.float32), device).block_until_ready()
    except Exception:  # noqa: BLE001 -- any failure means the device is gone
        return False
    return True
