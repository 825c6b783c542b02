"""Simulated devices for the whole test session, set before JAX starts.

Tests that need another device count or several processes run a subprocess.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# One persistent compilation cache for the session and every process it starts: a step
# that many tests build is compiled once, then loaded (jaxdml.distributed's
# compilation_cache keeps a folder the user set, as this one is).
XLA_CACHE = tempfile.mkdtemp(prefix="jaxdml-test-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# Generated data sets (jaxdml.data.cache_dir) for the session and the processes it
# starts: the xdist workers inherit the controller's folder, which removes it at the end.
DATA_CACHE = None
if not os.environ.get("JAXDML_CACHE_DIR"):
    DATA_CACHE = os.environ["JAXDML_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdml-test-data-")


# The memory tiers of every run the session starts (jaxdml.training.tiers.local_root):
# still in RAM, but in a folder of the session's, removed at the end (killed runs leave
# theirs behind).
SHM_DIR = None
if not os.environ.get("JAXDML_SHM_DIR"):
    ram = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    SHM_DIR = os.environ["JAXDML_SHM_DIR"] = tempfile.mkdtemp(prefix="jaxdml-test-", dir=ram)


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    shutil.rmtree(XLA_CACHE, ignore_errors=True)
    for owned in (DATA_CACHE, SHM_DIR):
        if owned:
            shutil.rmtree(owned, ignore_errors=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None):
    """Runs `python -m <args>` from the repo root; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def devices():
    return jax.devices()


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Polls `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


_TELLING = ("[launch]", "Traceback", "Error", "error", "Check failed", "Fatal", "F1", "E1", "W1")


def log_excerpt(out: str, limit: int = 8000) -> str:
    """What a failed multi-process run's log says: the launcher's lines, warnings, errors
    and tracebacks, then the last lines; without the list of extension modules Python
    prints on a fatal signal (it filled CI's whole excerpt once)."""
    lines = [x for x in out.splitlines() if "Extension modules:" not in x and len(x) < 2000]
    telling, traceback_left = [], 0
    for x in lines:
        traceback_left = 25 if "Traceback" in x else traceback_left - 1
        if traceback_left > 0 or any(t in x for t in _TELLING):
            telling.append(x)
    text = "\n".join([*telling[-80:], "--- last lines ---", *lines[-30:]])
    return text[-limit:]
