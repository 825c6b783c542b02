"""The records and the report of a random-moment chaos run (jaxdml/chaos_random.py):
per fault what happened, the run's summary against the fault-free run, markdown tables."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics

import numpy as np

from jaxdml.chaos import _params, _rel_diff
from jaxdml.metrics import read_jsonl


@dataclasses.dataclass
class FaultRecord:
    """What happened to one fault."""

    index: int
    kind: str
    phase: str
    hit: str = ""  # what the phase detector saw ('missed': fired without it)
    target: str = ""  # 'single', 'p0', 'p1', ...
    pid: int = 0
    fired: float = 0.0  # wall clock of the signal
    seen: float | None = None  # wall clock of the first row of the recovered job
    reached: int = 0  # highest step written between the signal and that row
    resumed_from: int | None = None  # that row's step - 1
    path: str = ""  # hot / warm / cold / scratch / continued
    hung: bool = False
    superseded_by: int | None = None  # the next fault came before this one's recovery
    restarted_at: float | None = None  # a worker started after the signal (wall clock)
    continued_at: float | None = None  # SIGCONT sent (a held SIGSTOP)

    @property
    def kill_to_training(self) -> float | None:
        return None if self.seen is None else self.seen - self.fired

    @property
    def steps_redone(self) -> int | None:
        if self.resumed_from is None:
            return None
        return max(0, self.reached - self.resumed_from)


@dataclasses.dataclass
class Summary:
    """The outcome of one random chaos run."""

    mode: str
    seed: int
    faults_fired: int
    completed: bool
    exactly_once: bool
    hung: int
    starts: int
    exit_codes: list[int]
    kill_to_training: list[float]
    steps_redone: list[int]
    paths: dict[str, int]
    shrunk: bool
    params_bitwise: bool | None
    params_rel_diff: float | None
    leftovers: int
    wall_seconds: float


def summarize(records: list[FaultRecord], workdir: str, reference: str | None, **run) -> Summary:
    """The run's summary; also sets each record's recovery path.

    Args:
      records: the fired faults.
      workdir: the run's folder (events.jsonl, metrics.jsonl, result.json, params.npz).
      reference: the fault-free run's folder, or None.
      **run: the runner's facts: mode, seed, done (exit 0 with result.json), stalls,
        starts, exit_codes, leftovers, wall.
    """
    events = read_jsonl(os.path.join(workdir, "events.jsonl"))
    shrunk = any(e["kind"] == "host_loss" for e in events)
    ends = [r.fired for r in records[1:]] + [float("inf")]
    for record, end in zip(records, ends, strict=True):
        record.path = recovery_path(record, events, end)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
    want = result.get("steps", -1)
    if reference:
        with open(os.path.join(reference, "result.json")) as f:
            want = json.load(f)["steps"]
    steps = [r["step"] for r in rows]
    params = _params(workdir)
    ref = _params(reference) if reference else None
    bitwise = rel = None
    if params is not None and ref is not None:
        bitwise = all(np.array_equal(params[k], ref[k]) for k in ref)
        rel = _rel_diff(params, ref)
    measured = [
        r
        for r in records
        if r.superseded_by is None and r.seen is not None and r.path != "no effect"
    ]
    paths = collections.Counter(r.path for r in records)
    completed = run["done"] and result.get("steps") == want and steps[-1:] == [want]
    return Summary(
        mode=run["mode"],
        seed=run["seed"],
        faults_fired=len(records),
        completed=completed,
        exactly_once=bool(steps) and steps == list(range(1, want + 1)),
        hung=sum(r.hung for r in records) + run.get("stalls", 0),
        starts=run.get("starts", 1),
        exit_codes=list(run.get("exit_codes", [])),
        kill_to_training=[r.kill_to_training for r in measured],
        steps_redone=[r.steps_redone for r in measured],
        paths=dict(paths),
        shrunk=shrunk,
        params_bitwise=bitwise,
        params_rel_diff=rel,
        leftovers=run.get("leftovers", 0),
        wall_seconds=run.get("wall", 0.0),
    )


def recovery_path(record: FaultRecord, events: list[dict], end: float) -> str:
    """hot / warm / cold from the first host_loss or resumed event after the signal (and
    before the next fault and this one's recovery); scratch (restarted from step 0),
    continued (a held SIGSTOP: the same process went on), no effect (the signal changed
    nothing: the process ran on), or '-' (never recovered)."""
    until = min(end, (record.seen or float("inf")) + 1.0)
    for e in events:
        if record.fired < e["time"] <= until:
            if e["kind"] == "host_loss":
                return "hot"
            if e["kind"] == "resumed":
                return "warm" if e.get("source") == "memory" else "cold"
    if record.seen is None:
        return "-"
    if record.restarted_at is not None and record.seen >= record.restarted_at:
        return "scratch"
    return "continued" if record.continued_at is not None else "no effect"


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(records: list[FaultRecord], summary: Summary) -> str:
    """Markdown: one row per fault, then the summary."""
    lines = [
        "| # | kind | phase | hit | target | kill->training s | steps redone | path | hung |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        k2t = _fmt(r.kill_to_training)
        if r.superseded_by is not None:
            k2t = f"(superseded by #{r.superseded_by})"
        lines.append(
            f"| {r.index} | {r.kind} | {r.phase} | {r.hit or '-'} | {r.target} | {k2t} "
            f"| {_fmt(r.steps_redone, 'd')} | {r.path} | {'HUNG' if r.hung else 'no'} |"
        )
    return "\n".join(lines) + "\n\n" + summary_table(summary)


def _median_max(values: list, spec: str) -> str:
    if not values:
        return "- / -"
    return f"{statistics.median(values):{spec}} / {max(values):{spec}}"


def summary_table(s: Summary) -> str:
    """The summary of one run as a two-column markdown table."""
    k2t, redo = s.kill_to_training, [r for r in s.steps_redone if r is not None]
    params = "-"
    if s.params_bitwise is not None:
        params = "bitwise equal" if s.params_bitwise else f"max rel diff {s.params_rel_diff:.1e}"
        params += " (after a shrink)" if s.shrunk else ""
    rows = [
        ("mode / seed", f"{s.mode} / {s.seed}"),
        ("faults fired", s.faults_fired),
        ("completed", f"{100 if s.completed else 0}% ({'yes' if s.completed else 'NO'})"),
        ("every step exactly once", "yes" if s.exactly_once else "NO"),
        ("hung", s.hung),
        ("kill->training median / max s", f"{_median_max(k2t, '.1f')}"),
        ("steps redone median / max", f"{_median_max(redo, 'g')}"),
        ("paths", ", ".join(f"{k} {v}" for k, v in sorted(s.paths.items())) or "-"),
        ("params vs fault-free", params),
        ("job starts (exit codes)", f"{s.starts} ({','.join(map(str, s.exit_codes))})"),
        ("processes left behind", s.leftovers),
        ("wall s", f"{s.wall_seconds:.0f}"),
    ]  # fmt: skip
    return "\n".join(["| summary | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
