"""What every benchmark section shares: sizes (Settings), the Section and Context records,
small helpers (medians, markdown tables, plots, progress bars) and the report writer."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "scripts", "bench.py")  # the one command; workers run it again

TITLES = {
    "overhead": "Fault-tolerance overhead",
    "checkpoint": "Checkpoint blocking time",
    "recovery": "Recovery time and lost steps per fault kind",
    "goodput": "Goodput under faults",
    "models": "Algorithms vs scikit-learn and XGBoost",
    "scaling": "Cost growth: data size and device count",
}
SECTIONS = tuple(TITLES)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (full or --quick); `--set=FIELD=VALUE` overrides a field."""

    overhead_problems: tuple  # (name, rows or 0 for the seed data, steps)
    overhead_repeats: int
    overhead_breakdown: bool  # also time each protection alone
    ckpt_sizes_mb: tuple
    ckpt_repeats: int
    ckpt_steps: int
    recovery_steps: int
    recovery_kinds: tuple  # keys of recovery.RECOVERY_PLANS
    goodput_seconds: float
    goodput_every: float
    goodput_calibration_steps: int  # a fault-free run that sizes the goodput runs
    scaling_rows: tuple
    scaling_devices: tuple
    scaling_device_rows: int
    scaling_seconds: float
    script_timeout: float  # the models worker; all host-loss runs together
    host_loss_repeats: int  # hot vs cold host loss (recovery): runs of each mode
    models_repeats: int  # models: runs of ours and of each reference (median reported)
    ckpt_every: int = 10  # checkpoint steady-state test: an async save every k steps
    # overhead: the fused variants' train.steps_per_call (and the bare loop's steps per call)
    overhead_steps_per_call: int = 50
    host_loss_steps: int = 200  # training steps of a host-loss run
    host_loss_kill_at: int = 130  # process 1 is killed after this many steps
    host_loss_checkpoint_every: int = 50
    host_loss_heartbeat_secs: int = 3  # coordination-service heartbeat timeout
    models_devices: int = 4  # simulated CPU devices for ours
    models_only: tuple = ()  # names of models.MODELS; () = all
    models_data: tuple = ()  # names of models.DATASETS; () = all
    # The goodput runs' config (a shipped name or a path) and memory-tier step schedule
    # (0: the config's own). The realistic workload is --set=goodput_config=wide_mlp
    # --set=goodput_calibration_steps=30 --set=goodput_local_every_steps=0 (its config
    # saves every 3 steps of about a second).
    goodput_config: str = "seed_logreg"
    goodput_local_every_steps: int = 100
    # The hang watchdog's floor in the goodput runs, s (0: 2 x the longest wait between
    # steps of the fault-free calibration run, at least 1 s), and train.steps_per_call.
    goodput_watchdog_secs: float = 0.0
    goodput_steps_per_call: int = 1


FULL = Settings(
    # 200k: 1600 steps, so that the timed window (past step 160) is seconds, not 0.8 s
    overhead_problems=(("seed 8k x 20", 0, 2000), ("synthetic 200k x 20", 250_000, 1600)),
    overhead_repeats=5,
    overhead_breakdown=True,
    ckpt_sizes_mb=(10, 100, 1000),
    ckpt_repeats=3,
    ckpt_steps=60,
    recovery_steps=300,
    recovery_kinds=(
        "device_loss",
        "device_loss_cold",
        "nan",
        "nan_burst",
        "bitflip",
        "hang",
        "sigkill",
        "sigterm",
    ),
    goodput_seconds=300.0,
    goodput_every=30.0,
    goodput_calibration_steps=20000,
    scaling_rows=(10_000, 30_000, 100_000, 300_000, 1_000_000),
    scaling_devices=(1, 2, 3, 4, 6, 8),
    scaling_device_rows=1_000_000,
    scaling_seconds=2.0,
    script_timeout=3600.0,
    host_loss_repeats=3,
    models_repeats=3,
)
QUICK = Settings(
    overhead_problems=(("seed 8k x 20", 0, 300),),
    overhead_repeats=3,
    overhead_breakdown=False,
    ckpt_sizes_mb=(1, 10),
    ckpt_repeats=2,
    ckpt_steps=20,
    recovery_steps=150,
    recovery_kinds=("device_loss", "device_loss_cold", "nan_burst", "bitflip", "sigkill"),
    goodput_seconds=30.0,
    goodput_every=8.0,
    goodput_calibration_steps=2000,
    scaling_rows=(10_000, 100_000, 1_000_000),
    scaling_devices=(1, 2, 4, 8),
    scaling_device_rows=200_000,
    scaling_seconds=0.3,
    script_timeout=300.0,
    host_loss_repeats=1,
    models_repeats=1,
)


def with_overrides(settings: Settings, assignments: list[str]) -> Settings:
    """`settings` with each FIELD=VALUE of `assignments` (the --set flags) applied.

    A value takes the type of the field's current value; a tuple field takes
    comma-separated values of the type of its current elements (str when empty).
    """
    names = [f.name for f in dataclasses.fields(Settings)]
    changes = {}
    for item in assignments:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--set={item}: expected FIELD=VALUE, FIELD one of {names}")
        changes[name] = _parse_like(getattr(settings, name), text, name)
    return dataclasses.replace(settings, **changes)


def _parse_like(current, text: str, name: str):
    if isinstance(current, bool):  # before int: bool is an int
        return text.lower() in ("1", "true", "yes")
    if not isinstance(current, tuple):
        return type(current)(text)
    kind = type(current[0]) if current else str
    if kind is tuple:
        raise ValueError(f"--set: {name} holds tuples; edit it in scripts/benchmarks/common.py")
    return tuple(kind(v) for v in text.split(",") if v)


@dataclasses.dataclass
class Section:
    """One heading of benchmarks.md: markdown body, raw numbers, plots written."""

    name: str
    body: str = ""
    data: dict = dataclasses.field(default_factory=dict)
    plots: list = dataclasses.field(default_factory=list)
    failed: bool = False


@dataclasses.dataclass
class Context:
    """What the sections share: folders and the run's sizes."""

    out: str
    work: str
    settings: Settings
    quick: bool

    def plot_path(self, name: str) -> str:
        return os.path.join(self.out, name)


@functools.cache
def config_module(name: str) -> types.SimpleNamespace:
    """configs/<name>.py, read from its file as `--config=configs/<name>.py` reads it: the
    configs belong to the checkout, not to the installed jaxdml package, and this command
    puts only scripts/ on sys.path."""
    return types.SimpleNamespace(**runpy.run_path(os.path.join(REPO, "configs", f"{name}.py")))


def _median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


# ------------------------------------------------------------------------------ report


def _run_section(name: str, run: Callable[[Context], Section], ctx: Context) -> Section:
    t0 = time.perf_counter()
    try:
        section = run(ctx)
    except Exception:  # noqa: BLE001 -- reported in benchmarks.md; the command exits 1
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        section = Section(
            name, f"**This section failed:**\n\n```\n{trace[-4000:]}\n```", failed=True
        )
    section.data["seconds"] = time.perf_counter() - t0
    return section


def _machine() -> dict:
    import jax

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit or "?",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def _report(
    sections: list[Section],
    machine: dict,
    quick: bool,
    seconds: float,
    kept: dict[str, str] | None = None,
) -> str:
    """benchmarks.md: the sections run now, and `kept` ({name: markdown from its heading
    on}) from an earlier run, each in the order of SECTIONS."""
    kept = kept or {}
    mode = "reduced sizes: a smoke test, not the reference numbers" if quick else "full sizes"
    load = ", ".join(f"{v:.1f}" for v in machine["load_average_at_start"])
    chunks = {}
    for s in sections:
        lines = [f"## {TITLES[s.name]}", "", s.body.strip()]
        lines += [f"\n![{s.name}]({os.path.basename(p)})" for p in s.plots]
        when = f"commit {machine['commit']}, {machine['date']}"
        lines += ["", f"_Section time: {s.data.get('seconds', 0):.0f} s ({when})._"]
        chunks[s.name] = "\n".join(lines)
    order = [name for name in SECTIONS if name in chunks or name in kept]
    header = [
        "# jaxdml benchmarks",
        "",
        f"Generated by `python scripts/bench.py{' --quick' if quick else ''}` ({mode}) on "
        f"{machine['date']}, commit {machine['commit']}: {machine['cpus']} CPUs, "
        f"{machine['platform']}, Python {machine['python']}, JAX {machine['jax']} "
        f"({machine['backend']}); load average at start {load}. Total time {seconds:.0f} s.",
    ]
    if kept:
        names = ", ".join(TITLES[n] for n in order if n in kept)
        header[-1] += (
            f" Kept from an earlier run (not in this run's --only): {names}; each section's "
            "last line names the commit it was measured at."
        )
    header += ["", "Contents: " + ", ".join(TITLES[n] for n in order) + "."]
    body = [chunks.get(name) or kept[name].strip() for name in order]
    return "\n".join(header) + "\n\n" + "\n\n".join(body) + "\n"


def previous_sections(out: str, quick: bool, rerun: set[str]) -> tuple[dict, dict]:
    """The sections of out/benchmarks.md and .json that this run does not redo, so that
    `--only` replaces its sections and keeps the others: ({name: markdown}, {name: raw
    numbers}). Nothing is kept from a run of the other size (--quick or not), or from a
    file this writer cannot read."""
    try:
        with open(os.path.join(out, "benchmarks.json")) as f:
            raw = json.load(f)
        with open(os.path.join(out, "benchmarks.md")) as f:
            text = f.read()
    except (OSError, ValueError):
        return {}, {}
    if raw.get("quick") != quick:
        return {}, {}
    by_title = {f"## {title}": name for name, title in TITLES.items()}
    markdown, name = {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            name = by_title.get(line.rstrip("\n"))
            if name is not None:
                markdown[name] = ""
        if name is not None:
            markdown[name] += line
    keep = {n for n in markdown if n not in rerun and n in raw.get("sections", {})}
    return {n: markdown[n] for n in keep}, {n: raw["sections"][n] for n in keep}


def run_all(
    out: str,
    runners: dict[str, Callable[[Context], Section]],
    settings: Settings,
    quick: bool,
    keep_work: bool,
) -> int:
    """Runs each section of `runners` in order, writes out/benchmarks.md and .json; returns
    the exit code (1 when a section failed)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts: in-process sections use 4
    from jaxdml.cli import quiet_library_logs

    quiet_library_logs()
    os.makedirs(out, exist_ok=True)
    kept_md, kept_raw = previous_sections(out, quick, set(runners))
    work = tempfile.mkdtemp(prefix="jaxdml_bench_")
    ctx = Context(out, work, settings, quick)
    machine = _machine()
    t0 = time.perf_counter()
    bar = _progress(runners.items(), "benchmarks", total=len(runners))
    sections = [_run_section(name, run, ctx) for name, run in bar]
    report = _report(sections, machine, quick, time.perf_counter() - t0, kept_md)
    with open(os.path.join(out, "benchmarks.md"), "w") as f:
        f.write(report)
    now = {s.name: {"failed": s.failed, "machine": machine, **s.data} for s in sections}
    raw = {
        "machine": machine,
        "quick": quick,
        "sections": {n: now.get(n) or kept_raw[n] for n in SECTIONS if n in now or n in kept_raw},
    }
    with open(os.path.join(out, "benchmarks.json"), "w") as f:
        json.dump(raw, f, indent=2, default=str)
    print(report)
    print(f"wrote {out}/benchmarks.md; work folder {work}", file=sys.stderr)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(s.failed for s in sections) else 0
