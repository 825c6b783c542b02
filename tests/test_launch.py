"""jaxdml.launch: cold restart by exit status, prefixed logs, and no process left behind.

The launched program is tests/launch_worker.py, a stand-in that fails or sleeps on cue.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxdml import launch
from tests.conftest import REPO, process_alive, wait_until

WORKER = os.path.join(REPO, "tests", "launch_worker.py")
TIMEOUT = 60  # no test here needs more than a few seconds


class Launcher:
    """One `python -m jaxdml.launch` run in its own session; `cleanup` kills all it left."""

    def __init__(self, workdir, mode: str, *flags: str):
        self.workdir = workdir
        cmd = [sys.executable, "-m", "jaxdml.launch", "--backoff_secs=0.05", "--grace_secs=2"]
        cmd += [*flags, "--", sys.executable, WORKER, mode, str(workdir), f"--workdir={workdir}"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def wait(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def child_pids(self) -> dict[str, int]:
        """{"<attempt>-<process_id>": pid} of every worker started so far."""
        pid_dir = os.path.join(self.workdir, "pids")
        if not os.path.isdir(pid_dir):
            return {}
        pids = {}
        for name in os.listdir(pid_dir):
            with open(os.path.join(pid_dir, name)) as f:
                text = f.read().strip()
            if text:
                pids[name] = int(text)
        return pids

    def events(self) -> list[dict]:
        path = os.path.join(self.workdir, "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
        for pid in self.child_pids().values():
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start(tmp_path):
    """start(mode, *flags) -> Launcher; every launcher and worker is killed after the test."""
    launchers = []

    def _start(mode: str, *flags: str) -> Launcher:
        launcher = Launcher(tmp_path / f"run{len(launchers)}", mode, *flags)
        launchers.append(launcher)
        return launcher

    yield _start
    for launcher in launchers:
        launcher.cleanup()


def _standbys(launcher: Launcher) -> list[int]:
    """Pids of the launcher's waiting processes (jaxdml.standby) still alive."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"jaxdml.standby" in cmdline and str(launcher.workdir).encode() in cmdline:
            pids.append(int(pid))
    return pids


def test_without_standby_a_restart_starts_cold(start):
    launcher = start("fail_once", "--num_processes=2", "--max_restarts=1", "--nostandby")
    rc, out, err = launcher.wait()
    assert rc == 0, err
    assert "[p0] attempt 1 cold" in out and "[p1] attempt 1 cold" in out


def _no_child_alive(launcher: Launcher) -> bool:
    return not any(process_alive(pid) for pid in launcher.child_pids().values())


def test_failing_group_is_cold_restarted_and_then_succeeds(start):
    launcher = start(
        "fail_once", "--num_processes=2", "--devices_per_process=3", "--max_restarts=2"
    )
    rc, out, err = launcher.wait()
    assert rc == 0, err
    assert sorted(launcher.child_pids()) == ["0-0", "0-1", "1-0", "1-1"]
    # Logs are streamed with a per-process prefix; the environment reached every process.
    assert "[p0] hello from process 0 of 2" in out
    assert "[p1] hello from process 1 of 2" in out
    assert "[p1] failing now" in out
    assert "[p0] devices 3" in out
    # The restart ran in the processes that waited imported while the first start ran
    # (jaxdml.standby), with that start's settings; none is left waiting.
    assert "[p0] attempt 0 cold" in out and "[p1] attempt 0 cold" in out
    assert "[p0] attempt 1 warm" in out and "[p1] attempt 1 warm" in out
    assert out.count("[p0] devices 3") == 2 and not _standbys(launcher)
    (event,) = launcher.events()
    assert event["kind"] == "cold_restart" and event["attempt"] == 1
    assert event["process"] == 1 and event["exit_code"] == 1
    assert _no_child_alive(launcher)


def test_restarts_stop_after_max_restarts_with_exponential_backoff(start):
    launcher = start("always_fail", "--num_processes=2", "--max_restarts=2")
    rc, _, err = launcher.wait()
    assert rc == 1, err
    assert sorted(launcher.child_pids()) == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    events = launcher.events()
    assert [e["kind"] for e in events] == ["cold_restart", "cold_restart", "launcher_stop"]
    assert [e["backoff_s"] for e in events[:2]] == [0.05, 0.1]
    assert events[-1]["reason"] == "max_restarts reached"
    assert _no_child_alive(launcher)


def test_bad_input_exit_is_not_restarted(start):
    launcher = start("bad_input", "--num_processes=2", "--max_restarts=3")
    rc, _, err = launcher.wait()
    assert rc == 2, err
    assert sorted(launcher.child_pids()) == ["0-0", "0-1"]
    (event,) = launcher.events()
    assert event["kind"] == "launcher_stop" and event["reason"] == "bad input"
    assert _no_child_alive(launcher)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_launcher_stops_every_child_even_one_ignoring_sigterm(start, sig):
    launcher = start("stubborn", "--num_processes=3", "--max_restarts=5")
    assert wait_until(lambda: len(launcher.child_pids()) == 3, TIMEOUT)
    t0 = time.monotonic()
    launcher.proc.send_signal(sig)
    rc, _, err = launcher.wait()
    assert rc == 128 + sig, err
    assert "process 1 ignored SIGTERM; SIGKILL" in err  # after --grace_secs=2
    assert time.monotonic() - t0 < 10
    assert _no_child_alive(launcher)
    assert launcher.events() == []  # stopping is not a restart


def test_sigkill_of_launcher_leaves_no_child(start):
    launcher = start("sleep", "--num_processes=3", "--max_restarts=1")
    assert wait_until(lambda: len(launcher.child_pids()) == 3, TIMEOUT)
    assert wait_until(lambda: len(_standbys(launcher)) == 3, TIMEOUT)  # the next start's
    pids = list(launcher.child_pids().values()) + _standbys(launcher)
    assert all(process_alive(pid) for pid in pids)
    launcher.proc.kill()  # SIGKILL: no code of the launcher runs; PR_SET_PDEATHSIG does the work
    launcher.proc.communicate(timeout=TIMEOUT)
    assert wait_until(lambda: not any(process_alive(pid) for pid in pids), 10)


def test_lost_process_restarts_the_group_unless_hot_recovery_is_on(start):
    plain = start("sleep", "--num_processes=2", "--max_restarts=0")
    hot = start("sleep", "--num_processes=2", "--max_restarts=0", "--hot_recovery")
    for launcher in (plain, hot):
        assert wait_until(lambda launcher=launcher: len(launcher.child_pids()) == 2, TIMEOUT)
        os.kill(launcher.child_pids()["0-1"], signal.SIGKILL)
    rc, _, err = plain.wait()
    assert rc == 128 + signal.SIGKILL, err  # the survivor was stopped; no restarts were allowed
    assert "process 1 exited -9 (fail)" in err
    # With hot recovery the survivor is left to carry on (here it just sleeps).
    time.sleep(1.0)
    assert hot.proc.poll() is None and process_alive(hot.child_pids()["0-0"])
    hot.proc.send_signal(signal.SIGTERM)
    rc, _, err = hot.wait()
    assert "process 1 exited -9 (lost)" in err and rc == 128 + signal.SIGTERM
    assert _no_child_alive(plain) and _no_child_alive(hot)


def test_exit_policy():
    assert launch.classify_exit(1, 0, hot_recovery=False) == "done"
    assert launch.classify_exit(1, 3, hot_recovery=True) == "lost"  # the survivors go on
    assert launch.classify_exit(1, 2, hot_recovery=True) == "fail"  # bad input: for all
    assert launch.classify_exit(1, -9, hot_recovery=True) == "lost"
    assert launch.classify_exit(1, -9, hot_recovery=False) == "fail"
    assert launch.classify_exit(0, -9, hot_recovery=True) == "fail"  # the coordinator
    assert launch.signal_status(-9) == 137 and launch.signal_status(4) == 4
    assert not launch.should_restart(2, 0, 5)  # bad input
    assert launch.should_restart(3, 4, 5) and not launch.should_restart(3, 5, 5)
    assert [launch.backoff_secs(k, 1.0, 5.0) for k in range(5)] == [1, 2, 4, 5, 5]
    assert launch.workdir_of(["python", "-m", "x", "--workdir=/a/b"]) == "/a/b"
    assert launch.workdir_of(["python", "--workdir", "/c"]) == "/c"
    assert launch.workdir_of(["python", "-m", "x"]) is None
