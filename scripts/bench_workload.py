"""The whole fault-tolerance stack on a real model's state, in one command.

configs/wide_mlp.py (a Flax MLP of two 4096-wide hidden layers, 17.1M parameters, AdamW
with warmup + cosine, clipping and dropout: a train state of ~205 MB) on 4 simulated
CPU devices, each run a real `experiments.train` process restarted until it completes
(jaxdml.chaos.run_plan):

  fault-free   steps/s (median step after compilation), state size, checkpoint
               blocking per async save (the job record's checkpoint spans) and the
               same run with synchronous saves
  hot          device_loss: the survivors re-form the mesh from the state they hold
  warm         sigkill: the restarted process resumes from the memory tier
  cold         sigkill with the memory tier off: it resumes from the persistent tier
  faults       device loss, kill and NaN burst in one run: goodput from the job record

  python scripts/bench_workload.py [--steps=60] [--out=FILE.md]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = flags.DEFINE_integer("steps", 60, "Training steps of each run.")
_CONFIG = flags.DEFINE_string("config", "configs/wide_mlp.py", "The workload's config.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")


def _command(steps: int, *extra: str) -> list[str]:
    every = max(2, steps // 3)
    return [
        sys.executable, "-m", "experiments.train", f"--config={_CONFIG.value}",
        f"--config.train.num_steps={steps}", "--config.train.progress=false",
        "--config.train.log_every=1000000", f"--config.checkpoint.every_steps={every}",
        "--config.checkpoint.local_every_steps=5", "--config.checkpoint.local_every_secs=0",
        "--config.supervisor.watchdog_secs=120", *extra,
    ]  # fmt: skip


def _run(work: str, name: str, steps: int, plan: str = "", *extra: str) -> dict:
    """One job (restarted until done): its record summary, events and result."""
    from jaxdml import chaos, goodput
    from jaxdml.metrics import read_jsonl

    workdir = os.path.join(work, name)
    codes, wall = chaos.run_plan(_command(steps, *extra), workdir, plan, timeout=1800)
    records = goodput.read(workdir)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    events = read_jsonl(os.path.join(workdir, "events.jsonl"))
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
    saves = [  # the persistent tier's periodic saves (async unless the run says not)
        r["seconds"] for r in records
        if r.get("category") == "checkpoint" and r.get("tier") == "persistent" and not r["wait"]
    ]  # fmt: skip
    lost_steps, lost_seconds = chaos.lost_work(events)
    return {
        "plan": plan or "(none)",
        "exit_codes": codes,
        "completed": codes[-1] == 0 and bool(result),
        "wall_s": wall,
        "step_s": statistics.median(r["seconds"] for r in rows[3:]) if len(rows) > 3 else None,
        "save_block_s": statistics.median(saves) if saves else None,
        "summary": goodput.summarize(records),
        "recoveries": [e for e in events if "recover_seconds" in e],
        "resumed": [e for e in events if e["kind"] == "resumed"],
        "lost_steps": lost_steps,
        "lost_seconds": lost_seconds,
        "state_mb": _state_mb(workdir),
    }


def _state_mb(workdir: str) -> float | None:
    """Size of the newest persistent checkpoint (the whole train state), in MB."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((d for d in os.listdir(root) if d.isdigit()), key=int)
    if not steps:
        return None
    total = 0
    for folder, _, files in os.walk(os.path.join(root, steps[-1])):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total / 1e6


def main(argv: list[str]) -> None:
    del argv
    os.chdir(REPO)  # the jobs run `python -m experiments.train` (jaxdml.chaos.run_plan)
    steps, at = _STEPS.value, _STEPS.value // 2
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        plan = [
            ("fault-free", "", ()),
            ("sync saves", "", ("--config.checkpoint.async_save=False",)),
            ("hot: device loss", f"device_loss@{at}:3", ()),
            ("warm: kill, memory tier", f"sigkill@{at}", ()),
            ("cold: kill, no memory tier", f"sigkill@{at}",
             ("--config.checkpoint.local_every_steps=0",)),
            ("faults: loss + NaN burst + kill", f"device_loss@{steps // 4}:3,"
             f"nan@{steps // 2}-{steps // 2 + 2},sigkill@{3 * steps // 4}", ()),
        ]  # fmt: skip
        for name, faults, extra in plan:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            runs[name] = _run(work, name.split(":")[0].replace(" ", "_"), steps, faults, *extra)
    text = _report(runs, steps)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


def _report(runs: dict, steps: int) -> str:
    clean = runs["fault-free"]
    lines = [
        f"`{_CONFIG.value}`, {steps} steps per run, 4 simulated CPU devices on 2 cores; "
        f"train state (newest checkpoint) {clean['state_mb']:.0f} MB; "
        f"{1 / clean['step_s']:.2f} steps/s (median step {clean['step_s']:.2f} s).",
        "",
        "| run | completed (exit codes) | wall s | persistent save blocks s | recovery s "
        "| lost steps | goodput (job records) | job goodput |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        rec = r["recoveries"]
        if rec:  # in-process: detection + recovery of each
            recovery = sum(e["detect_seconds"] + e["recover_seconds"] for e in rec)
        else:  # a restart: crash to resume, from the events
            recovery = r["lost_seconds"]
        block = "-" if r["save_block_s"] is None else f"{r['save_block_s']:.3f}"
        s = r["summary"]
        lines.append(
            f"| {name} | {'yes' if r['completed'] else 'NO'} "
            f"({','.join(map(str, r['exit_codes']))}) | {r['wall_s']:.1f} | {block} "
            f"| {recovery:.2f} | {s['steps_redone']} | {1 - s['fault_fraction']:.3f} "
            f"| {s['job_goodput']:.3f} |"
        )
    sources = {n: [e.get("source") for e in r["resumed"]] for n, r in runs.items() if r["resumed"]}
    lines += ["", f"Resumed from: {sources}"]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
