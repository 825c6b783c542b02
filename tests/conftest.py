"""Simulated devices for the whole test session, set before JAX starts.

Tests that need another device count or several processes run a subprocess.
"""

import os
import subprocess
import sys

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

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
