"""Chaos runs: a matrix of fault plans against one config, each run as a real process
that is restarted (the same command) until it completes, as a job scheduler would.

Every plan is compared with the fault-free run of the same config: completion,
test accuracy, largest relative parameter difference, lost steps (the job's goodput
record: steps done again, whatever the restart path), recovery seconds (its events)
and goodput two ways: fault-free wall time / this plan's wall time (restarts included),
and 1 - the fraction of the job's wall time that its record (jaxdml.goodput) puts on
the faults (redone steps, recovery, time down, restarts' start-up and compilation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

from jaxdml import goodput
from jaxdml.metrics import EventLog
from jaxdml.standby import Standby, can_wait

DEFAULT_PLANS = (
    "device_loss@100:3",
    "device_loss@80:3,device_loss@160:1+2",
    "nan@60",
    "nan@120-124",
    "bitflip@130:1",
    "hang@160:2",
    "slow@50-150:0",
    "sigterm@200",
    "sigkill@170",
    "device_loss@50:3,nan@100,bitflip@150:1,sigkill@220",
)

# Settings every chaos run uses on top of the config: protections on, short watchdog.
CHAOS_OVERRIDES = (
    "--config.checkpoint.every_steps=25",
    "--config.supervisor.fingerprint_every=25",
    "--config.supervisor.watchdog_secs=5",
    "--config.train.log_every=100000",
)


@dataclasses.dataclass
class PlanOutcome:
    """One plan's row of the chaos table."""

    plan: str
    completed: bool
    attempts: int
    exit_codes: list[int]
    test_accuracy: float | None
    param_rel_diff: float | None  # max over elements of |a - b| / max(|b|, 1e-6)
    lost_steps: int
    recovery_seconds: float
    wall_seconds: float
    goodput: float | None = None  # fault-free wall time / this plan's
    job_goodput: float | None = None  # the job record's productive step time / its wall
    goodput_accounted: float | None = None  # 1 - the job record's fault_fraction
    # ||a - b|| / ||b|| over all parameters: for a large network the element-wise maximum
    # is set by some weight near 0, this one by the parameters as a whole
    param_l2_diff: float | None = None


def lost_work(events: list[dict]) -> tuple[int, float]:
    """(steps computed twice, seconds lost) over all attempts of a run.

    Detections and in-process recoveries carry seconds_lost (and steps_redone). A
    crash (hang, sigkill, preemption) also costs the steps between the newest
    checkpoint and the crash, and the time from the crash to the restart's resume.
    """
    steps = 0
    seconds = 0.0
    crash: dict | None = None
    for e in events:
        steps += e.get("steps_redone", 0)
        seconds += e.get("seconds_lost", 0.0)
        killed = e["kind"] == "fault_injected" and e["fault_kind"] == "sigkill"
        if killed or e["kind"] in ("hang", "preemption"):
            crash = e
        elif e["kind"] == "resumed" and crash is not None:
            steps += max(0, crash["step"] - e["step"])
            seconds += e["time"] - crash["time"]
            crash = None
    return steps, seconds


def run_plan(
    command: list[str],
    workdir: str,
    plan: str,
    max_attempts: int = 6,
    timeout: float = 600,
    standby: bool = True,
) -> tuple[list[int], float]:
    """Runs `command` with the plan until it completes (or attempts run out).

    A preempted run exits 0 without result.json; like a scheduler, run it again.
    `standby`: while an attempt runs, the next one waits started and imported
    (jaxdml.standby), so a restart skips Python's start and the imports.
    """
    args = [*command, f"--workdir={workdir}", f"--config.faults={plan}"]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    warm = standby and max_attempts > 1 and can_wait(args)
    codes: list[int] = []
    t0 = time.perf_counter()
    waiting: Standby | None = None
    try:
        for attempt in range(max_attempts):
            if waiting is not None and not waiting.alive():
                waiting.cancel()  # it died waiting: start cold
                waiting = None
            proc = waiting.wake() if waiting else subprocess.Popen(args, **pipes)
            waiting = Standby(args, **pipes) if warm and attempt + 1 < max_attempts else None
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
            codes.append(proc.returncode)
            if proc.returncode == 0 and os.path.exists(os.path.join(workdir, "result.json")):
                break
            if proc.returncode == 2:  # bad input: a restart cannot help
                sys.stderr.write(err[-2000:])
                break
    finally:
        if waiting is not None:
            waiting.cancel()
    return codes, time.perf_counter() - t0


def _params(workdir: str) -> dict[str, np.ndarray] | None:
    path = os.path.join(workdir, "params.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _rel_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-6))) for k in b)


def _l2_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b||, all parameters as one vector (float64 sums)."""
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def run_matrix(
    command: list[str], base_dir: str, plans=DEFAULT_PLANS, progress: bool = False
) -> list[PlanOutcome]:
    """Runs the fault-free reference and every plan; returns one outcome per plan
    (the first is the reference). `progress` shows a tqdm bar on stderr."""
    from tqdm import tqdm

    command = [*command, *CHAOS_OVERRIDES]
    ref_dir = os.path.join(base_dir, "fault_free")
    bar = tqdm(total=len(plans) + 1, desc="chaos plans", disable=not progress, leave=False)
    _, ref_wall = run_plan(command, ref_dir, "")
    bar.update()
    ref = _params(ref_dir)
    outcomes = []
    for i, plan in enumerate(["", *plans]):
        if plan:
            bar.set_postfix_str(plan[:40])
        workdir = ref_dir if not plan else os.path.join(base_dir, f"plan{i:02d}")
        codes, wall = ([0], ref_wall) if not plan else run_plan(command, workdir, plan)
        result_path = os.path.join(workdir, "result.json")
        result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
        _, seconds = lost_work(EventLog.read(workdir))
        job = goodput.summarize(goodput.read(workdir))
        params = _params(workdir)
        outcomes.append(
            PlanOutcome(
                plan=plan or "(none)",
                completed=codes[-1] == 0 and bool(result),
                attempts=len(codes),
                exit_codes=codes,
                test_accuracy=result.get("test_accuracy"),
                param_rel_diff=_rel_diff(params, ref) if params and ref else None,
                param_l2_diff=_l2_diff(params, ref) if params and ref else None,
                lost_steps=job["steps_redone"],
                recovery_seconds=seconds,
                wall_seconds=wall,
                goodput=ref_wall / wall if wall else None,
                job_goodput=job["job_goodput"],
                goodput_accounted=1.0 - job["fault_fraction"],
            )
        )
        if plan:
            bar.update()
    bar.close()
    return outcomes


def table(outcomes: list[PlanOutcome]) -> str:
    """The chaos table in markdown."""
    head = (
        "| plan | completed | attempts (exit codes) | test acc | max rel param diff "
        "| param diff (rel L2) | lost steps | recovery s | wall s | goodput (wall ratio) "
        "| goodput (job records) | job goodput |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for o in outcomes:
        lines.append(
            f"| `{o.plan}` | {'yes' if o.completed else 'NO'} | {o.attempts} "
            f"({','.join(map(str, o.exit_codes))}) | {fmt(o.test_accuracy, '.4f')} "
            f"| {fmt(o.param_rel_diff, '.1e')} | {fmt(o.param_l2_diff, '.1e')} "
            f"| {o.lost_steps} | {o.recovery_seconds:.2f} "
            f"| {o.wall_seconds:.1f} | {fmt(o.goodput, '.2f')} "
            f"| {fmt(o.goodput_accounted, '.2f')} | {fmt(o.job_goodput, '.2f')} |"
        )
    return "\n".join(lines)
