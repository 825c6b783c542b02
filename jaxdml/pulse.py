"""Each process's sign of life, and a barrier that stops waiting for a dead member.

In recoverable mode the coordination service notices a dead process by its heartbeats,
but a barrier that includes it keeps waiting until its own timeout. Orbax's background
threads meet at such barriers (a save's commit and finalize, with a 600 s timeout), and
the next save waits for the previous one in the training thread. Measured under
jaxdml.launch (2 x 2 devices, saves every 20 steps): a peer SIGKILLed while a save was
in flight held the survivor in the finalize barrier until the step watchdog turned the
loss into an exit, in 2 of 6 random-moment kills, instead of the in-process recovery.

So each process of a recoverable job keeps a counter in the coordination service's
key-value store, raised every `interval` seconds by a thread. `Pulse.barrier` waits
for the others in slices; between slices it looks at the counters, and a member whose
counter has not moved for `dead_after` seconds fails the barrier with HostLost. A save
that fails so is a failed save (recorded, training goes on); the training thread's
next span names the dead peer and the supervisor recovers as from any host loss.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable

from absl import logging

from jaxdml.faults.errors import HostLost

_PULSE = "jaxdml/pulse"
_BARRIER = "jaxdml/barrier"


class Pulse:
    """This process's counter in the key-value store, and what it sees of the others'.

    Args:
      client: the coordination-service client (jaxdml.distributed.client()).
      me: this process's index.
      dead_after: seconds without a change in a peer's counter after which it is dead
        (the job's heartbeat timeout).
      interval: seconds between raises of this process's counter.
      devices_of: the device ids of a process (named by HostLost).
    """

    def __init__(
        self,
        client,
        me: int,
        dead_after: float,
        interval: float,
        devices_of: Callable[[int], list[int]],
    ):
        self._client, self.me = client, me
        self.dead_after, self.interval = dead_after, interval
        self._devices_of = devices_of
        self._seen: dict[int, tuple[str | None, float]] = {}  # peer -> (counter, since)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat_once(0)
        self._thread = threading.Thread(target=self._beat, name="jaxdml-pulse", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # not from a daemon thread during interpreter teardown

    def _beat_once(self, n: int) -> None:
        self._client.key_value_set(f"{_PULSE}/{self.me}", str(n), allow_overwrite=True)

    def _beat(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            try:
                self._beat_once(n)
            except Exception as e:  # noqa: BLE001 -- the service is gone: nothing to tell
                logging.info("pulse stopped: %s", str(e)[:200])
                return

    def stop(self) -> None:
        """Stops raising the counter (before leaving the job)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)

    def alive(self, peer: int) -> bool:
        """Whether `peer`'s counter moved within the last `dead_after` seconds (as seen
        from here: each process judges by its own clock, never by a peer's)."""
        try:
            value = self._client.key_value_try_get(f"{_PULSE}/{peer}")
        except Exception as e:  # noqa: BLE001
            if "NOT_FOUND" not in str(e):
                raise
            value = None  # not started yet: judged by how long it has been missing
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(peer)
            if last is None or last[0] != value:
                self._seen[peer] = (value, now)
                return True
            return now - last[1] < self.dead_after

    def get(self, key: str, peer: int, deadline: float) -> str:
        """The value `peer` sets at `key`, once it does. Raises HostLost as soon as the
        peer is dead, TimeoutError at `deadline` (time.monotonic())."""
        slice_ms = max(1, int(self.interval * 1000))
        while True:
            try:
                return self._client.blocking_key_value_get(key, slice_ms)
            except Exception as e:  # noqa: BLE001 -- a slice ran out; look at the peer
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
            if not self.alive(peer):
                raise HostLost(self._devices_of(peer))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key}: process {peer} did not answer")

    def barrier(self, key: str, timeout_secs: float, process_ids: list[int]) -> None:
        """Waits until every process of `process_ids` reached barrier `key` (which must be
        new in the job). Raises HostLost as soon as one of them is dead, TimeoutError
        after `timeout_secs`."""
        self._client.key_value_set(f"{_BARRIER}/{key}/{self.me}", "1", allow_overwrite=True)
        deadline = time.monotonic() + timeout_secs
        for peer in sorted(set(process_ids) - {self.me}):
            self.get(f"{_BARRIER}/{key}/{peer}", peer, deadline)

    def orbax_barrier(self, process_ids: list[int]):
        """`barrier` over `process_ids` in the form of Orbax's AsyncOptions.barrier_sync_fn."""
        ids = sorted(process_ids)

        def sync(*, key: str, timeout_ms: int) -> None:
            self.barrier(key, timeout_ms / 1000, ids)

        return sync
