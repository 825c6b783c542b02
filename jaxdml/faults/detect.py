"""Detectors: pytree fingerprints (checkpoint checksums, replica agreement)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdml.faults.errors import DeviceLost

_K1, _K2, _K3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The leaf's raw bits as a flat uint32 vector (bitwise: -0.0 != 0.0, NaN payloads count)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    if x.dtype.itemsize < 4:
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        return x.astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)


def fingerprint(tree: Any) -> jax.Array:
    """A 64-bit (uint32[2]) position-sensitive hash of every bit of every leaf.

    Integer sums wrap and are associative, so the value does not depend on
    reduction order or device count: the same bits give the same fingerprint
    on any mesh. Not cryptographic; it catches torn files and flipped bits.

    Both sums are one variadic reduction, one pass over the bits: as two `jnp.sum`s
    XLA:CPU made two passes and hashed 51M words in 268 ms; as one, 24.5 ms (the same
    values; docs/architecture.md).
    """
    h = jnp.zeros((2,), jnp.uint32)
    zero = jnp.uint32(0)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        bits = _leaf_bits(leaf)
        pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        a, b = jax.lax.reduce(
            (
                (bits ^ (pos * jnp.uint32(_K1))) * jnp.uint32(_K2),
                (bits + pos * jnp.uint32(_K3)) ^ (bits >> 7),
            ),
            (zero, zero),
            lambda x, y: (x[0] + y[0], x[1] + y[1]),
            (0,),
        )
        salt = jnp.uint32(i + 1) * jnp.uint32(_K3)
        h = h + jnp.stack([a ^ salt, b * (salt | jnp.uint32(1))])
    return h


def fingerprint_hex(tree: Any) -> str:
    """`fingerprint` as a 16-digit hex string (computed where the tree's arrays live)."""
    return hex_of(jax.device_get(_fingerprint_jit(tree)))


_fingerprint_jit = jax.jit(fingerprint)


_EARLY: list[int] = []  # SIGINTs that came before training started (see catch_early)


def catch_early() -> None:
    """From now until training starts, a SIGINT is remembered instead of raised: raised
    as KeyboardInterrupt it can land in a callback whose exceptions Python ignores (JAX's
    garbage-collection hook), and the Ctrl-C is lost. `StopSignals` takes it up when
    training starts: the run stops after its first step, saved (exit 130). Main thread
    of a command-line process only (jaxdml.cli.run calls it)."""
    import signal

    signal.signal(signal.SIGINT, lambda signum, frame: _EARLY.append(signum))


class StopSignals:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) -> finish the step, save, exit.

    A context manager around training: while inside, the two signals only set a flag
    (no KeyboardInterrupt in the middle of a collective or a save); `requested` is the
    signal's name, `signum` its number. Every process of a multi-host job installs it
    (Python's handler replaces the one JAX's preemption notifier installs); the processes
    agree on the step to stop at through jaxdml.liveness.Agreement.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if _EARLY:  # a Ctrl-C during start-up
            self.signum = _EARLY.pop(0)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        del frame
        self.signum = self.signum or signum


# ----------------------------------------------------------------- failure kinds

DEVICE_LOSS = "device_loss"
HOST_LOSS = "host_loss"
PROGRAMMING = "programming"

_LOSS_MARKERS = ("UNAVAILABLE", "device lost", "lost during step", "DEVICE_LOST", "DATA_LOSS")
_HOST_MARKERS = ("Gloo", "Connection reset", "Connection closed", "heartbeat", "ProcessFailure")


def classify(error: BaseException) -> str:
    """What kind of failure an exception from the step is.

    Returns:
      HOST_LOSS (a peer process died: collectives or the coordination service failed),
      DEVICE_LOSS (a device stopped answering), or PROGRAMMING (anything else: a bug
      or bad input, which must be re-raised, never retried).
    """
    if isinstance(error, DeviceLost):
        return DEVICE_LOSS
    name = type(error).__name__
    text = f"{name}: {error}"
    if name == "ProcessFailureError" or any(m in text for m in _HOST_MARKERS):
        return HOST_LOSS
    if name in ("JaxRuntimeError", "XlaRuntimeError") and any(m in text for m in _LOSS_MARKERS):
        return DEVICE_LOSS
    return PROGRAMMING


# ------------------------------------------------------------ replica agreement


def replica_fingerprints(tree: Any, mesh) -> jax.Array:
    """Each device's fingerprint of its own copy of a replicated pytree: uint32[D, 2], in
    mesh order, dispatched without waiting (read it when `is_ready()` to stay off the
    critical path).

    Under shard_map every device hashes its local buffer, so a replica that differs
    (a flipped bit, silent data corruption) gets a different row. The rows are gathered
    with an exact integer psum of one-hot rows, so the result is replicated: every
    process of a multi-host job can read all of them.
    """
    return _replica_fingerprint_fn(mesh)(tree)


@functools.lru_cache(maxsize=16)
def _replica_fingerprint_fn(mesh):
    """The jitted per-replica fingerprint for `mesh`, built once per mesh: a new closure
    per call would be compiled again at every check."""
    from jax.sharding import PartitionSpec as P

    axis = mesh.axis_names[0]
    num = mesh.devices.size

    def local(t):
        fp = fingerprint(jax.lax.pcast(t, axis, to="varying"))
        mine = (jnp.arange(num) == jax.lax.axis_index(axis))[:, None]
        return jax.lax.psum(jnp.where(mine, fp[None, :], jnp.uint32(0)), axis)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P()))


def hex_of(fingerprint_row) -> str:
    """A uint32[2] fingerprint as the 16-digit hex string checkpoints record."""
    a, b = (int(v) for v in np.asarray(fingerprint_row).reshape(-1)[:2])
    return f"{a:08x}{b:08x}"


def majority(fingerprints, device_ids: list[int]) -> tuple[list[int], list[int]]:
    """Splits devices into (agreeing majority, odd ones out) by fingerprint.

    With no strict majority, every device is 'odd' and none can be trusted.
    """
    rows = [tuple(int(v) for v in r) for r in rows_of(fingerprints)]
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[r] = counts.get(r, 0) + 1
    best, n = max(counts.items(), key=lambda kv: kv[1])
    if n * 2 <= len(rows) and len(counts) > 1:
        return [], list(device_ids)
    good = [d for d, r in zip(device_ids, rows, strict=True) if r == best]
    odd = [d for d, r in zip(device_ids, rows, strict=True) if r != best]
    return good, odd


def rows_of(fingerprints) -> np.ndarray:
    """Host rows of replica fingerprints (a replicated jax.Array reads from a local copy)."""
    if isinstance(fingerprints, jax.Array):
        return np.asarray(fingerprints.addressable_shards[0].data).reshape(-1, 2)
    return np.asarray(fingerprints).reshape(-1, 2)


# ------------------------------------------------------------ numerical guards


class AnomalyGuard:
    """Counts skipped (non-finite) updates and loss spikes; asks for a rollback when
    `max_anomalies` fall within `window` steps.

    A spike is a loss more than `spike_zscore` standard deviations above the mean
    of the last `history` finite losses (0 disables spike detection).
    """

    def __init__(
        self, max_anomalies: int, window: int, spike_zscore: float = 0.0, history: int = 50
    ):
        self.max_anomalies, self.window = max_anomalies, window
        self.spike_zscore, self.history = spike_zscore, history
        self._anomalies: list[int] = []
        self._losses: list[float] = []

    def observe(self, step: int, loss: float, skipped: bool) -> str | None:
        """Returns 'nan', 'spike' or None for this step."""
        kind = "nan" if skipped or not np.isfinite(loss) else None
        if kind is None and self.spike_zscore > 0 and len(self._losses) >= 10:
            mean, std = float(np.mean(self._losses)), float(np.std(self._losses))
            if std > 0 and (loss - mean) / std > self.spike_zscore:
                kind = "spike"
        if kind is None:
            self._losses = (self._losses + [loss])[-self.history :]
            return None
        self._anomalies = [s for s in self._anomalies if s > step - self.window] + [step]
        return kind

    @property
    def rollback_due(self) -> bool:
        return len(self._anomalies) >= self.max_anomalies

    def recent(self) -> list[int]:
        return list(self._anomalies)

    def reset(self) -> None:
        self._anomalies = []


# --------------------------------------------------------------------- watchdog


class Watchdog:
    """Calls `on_hang(seconds_since_progress)` once when `pet()` has not been called for
    longer than the deadline. A hung XLA computation cannot be cancelled in-process;
    `on_hang` records the hang and exits, so that a restart resumes from a checkpoint.

    The deadline adapts: max(`floor`, `factor` x the median interval between the last
    pets), so slow steps (a large model, a loaded machine) are not hangs, while a small
    model's hang is found after `floor` seconds. Work known to take long (compiling,
    restoring, a synchronous save, waiting for peers) runs inside `allow(seconds)`.
    `report()` says how close a run came: the longest wait between pets outside such
    work (an operator's measure for `floor`: a fault-free run's longest quiet).

    Args:
      floor: seconds (0: the watchdog is off).
      on_hang: called from the watchdog thread.
      factor: multiple of the median pet interval (0: a fixed deadline of `floor`).
      clock: monotonic clock (injectable); poll: seconds between looks.
    """

    def __init__(self, floor: float, on_hang, factor: float = 0.0, clock=None, poll=None):
        import collections
        import threading
        import time

        self.floor, self.factor, self.on_hang = floor, factor, on_hang
        self.clock = clock or time.monotonic
        self.poll = poll if poll is not None else max(0.05, min(1.0, floor / 10))
        self._last = self.clock()
        self._intervals: collections.deque = collections.deque(maxlen=101)
        self._allowance = 0.0
        self.longest = 0.0  # seconds: the longest interval between pets outside allow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxdml-watchdog", daemon=True)
        self.fired = False

    def pet(self) -> None:
        now = self.clock()
        if self._allowance == 0.0:
            interval = now - self._last
            self._intervals.append(interval)
            self.longest = max(self.longest, interval)
        self._last = now

    def report(self) -> dict:
        """For result.json: the deadline now and the longest quiet seen, in seconds."""
        return {"watchdog_deadline_s": self.deadline(), "watchdog_longest_quiet_s": self.longest}

    def deadline(self) -> float:
        """Seconds without a pet that count as a hang now."""
        base = self.floor
        if self.factor and len(self._intervals) >= 5:
            base = max(base, self.factor * float(np.median(self._intervals)))
        return max(base, self._allowance)

    def allow(self, seconds: float):
        """A context in which the deadline is at least `seconds` (measured from entry)."""
        import contextlib

        @contextlib.contextmanager
        def allowed():
            previous, self._allowance = self._allowance, max(self._allowance, seconds)
            self._last = self.clock()
            try:
                yield
            finally:
                self._allowance = previous
                self._last = self.clock()

        return allowed()

    def __enter__(self) -> Watchdog:
        if self.floor > 0:
            self._last = self.clock()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            idle = self.clock() - self._last
            if idle >= self.deadline() and not self.fired:
                self.fired = True
                self.on_hang(idle)
                return
