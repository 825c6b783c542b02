"""The healthy-device set as a 1-D Mesh over the axis 'data', and its shardings."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def select_devices(n: int = 0) -> list[jax.Device]:
    """The devices a run uses: all of them (n=0) or the first `n`.

    `n` is a request to simulate CPU devices: on the CPU backend, `n` simulated devices
    are created when JAX has not started yet; once it has (a notebook, a test session)
    the first `n` of the existing devices are used, or all of them when there are fewer
    (with a warning). On a GPU or TPU backend `n` does not apply: every device is used.
    """
    if n > 0 and jax.config.jax_num_cpu_devices < n:
        with contextlib.suppress(RuntimeError):  # JAX already started: use what exists.
            jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices()
    if n and devices[0].platform != "cpu":
        return list(devices)
    if n > len(devices):
        logging.warning(
            "config.num_cpu_devices=%d but JAX already started with %d CPU device(s): "
            "using those (simulated devices are set before JAX starts)",
            n,
            len(devices),
        )
        return list(devices)
    return list(devices[:n] if n else devices)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D Mesh('data') over `devices` (default: every device of the job), in id order."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("cannot build a mesh over zero devices")
    devices.sort(key=lambda d: d.id)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading axis is split across 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def device_ids(mesh: Mesh) -> list[int]:
    """The ids of the mesh's devices, in mesh order."""
    return [int(d.id) for d in mesh.devices.flat]
