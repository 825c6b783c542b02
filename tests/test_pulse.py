"""A barrier with a dead member ends within the heartbeat timeout (jaxdml.pulse).

Two processes of a recoverable job on loopback (tests/pulse_worker.py); process 1 kills
itself while process 0 waits for it: at a Pulse barrier, and in an Orbax save whose
background barriers are the Pulse's. Without the Pulse both waits last until Orbax's
600 s barrier timeout.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxdml.constants import ENV_COORDINATOR, ENV_NUM_CPU_DEVICES, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from jaxdml.launch import free_port
from tests.conftest import REPO

WORKER = os.path.join(REPO, "tests", "pulse_worker.py")


def run_pair(mode: str, workdir) -> dict:
    """Runs both processes; kills any left after the timeout; process 0's result."""
    port = free_port()
    procs = []
    try:
        for process_id in (0, 1):
            env = {
                **os.environ,
                "PYTHONPATH": REPO,
                ENV_COORDINATOR: f"127.0.0.1:{port}",
                ENV_NUM_PROCESSES: "2",
                ENV_PROCESS_ID: str(process_id),
                ENV_NUM_CPU_DEVICES: "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, mode, str(workdir)],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )  # fmt: skip
            )
        out0, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 0, out0[-3000:]
    assert procs[1].returncode == -9
    return json.loads((workdir / "result.json").read_text())


@pytest.mark.slow
def test_a_barrier_fails_with_host_lost_soon_after_a_member_dies(tmp_path):
    result = run_pair("barrier", tmp_path)
    assert result["ended"] == "HostLost: ProcessFailure: devices [2048] are not live"  # process 1's
    # Declared dead 3 s (the heartbeat timeout) after its last pulse; seen at most one
    # slice (0.75 s) later; the pulse before the kill may be up to 0.75 s old.
    assert 2.0 < result["seconds"] < 3 + 0.75 + 5


@pytest.mark.slow
def test_an_orbax_save_with_a_dead_member_fails_instead_of_waiting(tmp_path):
    result = run_pair("save", tmp_path)
    assert result["failed_saves"] == 1
    assert result["seconds"] < 3 + 0.75 + 10
