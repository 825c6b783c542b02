"""Which devices are alive, and what every process decides together.

One host: a device is alive when it still takes a transfer. Several processes: steps run
in spans, each a `live_devices` transaction: it completes on every live process or raises
on every one (ProcessFailureError when a peer died), so the survivors of a dead peer
never disagree on which steps happened. A collective whose peer died fails after XLA's
CPU collective timeout (jaxdml.distributed.set_collective_timeout) instead of blocking,
which is what lets a kill at any moment end inside the transaction.

`Agreement` carries the decisions that depend on one process's clock or signals (stop
for a preemption, a time-based save) to every process at the same span end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from jaxdml.distributed import client as _client
from jaxdml.faults.errors import HostLost

_PREFIX = "jaxdml/decide"


def multi_process() -> bool:
    """Hot recovery across processes needs JAX's recoverability mode."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_recoverability)


class Agreement:
    """Decisions taken by every process at the same step.

    Single process: a decision is taken as soon as it is due. Several processes: a due
    decision is published in the coordination service's key-value store before the next
    span's barrier and read by every process after it, so all act on it at that span's
    end (one span later than the process that saw it due; one RPC per span).

    Args:
      multi: several processes (False: decide locally, nothing is published).
      leader: this process's own clock counts (process 0); others' due times are ignored
        for clock-driven decisions, so they do not fire twice.
    """

    def __init__(self, multi: bool, leader: bool = True):
        self.multi, self.leader = multi, leader
        self._proposed: set[str] = set()
        self._decided: set[str] = set()

    def decide(self, kind: str, due: bool, anyone: bool = False) -> bool:
        """Whether to do `kind` now. `due`: this process would; `anyone`: any process's
        proposal counts (a stop signal), else only the leader's (a clock)."""
        if not self.multi:
            return due
        if due and (anyone or self.leader):
            self._proposed.add(kind)
        return kind in self._decided

    def decider(self, kind: str, anyone: bool = False) -> Callable[[bool], bool]:
        """`decide` bound to one kind (for jaxdml.training.hooks.Periodic's `agree`)."""
        return lambda due: self.decide(kind, due, anyone)

    def publish(self, step: int) -> None:
        """Inside the span's transaction, before its barrier: this process's proposals."""
        client = _client()
        for kind in sorted(self._proposed):
            client.key_value_set(f"{_PREFIX}/{step}/{kind}", "1", allow_overwrite=True)
        self._proposed.clear()

    def settle(self, step: int) -> None:
        """After the span's barrier: what any process proposed for this span end."""
        entries = _client().key_value_dir_get(f"{_PREFIX}/{step}/")
        self._decided = {key.rsplit("/", 1)[-1] for key, _ in entries}


class Spans:
    """The multi-process transaction around each span of steps (jaxdml.training.loop).

    Args:
      devices: returns the devices of the current mesh.
      agreement: published inside each transaction and settled after it.
    """

    def __init__(self, devices: Callable[[], Sequence[jax.Device]], agreement: Agreement):
        self.devices, self.agreement = devices, agreement

    @contextlib.contextmanager
    def __call__(self, end_step: int) -> Iterator[None]:
        from jax.experimental.multihost_utils import live_devices

        with live_devices(jax.devices()) as live:
            missing = set(self.devices()) - set(live)
            if missing:
                raise HostLost(sorted(int(d.id) for d in missing))
            yield
            self.agreement.publish(end_step)
        self.agreement.settle(end_step)


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
