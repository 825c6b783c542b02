"""Warm standby (jaxdml.standby): the next attempt's process waits imported, runs the
command as `python` would when woken, and runs nothing when cancelled."""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxdml import chaos, standby
from tests.conftest import wait_until

SCRIPT = """
import json, os, sys
from jaxdml import goodput
with open(os.environ["OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "name": __name__, "x": os.environ.get("X"),
               "stdin": sys.stdin.read(), "life": goodput.process_start_time(),
               "jax": "jax" in sys.modules}, f)
sys.exit(int(os.environ.get("CODE", "0")))
"""


def _pipes():
    return dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_woken_standby_runs_the_script_with_the_env_it_was_sent(tmp_path):
    script, out = tmp_path / "job.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OUT": str(out)}
    waiting = standby.Standby(
        [sys.executable, str(script), "--a=1", "b"], delay=0.0, env=env, **_pipes()
    )
    try:
        time.sleep(0.5)
        assert not out.exists()  # nothing of the command runs before the wake
        sent = time.time()
        proc = waiting.wake({"X": "woken", "CODE": "3"})
        _, err = proc.communicate(timeout=120)
    finally:
        waiting.cancel()
    assert proc.returncode == 3, err
    got = json.loads(out.read_text())
    assert got["argv"] == ["--a=1", "b"] and got["name"] == "__main__" and got["x"] == "woken"
    assert got["stdin"] == ""  # not the pipe the wake came through
    assert got["jax"]  # imported while waiting
    # The process life begins at the wake, not at the process start half a second before.
    assert sent <= got["life"] <= time.time()


def test_a_cancelled_standby_exits_0_having_run_nothing(tmp_path):
    script, out = tmp_path / "job.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OUT": str(out)}
    for delay in (0.0, 60.0):  # importing or imported; still in its delay
        waiting = standby.Standby([sys.executable, str(script)], delay=delay, env=env, **_pipes())
        waiting.cancel(grace=60)
        assert waiting.proc.returncode == 0 and not out.exists()


def test_a_waiting_standby_is_told_apart_from_a_running_one(tmp_path):
    """Faults sent from outside to a job's processes skip the spares (is_waiting)."""
    script, out = tmp_path / "job.py", tmp_path / "out.json"
    script.write_text(
        "import time, pathlib, sys\npathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n"
    )
    waiting = standby.Standby([sys.executable, str(script), str(out)], delay=0.0, **_pipes())
    try:
        # Until the fork has exec'd, /proc shows the parent's command line: not waiting.
        assert wait_until(lambda: standby.is_waiting(waiting.proc.pid), 120)
        waiting.wake()
        assert wait_until(out.exists, 120) and not standby.is_waiting(waiting.proc.pid)
    finally:
        waiting.proc.kill()
        waiting.cancel()
    assert not standby.is_waiting(os.getpid())


def test_a_standby_killed_while_waiting_is_not_alive(tmp_path):
    waiting = standby.Standby([sys.executable, str(tmp_path / "x.py")], delay=60.0, **_pipes())
    assert waiting.alive()
    waiting.proc.kill()
    waiting.proc.wait()
    assert not waiting.alive()
    waiting.cancel()


def test_a_module_command_runs_as_main(tmp_path):
    (tmp_path / "jobmod.py").write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "jobmod", "--flag"]
    waiting = standby.Standby(command, delay=60.0, env=env, cwd=str(tmp_path), **_pipes())
    proc = waiting.wake()  # woken during its delay: it imports, then runs
    _, err = proc.communicate(timeout=120)
    waiting.cancel()
    assert proc.returncode == 0, err
    got = json.loads(out.read_text())
    assert got["argv"] == ["--flag"] and got["name"] == "__main__"


def test_only_plain_python_commands_can_wait():
    assert standby.can_wait(["python3", "-m", "experiments.train", "--x"])
    assert standby.can_wait([sys.executable, "train.py"])
    assert not standby.can_wait(["python", "-m"])
    assert not standby.can_wait(["python", "-c", "print(1)"])
    assert not standby.can_wait(["python", "-u", "-m", "x"])
    assert not standby.can_wait(["bash", "run.sh"])
    with pytest.raises(ValueError, match="standby"):
        standby.Standby(["bash", "run.sh"])


def test_run_plan_restarts_in_the_process_that_waited(tmp_path, monkeypatch):
    """The attempt after a failure runs in the standby started during the first attempt:
    its process is older than its life by the first attempt's 1.5 s."""
    monkeypatch.setattr(standby, "DEFAULT_DELAY_SECS", 0.0)
    script = tmp_path / "flaky.py"
    script.write_text(
        "import json, os, sys, time\n"
        "from jaxdml import goodput\n"
        "workdir = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir=')][0]\n"
        "os.makedirs(workdir, exist_ok=True)\n"
        "marker = os.path.join(workdir, 'first')\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close(); time.sleep(1.5); sys.exit(1)\n"
        "with open('/proc/self/stat') as f:\n"
        "    ticks = int(f.read().rsplit(')', 1)[1].split()[19])\n"
        "age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')\n"
        "json.dump({'argv': sys.argv[1:], 'waited': time.time() - age,\n"
        "           'life': goodput.process_start_time()},\n"
        "          open(os.path.join(workdir, 'result.json'), 'w'))\n"
    )
    workdir = str(tmp_path / "run")
    codes, _ = chaos.run_plan([sys.executable, str(script)], workdir, "sigkill@5", max_attempts=3)
    assert codes == [1, 0]
    with open(os.path.join(workdir, "result.json")) as f:
        got = json.load(f)
    assert got["argv"] == [f"--workdir={workdir}", "--config.faults=sigkill@5"]
    assert got["life"] - got["waited"] > 1.0  # started before the first attempt ended
