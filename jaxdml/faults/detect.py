"""Detectors: pytree fingerprints (checkpoint checksums, replica agreement)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    """
    h = jnp.zeros((2,), jnp.uint32)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        bits = _leaf_bits(leaf)
        pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        a = jnp.sum((bits ^ (pos * jnp.uint32(_K1))) * jnp.uint32(_K2), dtype=jnp.uint32)
        b = jnp.sum((bits + pos * jnp.uint32(_K3)) ^ (bits >> 7), dtype=jnp.uint32)
        salt = jnp.uint32(i + 1) * jnp.uint32(_K3)
        h = h + jnp.stack([a ^ salt, b * (salt | jnp.uint32(1))])
    return h


def fingerprint_hex(tree: Any) -> str:
    """`fingerprint` as a 16-digit hex string (computed where the tree's arrays live)."""
    value = np.asarray(jax.device_get(jax.jit(fingerprint)(tree)))
    return f"{int(value[0]):08x}{int(value[1]):08x}"


class PreemptionWatcher:
    """SIGTERM (single process) or JAX's preemption sync point (multi-host) -> stop now.

    Use as a context manager around the loop; `reached(step)` is True once a
    preemption notice arrived (every process agrees on the step when multi-host).
    """

    def __init__(self):
        self._flag = False
        self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        import signal
        import threading

        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag
