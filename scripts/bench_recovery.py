"""Recovery after a host is killed: hot (the survivors go on in-process) vs cold
(the launcher restarts the whole group from the newest checkpoint).

  python scripts/bench_recovery.py              # 3 repeats of each, side by side
  python scripts/bench_recovery.py --repeats=1

2 processes x 2 simulated CPU devices on loopback (jaxdml.launch); process 1 is
SIGKILLed after --kill_at steps (the fault plan host_loss@K:1). Recovery seconds
run from the kill to the first step finished after it; lost steps are the steps
computed again. Medians over --repeats; a markdown table on stdout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of each mode (median reported).")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps.")
_KILL_AT = flags.DEFINE_integer("kill_at", 130, "Kill process 1 after this many steps.")
_EVERY = flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint period (steps).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_secs", 3, "Coordination-service heartbeat timeout.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_once(hot: bool, workdir: str) -> dict:
    """One launcher run with a host kill; returns recovery seconds, lost steps, wall."""
    cmd = [
        sys.executable, "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2",
        "--max_restarts=2", "--grace_secs=2", "--failure_grace_secs=1", "--backoff_secs=0",
        *(["--hot_recovery"] if hot else []), "--",
        sys.executable, "-m", "experiments.train", "--config=configs/sgd_logreg.py",
        f"--workdir={workdir}", f"--config.train.num_steps={_STEPS.value}",
        f"--config.checkpoint.every_steps={_EVERY.value}",
        f"--config.distributed.heartbeat_timeout_secs={_HEARTBEAT.value}",
        "--config.supervisor.watchdog_secs=30", f"--config.faults=host_loss@{_KILL_AT.value}:1",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    kill = next(
        e for e in _events(os.path.join(workdir, "process_1", "events.jsonl"))
        if e["kind"] == "fault_injected"
    )  # fmt: skip
    main = _events(os.path.join(workdir, "events.jsonl"))
    if hot:
        loss = next(e for e in main if e["kind"] == "host_loss")
        return {"recovery_s": loss["time"] - kill["time"], "detect_s": loss["detect_seconds"],
                "lost_steps": loss["steps_redone"], "wall_s": wall}  # fmt: skip
    # Written at restore in the restarted group; its first step follows at once.
    resumed = next(e for e in main if e["kind"] == "resumed")
    return {"recovery_s": resumed["time"] - kill["time"], "detect_s": float("nan"),
            "lost_steps": kill["step"] - resumed["step"], "wall_s": wall}  # fmt: skip


def main(argv):
    del argv
    rows = {"hot (in-process, live_devices)": [], "cold (restart from checkpoint)": []}
    for _ in range(_REPEATS.value):  # interleaved, so machine drift hits both alike
        for name, hot in (("hot (in-process, live_devices)", True),
                          ("cold (restart from checkpoint)", False)):  # fmt: skip
            with tempfile.TemporaryDirectory() as workdir:
                rows[name].append(run_once(hot, workdir))
    print(
        f"Median of {_REPEATS.value}; process 1 of 2 killed after step {_KILL_AT.value}, "
        f"checkpoint every {_EVERY.value} steps, heartbeat timeout {_HEARTBEAT.value} s.\n"
    )
    print("| mode | recovery s (kill -> training) | detection s | lost steps | job wall s |")
    print("|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        detect = "-" if med["detect_s"] != med["detect_s"] else f"{med['detect_s']:.2f}"
        print(
            f"| {name} | {med['recovery_s']:.2f} | {detect} | {med['lost_steps']:.0f} "
            f"| {med['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
