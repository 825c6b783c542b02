"""Multi-controller JAX: one process per host, joined by `jax.distributed`.

A run is multi-process when `config.distributed` (or the environment set by
`jaxdml.launch`) says so; otherwise nothing here touches JAX and a
single-process run behaves exactly as before. Settings are taken, field by
field, from the config when it sets them, else from the launcher's environment:

  config.distributed.coordinator_address  or  JAXDML_COORDINATOR
  config.distributed.num_processes (> 0)  or  JAXDML_NUM_PROCESSES
  config.distributed.process_id (>= 0)    or  JAXDML_PROCESS_ID
  JAXDML_NUM_CPU_DEVICES                  or  config.num_cpu_devices (per process)

The device count is the one exception: the launcher's environment wins over the
config, because the launcher decides how the machine's devices are split among
the processes it starts. On a cluster (Cloud TPU VM, SLURM, Open MPI)
`config.distributed.auto_detect=True` lets `jax.distributed.initialize()` find
whatever is not given.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging as std_logging
import os
import time
from collections.abc import Mapping

import jax
import ml_collections
from absl import logging

from jaxdml import mesh as mesh_lib
from jaxdml.config import ConfigError
from jaxdml.constants import ENV_COORDINATOR, ENV_NUM_CPU_DEVICES, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from jaxdml.pulse import Pulse


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved distributed settings of this process (None: left to auto-detection)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    num_cpu_devices: int
    auto_detect: bool

    @property
    def multi_process(self) -> bool:
        return self.auto_detect or (self.num_processes or 1) > 1


def _env_int(env: Mapping[str, str], name: str, lo: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment {name}={raw!r} must be an integer") from None
    if value < lo:
        raise ConfigError(f"environment {name}={raw!r} must be >= {lo}")
    return value


def resolve(config: ml_collections.ConfigDict, env: Mapping[str, str] | None = None) -> Settings:
    """Merges `config.distributed` with the launcher's environment (see the module docstring).

    Args:
      config: a validated config.
      env: the environment (default: os.environ).

    Returns:
      The settings; raises ConfigError when a multi-process run lacks a coordinator
      address or process id, or the process id is out of range.
    """
    env = os.environ if env is None else env
    d = config.distributed
    coordinator = d.coordinator_address or env.get(ENV_COORDINATOR, "").strip() or None
    num_processes = d.num_processes or _env_int(env, ENV_NUM_PROCESSES, 1)
    process_id = d.process_id if d.process_id >= 0 else _env_int(env, ENV_PROCESS_ID, 0)
    env_devices = _env_int(env, ENV_NUM_CPU_DEVICES, 1)
    settings = Settings(
        coordinator,
        num_processes,
        process_id,
        env_devices if env_devices is not None else config.num_cpu_devices,
        bool(d.auto_detect),
    )
    if settings.multi_process and not settings.auto_detect:
        if coordinator is None:
            raise ConfigError(
                f"config.distributed.coordinator_address (or {ENV_COORDINATOR}) is required "
                f"for {num_processes} processes"
            )
        if process_id is None:
            raise ConfigError(
                f"config.distributed.process_id (or {ENV_PROCESS_ID}) is required "
                f"for {num_processes} processes"
            )
    if num_processes and process_id is not None and process_id >= num_processes:
        raise ConfigError(
            f"config.distributed.process_id ({process_id}) must be < "
            f"config.distributed.num_processes ({num_processes})"
        )
    return settings


class _NoBackendProbe:
    """Drops JAX's INFO line about each platform it probed and did not find ("Unable to
    initialize backend 'tpu'"): every CPU or GPU run printed it. Warnings pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "Unable to initialize backend" not in (
            record.getMessage()
        )


_BACKEND_PROBE = _NoBackendProbe()


def quiet_backend_probe() -> None:
    """Installs the filter above on JAX's backend logger (once; no effect on which
    backends start)."""
    logger = std_logging.getLogger("jax._src.xla_bridge")
    if _BACKEND_PROBE not in logger.filters:
        logger.addFilter(_BACKEND_PROBE)


_our_cache_dirs: set[str] = set()  # folders this module pointed JAX's cache at


def compilation_cache(directory: str) -> str:
    """Points JAX's persistent compilation cache at `directory`, or keeps the folder the
    user set (JAX_COMPILATION_CACHE_DIR or jax.config); returns the folder in use.
    Every compilation is kept, so a restarted process (or a re-formed mesh seen before)
    loads its programs instead of compiling them (measured: warm-up 1.6 s -> 0.5 s,
    sgd_logreg). Small ones too: a seed_logreg restart compiled its fingerprint, skip
    step and final save's fingerprint again, each under the 0.2-s threshold kept before
    (restart 2.35 -> 2.07 s, docs/architecture.md). In a multi-process job each process
    uses a subfolder of its own: JAX writes a cache file in place, not by rename, so a
    process could read another's half-written executable.

    Each run caches in its own workdir, also the second run of a process (a notebook,
    a benchmark): JAX opens its cache once, so a change of folder resets it. (Keeping
    the first run's folder wrote every later run's executables there, and when that
    folder was deleted every compilation warned that it could not write.)
    """
    current = jax.config.jax_compilation_cache_dir
    if current and current not in _our_cache_dirs:
        return current  # the user's own folder
    root = directory
    if jax.distributed.is_initialized():
        root = os.path.join(root, f"process_{process_index()}")
    if root != current:
        from jax.experimental.compilation_cache import compilation_cache as jax_cache

        _our_cache_dirs.add(root)
        jax.config.update("jax_compilation_cache_dir", root)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax_cache.reset_cache()  # opened again, in `root`, at the next compilation
    return root


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Joins the multi-process job described by `config` (no-op for a single process).

    Must run before any JAX computation: it sets the per-process CPU device count,
    the CPU collectives (gloo) and, when the supervisor is on, JAX's recoverability
    mode (a peer's death becomes a catchable error instead of aborting the job).
    Calling it again in a process that already joined does nothing.

    Args:
      config: a validated config.

    Returns:
      True when this process is part of a multi-process job.
    """
    quiet_backend_probe()
    settings = resolve(config)
    if not settings.multi_process:
        return False
    if jax.distributed.is_initialized():
        return True
    d = config.distributed
    if settings.num_cpu_devices > 0:
        jax.config.update("jax_num_cpu_devices", settings.num_cpu_devices)
    # Only the CPU client reads this; on GPU/TPU it is inert, so no platform check.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    if config.supervisor.enabled:
        jax.config.update("jax_enable_recoverability", True)
    set_collective_timeout(d.collective_timeout_secs)
    logging.info(
        "jax.distributed: coordinator=%s process %s of %s%s",
        settings.coordinator_address or "auto",
        settings.process_id if settings.process_id is not None else "auto",
        settings.num_processes or "auto",
        " (recoverable)" if config.supervisor.enabled else "",
    )
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=d.initialization_timeout_secs,
            heartbeat_timeout_seconds=d.heartbeat_timeout_secs,
            shutdown_timeout_seconds=d.shutdown_timeout_secs,
        )
    except RuntimeError as e:
        if "before any JAX calls" in str(e):
            raise RuntimeError(
                "jaxdml.distributed.initialize must run before any JAX computation; "
                "a multi-process run cannot start in a process whose JAX backend already runs"
            ) from e
        raise
    if config.supervisor.enabled:
        _start_pulse(d.heartbeat_timeout_secs)
    return True


_pulse: list[Pulse] = []  # this process's, while it is in a recoverable job


def _start_pulse(dead_after: float) -> None:
    def devices_of(process: int) -> list[int]:
        return [int(d.id) for d in jax.devices() if d.process_index == process]

    me = jax.process_index()
    _pulse.append(Pulse(client(), me, dead_after, max(0.25, dead_after / 4), devices_of))


def pulse() -> Pulse | None:
    """This process's Pulse in a recoverable multi-process job, else None."""
    return _pulse[-1] if _pulse else None


def orbax_barrier(process_ids: list[int]):
    """The barrier for Orbax's background threads among `process_ids`: one that fails
    once a member is dead (jaxdml.pulse); None (Orbax's own) outside a recoverable job
    or for one process."""
    p = pulse()
    if p is None or len(set(process_ids)) < 2:
        return None
    return p.orbax_barrier(process_ids)


COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"


def set_collective_timeout(seconds: int, env: dict | None = None) -> None:
    """Makes a CPU collective that waits `seconds` for a peer fail instead of blocking.

    Measured on CPU/gloo in recoverable mode: a collective whose peer died blocks forever
    without it; with it, the survivors' collective fails and live_devices reports the
    loss. XLA reads the flag when the backend starts, so this must run before any JAX
    computation; a flag the user already put in XLA_FLAGS is left as it is. The timeout
    also ends the gloo connections of a collective that was merely slow (the peers must
    then restart), so it must exceed any lag between processes; the trainer compiles the
    step before the first collective so that compilation never counts.
    """
    env = os.environ if env is None else env
    flags_now = env.get("XLA_FLAGS", "")
    if seconds <= 0 or COLLECTIVE_TIMEOUT_FLAG in flags_now:
        return
    env["XLA_FLAGS"] = f"{flags_now} {COLLECTIVE_TIMEOUT_FLAG}={int(seconds)}".strip()


def default_devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
    """The devices a run trains on: every device of the job when multi-process,
    else `config.num_cpu_devices` (or JAXDML_NUM_CPU_DEVICES) local ones."""
    if jax.distributed.is_initialized():  # Not jax.process_count(): it would start JAX.
        return list(jax.devices())
    return mesh_lib.select_devices(resolve(config).num_cpu_devices)


_left_as: list[int] = []  # the index this process had in a job it has left (shutdown)


def process_index() -> int:
    """This process's index in the job (0 when single-process; never starts JAX). After
    `shutdown`, still the index it had: the mains decide after it who reports."""
    if jax.distributed.is_initialized():
        return jax.process_index()
    return _left_as[-1] if _left_as else 0


def is_coordinator() -> bool:
    """True in process 0, the one that writes the run's records (result.json, metrics)."""
    return process_index() == 0


_barrier_ids = itertools.count()


def client():
    """The coordination-service client. jax has no public accessor for it; its own
    multihost_utils.live_devices reads it the same way."""
    from jax._src.distributed import global_state

    return global_state.client


def barrier(name: str, timeout_secs: float, process_ids: list[int] | None = None) -> None:
    """Waits until every process of the job reaches this point (no-op single-process).

    A coordination-service barrier, not a device collective, so it has a deadline:
    a peer that never arrives is an error after `timeout_secs`, not a hang.
    """
    if jax.distributed.is_initialized():
        barrier_id = f"jaxdml_{name}_{next(_barrier_ids)}"
        client().wait_at_barrier(barrier_id, int(timeout_secs * 1000), process_ids)


def exchange(name: str, value: object, timeout_secs: float, process_ids: list[int]) -> dict:
    """Every process in `process_ids` shares a small JSON value; returns {process: value}.

    Through the coordination service's key-value store (no device collective): a peer
    that never answers is an error after `timeout_secs`, one that died (in a recoverable
    job, by its pulse) a HostLost within the heartbeat timeout. `name` must be new for each
    exchange in a job (the keys stay for the job's life).
    """
    kv, p = client(), pulse()
    me = process_index()
    kv.key_value_set(f"jaxdml/exchange/{name}/{me}", json.dumps(value))
    deadline = time.monotonic() + timeout_secs
    out = {}
    for pid in process_ids:
        key = f"jaxdml/exchange/{name}/{pid}"
        if p is None or pid == me:
            raw = kv.blocking_key_value_get(key, int(timeout_secs * 1000))
        else:  # a dead peer fails the exchange at once (HostLost), not at the timeout
            raw = p.get(key, pid, deadline)
        out[pid] = json.loads(raw)
    return out


def shutdown(timeout_secs: float, process_ids: list[int] | None = None) -> None:
    """Leaves the job in order at the end of a successful run (no-op single-process).

    In recoverable mode JAX's exit path no longer holds the processes together: process
    0 could stop the coordination service while a peer's disconnect is still in flight,
    and that peer then aborts. So: all meet at a barrier, the others disconnect, and
    process 0 waits (get_live_nodes returns once they are gone) before stopping the service.

    Args:
      timeout_secs: how long to wait at the barrier for the slowest process.
      process_ids: the processes still in the job (default: all); after a host loss,
        only the survivors meet.
    """
    if not jax.distributed.is_initialized():
        return
    _left_as.append(jax.process_index())
    if not jax.config.jax_enable_recoverability:
        # JAX's own shutdown barrier holds the processes together; get_live_nodes below
        # would wait for peers that are already in it (measured: both aborted after the
        # shutdown timeout, exit 134).
        jax.distributed.shutdown()
        return
    ids = list(range(jax.process_count())) if process_ids is None else sorted(process_ids)
    barrier("finish", timeout_secs, ids)
    while _pulse:  # after the barrier: no peer still waits on this one in a save
        _pulse.pop().stop()
    if is_coordinator():
        client().get_live_nodes(ids)
    jax.distributed.shutdown()
