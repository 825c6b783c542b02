"""Job-level goodput: where the wall time of a whole job went, across restarts.

Every process life appends its intervals to one log in the run folder (goodput.jsonl;
process 0's is the job record, other processes keep theirs in their process folder):

  {"kind": "life", "t": start of the process}           a new process life began (a
                                  warm standby's: when it was woken, jaxdml.standby)
  {"kind": "span", "category": C, "t": end, "seconds"}  time spent in category C
                                  ("hidden": true: host work between steps that the
                                  steps in flight hid, so not badput)
  {"kind": "steps", "first", "last", "seconds": [...], "host", "t"}   finished steps:
                                  each one's device time, and the host work between them
                                  that stalled the devices
  {"kind": "resume", "step": s, "t"}                    training continues after step s

`summarize` reads the log back: step time is productive unless a later `resume` went back
before those steps (then it is `redone`: wasted progress, whatever the restart path: no
checkpoint, memory tier, persistent tier, rollback or hot recovery); the time between
one life's last record and the next life's start is `down` (the process was dead or
restarting, with the work since its last record lost); what no category claims is
`other`. The categories sum to the job's wall time (first life's start to the last
record). `fault_seconds` is what failures cost: redone, recovery and down, plus the
start-up, restore and compilation of every life after the first and every compilation
after a life's first (a loop restarted on a new mesh); 1 - its fraction of the wall time
is the job's goodput relative to the same job without faults. Steps finished but not
yet fetched when a process is killed (at most `train.fetch_every`) are in `down`, not in
the redone steps.
"""

from __future__ import annotations

import os
import re
import time

from jaxdml.metrics import JsonlWriter, read_jsonl

FILE = "goodput.jsonl"
# Badput categories, in the order reports list them (after `productive`).
CATEGORIES = (
    "startup",  # process start to the trainer's first step: imports, runtime, data, model
    "restore",  # reading a checkpoint
    "compile",  # compiling the step (warm-up, and again after a new mesh)
    "checkpoint",  # the loop blocked by saves (periodic, final, preemption)
    "host",  # the loop's other host work between steps (evaluation, checks, hooks)
    "recovery",  # detecting a failure and recovering from it in the same process
    "redone",  # step time of steps that a restart or rollback did again
    "down",  # between a process life's last record and the next life's start
    "other",
)


_woken_at: list[float] = []  # set by a warm standby (jaxdml.standby) when it is woken


def life_began_at(t: float) -> None:
    """This process's life began at `t`, not at its start: a warm standby, started and
    imported ahead, was told to run then (jaxdml.standby); its wait is no one's time."""
    _woken_at[:] = [t]


def process_start_time() -> float:
    """This process's start as a wall-clock time, to about 10 ms (Linux: its start in
    clock ticks since boot, against the boot-time clock; elsewhere: now); a woken
    standby's life begins when it was woken (`life_began_at`)."""
    if _woken_at:
        return _woken_at[0]
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, since_start)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


class GoodputLog(JsonlWriter):
    """This process life's goodput records (appended to `folder`/goodput.jsonl)."""

    def __init__(self, folder: str, clock=time.time, started: float | None = None):
        super().__init__(os.path.join(folder, FILE))
        self.clock = clock
        self.life_start = process_start_time() if started is None else started
        self._spent = 0.0  # seconds of this life's spans so far
        self._in_loop: list[dict] = []  # in-loop spans waiting for their steps' rows
        self._ends: list[tuple[float, float]] = []  # (when it ended, seconds) of each span
        self._started = False
        self.write({"kind": "life", "t": self.life_start})

    def span(
        self,
        category: str,
        seconds: float,
        in_loop: bool = False,
        ended: float | None = None,
        **detail,
    ) -> None:
        """`seconds` spent in `category`, ending now (or at `ended`, the log's clock).

        `in_loop`: spent inside the loop's host work between steps (a periodic save). It
        is recorded with the rows of the steps it fell between (`steps`): badput only if
        the devices ran dry meanwhile (the rows' `stall_seconds`); otherwise it was hidden
        behind the steps in flight, and is recorded `hidden` (productive time, no
        category's). `detail`: more fields of the record (a save's tier)."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown goodput category {category!r}")
        ended = self.clock() if ended is None else ended
        record = {"kind": "span", "category": category, "seconds": float(seconds),
                  "t": ended, **detail}  # fmt: skip
        if in_loop:
            self._in_loop.append(record)
        else:
            self._charge(record)

    def _charge(self, record: dict) -> None:
        self._spent += record["seconds"]
        self._ends.append((record["t"], record["seconds"]))
        self.write(record)

    def spent_before(self, t: float) -> float:
        """Seconds of this life's (charged) spans that ended by `t` (the log's clock)."""
        return sum(seconds for end, seconds in self._ends if end <= t)

    def started(self) -> None:
        """Training starts: the life's time so far that no span claimed is `startup`."""
        if not self._started:
            self._started = True
            self.span("startup", max(0.0, self.clock() - self.life_start - self._spent))

    def steps(self, rows: list[dict], compile_seconds: float = 0.0) -> None:
        """Finished steps' device time: row seconds less the loop's host work between
        steps that stalled the devices (`stall_seconds`, recorded as `host`, or as the
        in-loop spans in it); `compile_seconds` of it was compilation."""
        if not rows:
            return
        stall = sum(r["stall_seconds"] for r in rows)
        seconds = [max(0.0, r["seconds"] - r["stall_seconds"]) for r in rows]
        seconds[0] = max(0.0, seconds[0] - compile_seconds)
        claimed = self._resolve_in_loop(rows)
        self.write({"kind": "steps", "first": rows[0]["step"], "last": rows[-1]["step"],
                    "seconds": [round(x, 6) for x in seconds], "host": max(0.0, stall - claimed),
                    "t": self.clock()})  # fmt: skip
        if compile_seconds:  # it ended with the first of these steps
            self.span("compile", compile_seconds, ended=rows[0].get("time"))

    def _resolve_in_loop(self, rows: list[dict]) -> float:
        """Records the in-loop spans that ended within these rows' time: charged where
        their row stalled (or where no row holds them: their steps were lost), hidden
        where not. Returns the seconds charged."""
        first_start = rows[0]["time"] - rows[0]["seconds"]
        claimed, waiting = 0.0, []
        for record in self._in_loop:
            t = record["t"]
            if t > rows[-1]["time"]:
                waiting.append(record)  # between later steps
                continue
            row = next((r for r in rows if r["time"] - r["seconds"] < t <= r["time"]), None)
            if t > first_start and row is not None and not row["stall_seconds"]:
                self.write({**record, "hidden": True})
            else:
                self._charge(record)
                claimed += record["seconds"]
        self._in_loop = waiting
        return claimed

    def close(self) -> None:
        """In-loop spans no row claimed (the loop failed after them) are badput."""
        for record in self._in_loop:
            self._charge(record)
        self._in_loop = []
        super().close()

    def resume(self, step: int) -> None:
        """Training goes on after `step` (a start, restart, rollback or re-formed mesh)."""
        self.write({"kind": "resume", "step": int(step), "t": self.clock()})


def read(workdir: str) -> list[dict]:
    """The job record of a run folder (process 0's)."""
    return read_jsonl(os.path.join(workdir, FILE))


def process_folders(workdir: str) -> dict[int, str]:
    """Each process's record folder, by process index: process 0's is the run folder
    (its record is the job's), process N's is `process_N` (multi-process jobs)."""
    folders = {0: workdir}
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
        match = re.fullmatch(r"process_(\d+)", name)
        if match and os.path.exists(os.path.join(workdir, name, FILE)):
            folders[int(match.group(1))] = os.path.join(workdir, name)
    return dict(sorted(folders.items()))


def per_process(workdir: str) -> list[dict]:
    """Each process's own summary, with the detection and recovery seconds of each of its
    in-process recoveries (from its events.jsonl). In a multi-process job they differ: a
    survivor detects a lost peer and recovers, a restarted process was `down`, and each
    process's record ends at its own last write."""
    out = []
    for index, folder in process_folders(workdir).items():
        summary = summarize(read_jsonl(os.path.join(folder, FILE)))
        recoveries = [
            {k: e[k] for k in ("kind", "step", "detect_seconds", "recover_seconds")}
            for e in read_jsonl(os.path.join(folder, "events.jsonl"))
            if "recover_seconds" in e and "detect_seconds" in e
        ]
        out.append({"process": index, **summary, "recoveries": recoveries})
    return out


def summarize(records: list[dict]) -> dict:
    """The job's goodput and badput per category (seconds and fractions of wall time),
    with the steps done, kept and redone and the number of process lives."""
    seconds = dict.fromkeys(("productive", *CATEGORIES), 0.0)
    done: list[tuple[int, list[float]]] = []  # (first step, each step's seconds) still kept
    lives, redone_steps, start, last_t = 0, 0, None, None
    restarts = 0.0  # start-up, restore and compilation that a fault-free job does not pay
    hidden: dict[str, float] = {}  # in-loop host work the devices' queue hid
    compiles = 0  # compilations in this life (the first is the warm-up)
    for r in records:
        kind = r["kind"]
        if kind == "life":
            lives, compiles = lives + 1, 0
            if start is None:
                start = r["t"]
            elif last_t is not None:
                seconds["down"] += max(0.0, r["t"] - last_t)
            last_t = r["t"]
            continue
        last_t = max(last_t if last_t is not None else r["t"], r["t"])
        if kind == "span" and r.get("hidden"):  # behind the steps in flight: productive
            hidden[r["category"]] = hidden.get(r["category"], 0.0) + r["seconds"]
        elif kind == "span":
            category = r["category"]
            seconds[category] += r["seconds"]
            if category == "compile":
                compiles += 1
            if (category in ("startup", "restore") and lives > 1) or (
                category == "compile" and (lives > 1 or compiles > 1)
            ):
                restarts += r["seconds"]
        elif kind == "steps":
            done.append((r["first"], list(r["seconds"])))
            seconds["host"] += r.get("host", 0.0)
        elif kind == "resume":
            lost_steps, lost_seconds = _cut_after(done, r["step"])
            redone_steps += lost_steps
            seconds["redone"] += lost_seconds
    seconds["productive"] = sum(sum(each) for _, each in done)
    wall = (last_t - start) if start is not None else 0.0
    seconds["other"] = max(0.0, wall - sum(v for k, v in seconds.items() if k != "other"))
    faults = seconds["redone"] + seconds["recovery"] + seconds["down"] + restarts
    return {
        "job_wall_seconds": wall,
        "job_goodput": seconds["productive"] / wall if wall > 0 else 0.0,
        # What the failures cost: redone steps, in-process recovery, time down, and the
        # start-up, restore and compilation of the lives and loops that followed them.
        "fault_seconds": faults,
        "fault_fraction": faults / wall if wall > 0 else 0.0,
        "seconds": seconds,
        "fractions": {k: (v / wall if wall > 0 else 0.0) for k, v in seconds.items()},
        "steps_kept": sum(len(each) for _, each in done),
        "steps_redone": redone_steps,
        "lives": lives,
        "hidden_seconds": hidden,
    }


def _cut_after(done: list[tuple[int, list[float]]], step: int) -> tuple[int, float]:
    """Drops the kept steps past `step`; returns what was dropped (steps, seconds)."""
    lost_steps, lost_seconds = 0, 0.0
    for first, each in done:
        keep = max(0, step - first + 1)
        lost_steps += len(each[keep:])
        lost_seconds += sum(each[keep:])
        del each[keep:]
    done[:] = [(first, each) for first, each in done if each]
    return lost_steps, lost_seconds


def table(summary: dict) -> str:
    """The summary as a markdown table (seconds and percent of the job's wall time)."""
    lines = [
        f"job wall time {summary['job_wall_seconds']:.1f} s over {summary['lives']} process "
        f"lives; goodput {summary['job_goodput']:.3f}; steps kept {summary['steps_kept']}, "
        f"redone {summary['steps_redone']}; the faults cost {summary['fault_seconds']:.2f} s "
        f"({100 * summary['fault_fraction']:.1f}%: redone, recovery, down and restarts)",
        "",
        "| category | seconds | percent |",
        "|---|---:|---:|",
    ]
    for k, v in summary["seconds"].items():
        lines.append(f"| {k} | {v:.2f} | {100 * summary['fractions'][k]:.1f} |")
    hidden = summary.get("hidden_seconds") or {}
    if hidden:
        each = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(hidden.items()))
        lines += ["", f"host work hidden behind steps in flight (productive, not badput): {each}"]
    return "\n".join(lines)


def process_table(processes: list[dict]) -> str:
    """Per-process lines (markdown): goodput, lives, redone steps, down and recovery
    seconds, and each in-process recovery's detection + recovery seconds."""
    lines = [
        "| process | lives | goodput | steps redone | down s | recovery s "
        "| recoveries (detect + recover s) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in processes:
        each = ", ".join(
            f"{r['kind']}@{r['step']}: {r['detect_seconds']:.2f} + {r['recover_seconds']:.2f}"
            for r in p["recoveries"]
        )
        lines.append(
            f"| {p['process']} | {p['lives']} | {p['job_goodput']:.3f} | {p['steps_redone']} "
            f"| {p['seconds']['down']:.2f} | {p['seconds']['recovery']:.2f} | {each or '-'} |"
        )
    return "\n".join(lines)


def plot(summary: dict, out: str, title: str = "") -> None:
    """A stacked horizontal bar of the job's wall time by category (matplotlib).

    Raises:
      ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.2))
    ax = fig.add_subplot()
    left = 0.0
    for i, (k, v) in enumerate(summary["seconds"].items()):
        if v <= 0:
            continue
        color = "tab:green" if k == "productive" else f"C{i % 10}"
        ax.barh(0, v, left=left, color=color, label=f"{k} {100 * summary['fractions'][k]:.1f}%")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("seconds of the job's wall time")
    ax.set_title(f"{title} goodput {summary['job_goodput']:.3f}".strip())
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
