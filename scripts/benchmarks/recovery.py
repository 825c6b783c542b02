"""Recovery time and lost steps per fault kind, in-process (hot) vs process restart (cold),
through jaxdml.chaos; then a host loss on 2 processes, hot vs cold (jaxdml.launch)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from .common import REPO, Context, Section, Settings, _pyplot, _save, _table

# kind -> (plan template with {f} = the fault step, recovery path). The cold variant of
# device_loss runs with the supervisor off: the process dies and the rerun resumes.
RECOVERY_PLANS = {
    "device_loss": ("device_loss@{f}:3", "hot: mesh 4->3 in-process, state from a live replica"),
    "device_loss_cold": (
        "device_loss@{f}:3",
        "cold: supervisor off; the process dies, the restart resumes from the newest checkpoint",
    ),
    "nan": ("nan@{f}", "hot: update skipped in the step"),
    "nan_burst": ("nan@{f}-{f4}", "hot: 3 skips in 10 steps, rollback to the newest checkpoint"),
    "bitflip": (
        "bitflip@{f}:1",
        "hot: replica fingerprints disagree; odd device excluded, "
        "replay from the last agreed state",
    ),
    "hang": ("hang@{f}:2", "cold: watchdog (5 s) exits 4; restart from the newest checkpoint"),
    "sigkill": ("sigkill@{f}", "cold: the process dies; restart from the newest checkpoint"),
    "sigterm": ("sigterm@{f}", "cold: preemption; save at once, exit 0, restart"),
}


RECOVERY_NOTES = (
    "Parameters are compared with the fault-free run's: a hot recovery on a smaller mesh "
    "differs by float reduction order only (~1e-6); a cold restart on the same devices is "
    "bitwise identical (0); a NaN burst sets the offending batches aside, so its result "
    "differs by design. Hot recovery time includes compiling the step for the new mesh. "
    "A cold restart loses the steps since the newest *committed* checkpoint: an async save "
    "still in flight when the process dies is lost with it."
)


def _train_command(steps: int, config: str = "seed_logreg") -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={config}",
        f"--config.train.num_steps={steps}",
    ]


def _read_events(workdir: str) -> list[dict]:
    from jaxdml.metrics import EventLog

    return EventLog.read(workdir)


def cold_lost_work(events: list[dict]) -> tuple[int, float]:
    """(steps redone, seconds) of crashes that no handler recorded: from each injected
    fault to the next 'resumed' event of the restarted process."""
    steps, seconds, crash = 0, 0.0, None
    for e in events:
        if e["kind"] == "fault_injected":
            crash = e
        elif e["kind"] == "resumed" and crash is not None:
            steps += max(0, crash["step"] - e["step"])
            seconds += e["time"] - crash["time"]
            crash = None
    return steps, seconds


def _param_diff(workdir: str, ref_dir: str) -> float | None:
    import numpy as np

    paths = [os.path.join(d, "params.npz") for d in (workdir, ref_dir)]
    if not all(os.path.exists(p) for p in paths):
        return None
    with np.load(paths[0]) as a, np.load(paths[1]) as b:
        return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-6))) for k in b)


def _cold_outcome(command: list[str], base: str, plan: str, ref_dir: str, ref_wall: float):
    from jaxdml import chaos

    workdir = os.path.join(base, "cold")
    cold_cmd = [*command, *chaos.CHAOS_OVERRIDES, "--config.supervisor.enabled=false"]
    codes, wall = chaos.run_plan(cold_cmd, workdir, plan)
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
    steps, seconds = cold_lost_work(_read_events(workdir))
    return chaos.PlanOutcome(
        plan=plan + " (supervisor off)",
        completed=codes[-1] == 0 and bool(result),
        attempts=len(codes),
        exit_codes=codes,
        test_accuracy=result.get("test_accuracy"),
        param_rel_diff=_param_diff(workdir, ref_dir),
        lost_steps=steps,
        recovery_seconds=seconds,
        wall_seconds=wall,
        goodput=ref_wall / wall if wall else None,
    )


def run(ctx: Context) -> Section:
    """The recovery section: one run per fault kind of ctx.settings (hot and cold), then a
    host loss on 2 processes, hot vs cold; a failed host-loss part fails the section."""
    s = ctx.settings
    f = int(0.55 * s.recovery_steps) + 3  # not a checkpoint step: a crash loses some steps
    kinds = list(s.recovery_kinds)
    ref, by_kind = _fault_outcomes(ctx, f, kinds)
    host_text, host_data, ok = _host_loss_or_failure(s)
    body = _body(s, f, ref, [_recovery_row(k, by_kind[k]) for k in kinds], host_text)
    data = {
        "fault_step": f,
        "reference_wall_s": ref.wall_seconds,
        "outcomes": {k: dataclasses.asdict(o) for k, o in by_kind.items()},
        "host_loss": host_data,
    }
    plots = [_plot_recovery(ctx, kinds, by_kind)]
    return Section("recovery", body, data, plots, failed=not ok)


def _fault_outcomes(ctx: Context, f: int, kinds: list[str]):
    """(the fault-free outcome, {kind: outcome}) of one fault after step `f` per kind."""
    from jaxdml import chaos

    s = ctx.settings
    supervised = [k for k in kinds if not k.endswith("_cold")]  # run through run_matrix
    plans = [RECOVERY_PLANS[k][0].format(f=f, f4=f + 4) for k in supervised]
    command = _train_command(s.recovery_steps)
    base = os.path.join(ctx.work, "recovery")
    outcomes = chaos.run_matrix(command, base, plans, progress=True)
    ref = outcomes[0]
    ref_dir = os.path.join(base, "fault_free")
    by_kind = dict(zip(supervised, outcomes[1:], strict=True))
    for k in kinds:
        if k.endswith("_cold"):
            plan = RECOVERY_PLANS[k][0].format(f=f, f4=f + 4)
            by_kind[k] = _cold_outcome(command, base, plan, ref_dir, ref.wall_seconds)
    return ref, by_kind


def _body(s: Settings, f: int, ref, rows: list[list], host_loss: str) -> str:
    return (
        f"The seed config (4 simulated devices, {s.recovery_steps} steps, checkpoint and "
        f"fingerprints every 25 steps, watchdog 5 s), one fault after step {f}, each plan run "
        "as `python -m experiments.train` processes restarted until done "
        "(`jaxdml.chaos.run_matrix`). *Recovery s* is the time from detection to the first "
        "good step after it (hot), or from the fault to the restarted process's resume "
        "(cold, restart included); *lost steps* are steps computed twice. Goodput = "
        f"fault-free wall time ({ref.wall_seconds:.1f} s, process start included) / this "
        "plan's wall time.\n\n"
        + _table(
            [
                "fault",
                "plan",
                "recovery",
                "completed",
                "attempts (exit codes)",
                "recovery s",
                "lost steps",
                "wall s",
                "goodput",
                "max rel param diff",
            ],
            rows,
        )
        + "\n\n"
        + RECOVERY_NOTES
        + "\n\n### Host loss, hot vs cold\n\n"
        + host_loss
    )


def _recovery_row(kind: str, o) -> list:
    diff = "-" if o.param_rel_diff is None else f"{o.param_rel_diff:.1e}"
    return [
        kind.replace("_cold", ""),
        f"`{o.plan}`",
        RECOVERY_PLANS[kind][1],
        "yes" if o.completed else "**NO**",
        f"{o.attempts} ({','.join(map(str, o.exit_codes))})",
        f"{o.recovery_seconds:.2f}",
        o.lost_steps,
        f"{o.wall_seconds:.1f}",
        f"{o.goodput:.2f}" if o.goodput else "-",
        diff,
    ]


def _plot_recovery(ctx: Context, kinds: list[str], by_kind: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(kinds) + 1.2))
    colors = ["#d62728" if RECOVERY_PLANS[k][1].startswith("cold") else "#1f77b4" for k in kinds]
    secs = [by_kind[k].recovery_seconds for k in kinds]
    labels = [f"{k} ({by_kind[k].lost_steps} steps lost)" for k in kinds]
    ax.barh(labels, secs, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("recovery seconds (blue: hot, in-process; red: cold, restart)")
    return _save(fig, ctx.plot_path("recovery.png"))


# -------------------------------------------------------------------- host loss, hot vs cold
# 2 processes x 2 simulated CPU devices on loopback (jaxdml.launch); process 1 is SIGKILLed
# after s.host_loss_kill_at steps (the fault plan host_loss@K:1). Recovery seconds run from
# the kill to the first step finished after it; lost steps are the steps computed again.

HOST_LOSS_MODES = (
    ("hot (in-process, live_devices)", True),
    ("cold (restart from checkpoint)", False),
)


def _events(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_once(hot: bool, workdir: str, s: Settings, timeout: float = 600) -> dict:
    """One launcher run with a host kill; returns recovery seconds, lost steps, wall."""
    cmd = [
        sys.executable, "-m", "jaxdml.launch", "--num_processes=2", "--devices_per_process=2",
        "--max_restarts=2", "--grace_secs=2", "--failure_grace_secs=1", "--backoff_secs=0",
        *(["--hot_recovery"] if hot else []), "--",
        sys.executable, "-m", "experiments.train", "--config=configs/sgd_logreg.py",
        f"--workdir={workdir}", f"--config.train.num_steps={s.host_loss_steps}",
        f"--config.checkpoint.every_steps={s.host_loss_checkpoint_every}",
        f"--config.distributed.heartbeat_timeout_secs={s.host_loss_heartbeat_secs}",
        "--config.supervisor.watchdog_secs=30",
        f"--config.faults=host_loss@{s.host_loss_kill_at}:1",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
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


def host_loss(s: Settings) -> tuple[str, dict]:
    """s.host_loss_repeats runs of each mode, interleaved, all within s.script_timeout.

    Returns:
      (markdown: the setting and a table of medians, {mode: medians}).
    """
    deadline = time.monotonic() + s.script_timeout
    rows = {name: [] for name, _ in HOST_LOSS_MODES}
    for _ in range(s.host_loss_repeats):  # interleaved, so machine drift hits both alike
        for name, hot in HOST_LOSS_MODES:
            with tempfile.TemporaryDirectory() as workdir:
                timeout = min(600.0, max(1.0, deadline - time.monotonic()))
                rows[name].append(run_once(hot, workdir, s, timeout))
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in rows.items()
    }
    return _host_loss_text(s, medians), medians


def _host_loss_text(s: Settings, medians: dict) -> str:
    lines = [
        f"Median of {s.host_loss_repeats}; process 1 of 2 killed after step "
        f"{s.host_loss_kill_at}, checkpoint every {s.host_loss_checkpoint_every} steps, "
        f"heartbeat timeout {s.host_loss_heartbeat_secs} s.\n",
        "| mode | recovery s (kill -> training) | detection s | lost steps | job wall s |",
        "|---|---|---|---|---|",
    ]
    for name, med in medians.items():
        detect = "-" if med["detect_s"] != med["detect_s"] else f"{med['detect_s']:.2f}"
        lines.append(
            f"| {name} | {med['recovery_s']:.2f} | {detect} | {med['lost_steps']:.0f} "
            f"| {med['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def _host_loss_or_failure(s: Settings) -> tuple[str, dict, bool]:
    """(markdown, medians, whether it did not fail) of host_loss: a failure or timeout is
    reported in the section instead of hiding the fault-kind table above it."""
    intro = (
        "`sgd_logreg` on 2 processes x 2 simulated CPU devices on loopback "
        "(`jaxdml.launch`); process 1 is SIGKILLed (fault plan "
        f"`host_loss@{s.host_loss_kill_at}:1`). Recovery runs from the kill to the first "
        "step finished after it; lost steps are the steps computed again.\n\n"
    )
    try:
        text, medians = host_loss(s)
    except subprocess.TimeoutExpired:
        return f"{intro}**Timed out** after {s.script_timeout:.0f} s.", {}, False
    except Exception:  # noqa: BLE001 -- reported in benchmarks.md; the section fails
        trace = traceback.format_exc()[-3000:]
        return f"{intro}**Failed:**\n\n```\n{trace}\n```", {}, False
    return intro + text, medians, True
