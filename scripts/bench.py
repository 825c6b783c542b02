"""Every jaxdml benchmark in one command: results/benchmarks.md plus PNG plots.

  python scripts/bench.py                  # the full suite (about half an hour on 2 CPU cores)
  python scripts/bench.py --quick          # reduced sizes, under 3 minutes (CI smoke test)
  python scripts/bench.py --only=overhead,scaling --out=/tmp/results
  python scripts/bench.py --gpu            # GD step time vs the memory-bandwidth floor (GPU/TPU)

Sections (each one heading of benchmarks.md; a section that fails says so there and
the command exits 1 after writing everything else):

  overhead    steps/s of the supervised Trainer with every protection on vs a bare
              hand-written jitted shard_map loop on the same model and data (and vs
              the unprotected Trainer); repeats interleaved, median ratio
  checkpoint  seconds the loop is blocked per save, async vs sync
              (the functions of scripts/bench_checkpoint.py)
  recovery    recovery seconds and lost steps per fault kind, in-process (hot) vs
              process restart (cold), through jaxdml.chaos; then scripts/bench_recovery.py
              (host loss, hot vs cold) when it exists
  goodput     a run with a fault every 30 s for 5 minutes vs the same run without
              faults, restarted like a scheduler would (jaxdml.chaos.run_plan)
  models      scripts/bench_models.py (speed and accuracy vs scikit-learn / XGBoost)
              when it exists
  scaling     step time and peak memory vs rows (1e4 .. 1e6) and vs simulated device
              count (1 .. 8), one subprocess per point, with log-log slopes

results/benchmarks.json holds the raw numbers of every section.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's jaxdml, not an installed copy

SECTIONS = ("overhead", "checkpoint", "recovery", "goodput", "models", "scaling")
TITLES = {
    "overhead": "Fault-tolerance overhead",
    "checkpoint": "Checkpoint blocking time",
    "recovery": "Recovery time and lost steps per fault kind",
    "goodput": "Goodput under faults",
    "models": "Algorithms vs scikit-learn and XGBoost",
    "scaling": "Cost growth: data size and device count",
}

_OUT = flags.DEFINE_string("out", "results", "Folder for benchmarks.md, .json and the PNGs.")
_QUICK = flags.DEFINE_bool("quick", False, "Reduced sizes (< 3 min): a smoke test, not numbers.")
_ONLY = flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, from {list(SECTIONS)}.")
_GPU = flags.DEFINE_bool("gpu", False, "Only the GPU/TPU figure: GD step vs bandwidth floor.")
_GPU_ANY = flags.DEFINE_bool("gpu_any_backend", False, "--gpu on any backend (tests its code).")
_KEEP = flags.DEFINE_bool("keep_work", False, "Keep the runs' work folder (printed at the end).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one scaling point and print JSON.")
_W_ROWS = flags.DEFINE_integer("worker_rows", 10_000, "Internal: rows of the scaling point.")
_W_DEVICES = flags.DEFINE_integer("worker_devices", 1, "Internal: devices of the scaling point.")
_W_SECONDS = flags.DEFINE_float("worker_seconds", 1.0, "Internal: seconds of timed steps.")

FEATURES = 20  # columns of every generated problem (as in the seed example)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (full or --quick)."""

    overhead_problems: tuple  # (name, rows or 0 for the seed data, steps)
    overhead_repeats: int
    overhead_breakdown: bool  # also time each protection alone
    ckpt_sizes_mb: tuple
    ckpt_repeats: int
    ckpt_steps: int
    recovery_steps: int
    recovery_kinds: tuple  # keys of RECOVERY_PLANS
    goodput_seconds: float
    goodput_every: float
    goodput_calibration_steps: int  # a fault-free run that sizes the goodput runs
    scaling_rows: tuple
    scaling_devices: tuple
    scaling_device_rows: int
    scaling_seconds: float
    script_timeout: float  # scripts/bench_models.py, scripts/bench_recovery.py


FULL = Settings(
    overhead_problems=(("seed 8k x 20", 0, 2000), ("synthetic 200k x 20", 250_000, 400)),
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
)


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
    """What the sections share: folders and numbers measured earlier in the run."""

    out: str
    work: str
    settings: Settings
    quick: bool
    shared: dict = dataclasses.field(default_factory=dict)

    def plot_path(self, name: str) -> str:
        return os.path.join(self.out, name)


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


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


# --------------------------------------------------------------------------- overhead


# Overhead variants: (supervisor on, checkpoint every 100 steps, fingerprints every 50 steps +
# watchdog). "bare" is the hand-written loop; the *_only variants split the protections' cost.
OVERHEAD_VARIANTS = {
    "plain": (False, False, False),
    "checkpoint_only": (True, True, False),
    "fingerprints_only": (True, False, True),
    "protected": (True, True, True),
}


def _overhead_config(rows: int, steps: int, variant: str):
    from configs import seed_logreg

    supervised, checkpoints, checks = OVERHEAD_VARIANTS[variant]
    c = seed_logreg.get_config()
    if rows:  # a larger generated problem (the seed data is sklearn's, 10k rows)
        c.data.source, c.data.n_samples, c.data.n_informative = "synthetic", rows, 5
    c.train.num_steps = steps
    c.train.log_every = 10**9
    c.supervisor.enabled = supervised
    c.checkpoint.every_steps = 100 if checkpoints else 0  # async Orbax save
    c.supervisor.fingerprint_every = 50 if checks else 0  # replica fingerprints (SDC)
    c.supervisor.watchdog_secs = 60.0 if checks else 0.0  # step watchdog thread
    return c


def _time_trainer(config, dataset, devices, workdir: str, warm: int) -> tuple[float, float]:
    """(steps/s from step `warm` to the last, final loss) of one Trainer.fit."""
    from jaxdml.training.hooks import OnMetrics
    from jaxdml.training.trainer import Trainer

    n = config.train.num_steps
    marks: dict[int, float] = {}

    def mark(rows):
        for row in rows:
            if row["step"] in (warm, n):
                marks.setdefault(row["step"], time.perf_counter())

    trainer = Trainer(config, workdir, devices=devices, dataset=dataset, hooks=[OnMetrics(mark)])
    result = trainer.fit()
    return (n - warm) / (marks[n] - marks[warm]), float(result["loss"])


def bare_loop(x, y, devices, learning_rate: float, steps: int, warm: int) -> tuple[float, float]:
    """A hand-written data-parallel logistic-regression GD loop, nothing else.

    jax.shard_map computes each device's loss and gradient sums, a psum adds them,
    optax applies SGD; at most 2 steps are in flight (docs/architecture.md: unbounded dispatch of
    collectives deadlocks on CPU). No metrics, checkpoints, guards or hooks.

    Returns:
      (steps/s from step `warm` to the last, final loss).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("data",))
    n = len(x) // len(devices) * len(devices)
    xs = jax.device_put(x[:n], NamedSharding(mesh, P("data")))
    ys = jax.device_put(y[:n].astype(np.float32), NamedSharding(mesh, P("data")))
    params = {"w": jnp.zeros((x.shape[1],)), "b": jnp.zeros(())}
    params = jax.device_put(params, NamedSharding(mesh, P()))
    opt = optax.sgd(learning_rate)
    opt_state = opt.init(params)

    def local(p, xb, yb):
        def loss_sum(q):
            z = xb @ q["w"] + q["b"]
            return jnp.sum(jax.nn.softplus(z) - yb * z)

        p = jax.lax.pcast(p, "data", to="varying")  # per-device grads; psum aggregates
        return jax.lax.psum(jax.value_and_grad(loss_sum)(p), "data")

    sums = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, xb, yb):
        loss, grads = sums(p, xb, yb)
        updates, s = opt.update(jax.tree.map(lambda g: g / n, grads), s, p)
        return optax.apply_updates(p, updates), s, loss / n

    inflight: collections.deque = collections.deque()
    marks, done = {}, 0
    for _ in range(steps):
        if len(inflight) >= 2:
            inflight.popleft().block_until_ready()
            done += 1
            marks.setdefault(done, time.perf_counter())
        params, opt_state, loss = step(params, opt_state, xs, ys)
        inflight.append(loss)
    while inflight:
        last = float(inflight.popleft())
        done += 1
        marks.setdefault(done, time.perf_counter())
    return (steps - warm) / (marks[steps] - marks[warm]), last


def _overhead_problem(ctx: Context, name: str, rows: int, steps: int) -> dict:
    import jax

    from jaxdml.data import load_dataset

    devices = jax.devices()[:4]
    kinds = ["bare", "plain", "protected"]
    if ctx.settings.overhead_breakdown:
        kinds[2:2] = ["checkpoint_only", "fingerprints_only"]
    configs = {k: _overhead_config(rows, steps, k) for k in kinds if k != "bare"}
    ds = load_dataset(configs["plain"].data)
    lr = configs["plain"].train.learning_rate
    warm = max(110, steps // 10)  # past compiling the step, the first save and the first check
    rates, losses = collections.defaultdict(list), {}
    for r in _progress(range(ctx.settings.overhead_repeats), f"overhead {name}"):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:  # interleaved: drift hits all alike
            if kind == "bare":
                rate, losses[kind] = bare_loop(ds.x_train, ds.y_train, devices, lr, steps, warm)
            else:
                workdir = os.path.join(ctx.work, "overhead", f"{name}-{kind}-{r}".replace(" ", ""))
                rate, losses[kind] = _time_trainer(configs[kind], ds, devices, workdir, warm)
            rates[kind].append(rate)

    def ratio(a: str, b: str) -> float:  # median of the per-repeat ratios
        return _median([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    return {
        "problem": name,
        "rows": len(ds.x_train),
        "steps": steps,
        "warm": warm,
        "devices": 4,
        "rates": dict(rates),
        "median_rate": {k: _median(v) for k, v in rates.items()},
        "protected_over_bare": ratio("protected", "bare"),
        "plain_over_bare": ratio("plain", "bare"),
        "over_plain": {k: ratio(k, "plain") for k in kinds if k not in ("bare", "plain")},
        "final_loss": losses,
    }


def section_overhead(ctx: Context) -> Section:
    results = [_overhead_problem(ctx, *p) for p in ctx.settings.overhead_problems]
    split = ctx.settings.overhead_breakdown
    header = ["problem", "steps", "bare steps/s", "plain steps/s", "protected steps/s",
              "plain/bare", "protected/bare", "protected/plain"]  # fmt: skip
    if split:
        header += ["checkpoint only/plain", "fingerprints+watchdog only/plain"]
    rows = []
    for r in results:
        m, over = r["median_rate"], r["over_plain"]
        row = [r["problem"], r["steps"], f"{m['bare']:.0f}", f"{m['plain']:.0f}",
               f"{m['protected']:.0f}", f"{r['plain_over_bare']:.2f}",
               f"**{r['protected_over_bare']:.2f}**", f"{over['protected']:.2f}"]  # fmt: skip
        if split:
            row += [f"{over['checkpoint_only']:.2f}", f"{over['fingerprints_only']:.2f}"]
        rows.append(row)
    losses = "; ".join(
        f"{r['problem']}: bare {r['final_loss']['bare']:.6f}, "
        f"protected {r['final_loss']['protected']:.6f}"
        for r in results
    )
    body = OVERHEAD_TEXT.format(repeats=ctx.settings.overhead_repeats) + _table(header, rows)
    body += f"\n\nFinal losses (the same model and data in both loops): {losses}."
    return Section("overhead", body, {"problems": results}, [_plot_overhead(ctx, results)])


OVERHEAD_TEXT = (
    "Full-batch logistic-regression GD on 4 simulated CPU devices, {repeats} repeats "
    "interleaved (the order of the variants alternates), steps/s from step `warm` (past "
    "step 110: the compilation of the step, the first checkpoint and the first fingerprint "
    "check are excluded) to the last step, median per variant; ratios are medians of "
    "the per-repeat ratios.\n\n"
    "- **bare**: a hand-written jitted `jax.shard_map` + `psum` + optax loop, dispatch "
    "depth 2, nothing else (`bare_loop` in scripts/bench.py).\n"
    "- **plain**: `jaxdml.Trainer.fit()` without the supervisor: batcher, NaN guard (always "
    "on in the step), the step's metrics (batch accuracy, an extra pass over X; gradient and "
    "parameter norms), a metrics row fetched and written per step.\n"
    "- **protected**: the `jaxdml.train` path, supervisor and every protection: async "
    "checkpoint every 100 steps, NaN guard, replica fingerprints every 50 steps, step "
    "watchdog. The full run also times the checkpoints alone and the fingerprints and "
    "watchdog alone, each under the supervisor.\n\n"
)


def _plot_overhead(ctx: Context, results: list[dict]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
    names = {"checkpoint_only": "ckpt\nonly", "fingerprints_only": "fp+wd\nonly"}
    colors = {"bare": "#7f7f7f", "plain": "#1f77b4", "protected": "#d62728"}
    for ax, r in zip(axes[0], results, strict=True):
        kinds = list(r["rates"])
        labels = [names.get(k, k) for k in kinds]
        heights = [r["median_rate"][k] for k in kinds]
        ax.bar(labels, heights, color=[colors.get(k, "#ff7f0e") for k in kinds])
        for i, k in enumerate(kinds):
            ax.scatter([i] * len(r["rates"][k]), r["rates"][k], color="k", s=8, zorder=3)
        ax.set_title(f"{r['problem']}: protected/bare = {r['protected_over_bare']:.2f}", fontsize=9)
        ax.set_ylabel("steps/s")
    return _save(fig, ctx.plot_path("overhead.png"))


# ------------------------------------------------------------------------- checkpoint


def _load_script(name: str):
    """Imports scripts/<name>.py as a module (scripts/ is not a package)."""
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxdml_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def section_checkpoint(ctx: Context) -> Section:
    bc = _load_script("bench_checkpoint")
    s = ctx.settings
    rows, data = [], []
    for size in _progress(s.ckpt_sizes_mb, "checkpoint sizes"):
        state = bc._state(size)
        a_block, a_total = bc._blocking_seconds(state, True, s.ckpt_repeats)
        s_block, s_total = bc._blocking_seconds(state, False, s.ckpt_repeats)
        base, with_ck = [], []
        for _ in range(s.ckpt_repeats):  # interleaved, so drift hits both alike
            base.append(bc._steps_per_second(state, 0, s.ckpt_steps))
            with_ck.append(bc._steps_per_second(state, 10, s.ckpt_steps))
        b, c = _median(base), _median(with_ck)
        data.append(
            {
                "size_mb": size,
                "async_blocked_s": a_block,
                "async_total_s": a_total,
                "sync_blocked_s": s_block,
                "sync_total_s": s_total,
                "steps_per_s_no_ckpt": b,
                "steps_per_s_ckpt_every_10": c,
            }
        )
        rows.append(
            [
                f"{size} MB",
                f"{a_block:.3f}",
                f"{s_block:.3f}",
                f"{a_block / s_block:.2f}",
                f"{a_total:.3f}",
                f"{b:.1f}",
                f"{c:.1f}",
                f"{100 * (b / c - 1):+.1f}%",
            ]
        )
        del state
    body = (
        f"One CPU device, local disk, medians of {s.ckpt_repeats} saves (after one warm-up "
        "save). *Blocked* is the time `Checkpointer.save` holds the training loop; "
        "*committed* is until the async save is on disk. The steady-state columns time a "
        f"jitted update loop of {s.ckpt_steps} steps with an async save every 10 steps vs "
        "none (functions of scripts/bench_checkpoint.py).\n\n"
        + _table(
            [
                "state",
                "async blocked (s)",
                "sync blocked (s)",
                "async/sync",
                "async committed (s)",
                "steps/s no ckpt",
                "steps/s ckpt every 10",
                "overhead",
            ],
            rows,
        )
    )
    return Section("checkpoint", body, {"sizes": data}, [_plot_checkpoint(ctx, data)])


def _plot_checkpoint(ctx: Context, data: list[dict]) -> str:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = np.arange(len(data))
    ax.bar(x - 0.2, [d["async_blocked_s"] for d in data], 0.4, label="async: blocked")
    ax.bar(x + 0.2, [d["sync_blocked_s"] for d in data], 0.4, label="sync: blocked")
    ax.set_xticks(x, [f"{d['size_mb']} MB" for d in data])
    ax.set_yscale("log")
    ax.set_ylabel("seconds the loop waits per save")
    ax.legend(fontsize=8)
    return _save(fig, ctx.plot_path("checkpoint.png"))


# --------------------------------------------------------------------------- recovery

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


def _train_command(steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=configs/seed_logreg.py",
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


def section_recovery(ctx: Context) -> Section:
    from jaxdml import chaos

    s = ctx.settings
    f = int(0.55 * s.recovery_steps) + 3  # not a checkpoint step: a crash loses some steps
    kinds = list(s.recovery_kinds)
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
    rows = [_recovery_row(k, by_kind[k]) for k in kinds]
    host_loss, ok = _run_script_if_present(ctx, "bench_recovery")
    body = (
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
    data = {
        "fault_step": f,
        "reference_wall_s": ref.wall_seconds,
        "outcomes": {k: dataclasses.asdict(o) for k, o in by_kind.items()},
    }
    plots = [_plot_recovery(ctx, kinds, by_kind)]
    return Section("recovery", body, data, plots, failed=not ok)


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


# ---------------------------------------------------------------------------- goodput

GOODPUT_ROTATION = ("device_loss", "sigkill", "nan_burst", "bitflip", "hang")


def goodput_plan(num_steps: int, interval: int, num_devices: int = 4) -> str:
    """A fault every `interval` steps, rotating GOODPUT_ROTATION over the healthy devices.

    A device loss takes the highest healthy device but 0; a bit flip needs 3 healthy
    devices for a majority (else the next kind is used); a kill or hang restarts the
    process on all devices.
    """
    alive = set(range(num_devices))
    entries, i = [], 0
    for step in range(interval, num_steps - interval // 2, interval):
        for _ in range(len(GOODPUT_ROTATION)):
            kind = GOODPUT_ROTATION[i % len(GOODPUT_ROTATION)]
            i += 1
            if kind == "device_loss" and len(alive) > 1:
                dev = max(alive - {0})
                alive.discard(dev)
                entries.append(f"device_loss@{step}:{dev}")
            elif kind == "bitflip" and len(alive) >= 3:
                dev = min(alive - {0})
                alive.discard(dev)
                entries.append(f"bitflip@{step}:{dev}")
            elif kind == "nan_burst":
                entries.append(f"nan@{step}-{step + 2}")
            elif kind in ("sigkill", "hang"):
                alive = set(range(num_devices))
                entries.append(f"{kind}@{step}" + (":0" if kind == "hang" else ""))
            else:
                continue
            break
    return ",".join(entries)


def _goodput_command(steps: int) -> list[str]:
    return [
        *_train_command(steps),
        "--config.checkpoint.every_steps=100",
        "--config.supervisor.fingerprint_every=50",
        "--config.supervisor.watchdog_secs=5",
        "--config.train.log_every=1000000",
    ]


def _goodput_run(workdir: str, steps: int, plan: str, timeout: float) -> dict:
    """Runs the seed config for `steps` with `plan`, restarted until done; its record."""
    from jaxdml import chaos

    crashes = plan.count("sigkill") + plan.count("hang")
    codes, wall = chaos.run_plan(
        _goodput_command(steps), workdir, plan, max_attempts=crashes + 3, timeout=timeout
    )
    events = _read_events(workdir)
    lost_steps, lost_s = chaos.lost_work(events)
    fault_times = _fault_times(events)
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
    return {
        "workdir": workdir,
        "steps": steps,
        "exit_codes": codes,
        "wall_s": wall,
        "completed": codes[-1] == 0 and bool(result),
        "last_attempt_wall_time_s": result.get("wall_time_s"),
        "faults": len(fault_times),
        "fault_times": sorted(fault_times.values()),
        "lost_steps": lost_steps,
        "lost_s": lost_s,
    }


def _steps_per_second(run: dict) -> float:
    """Steps/s of a finished fault-free run, without its first step (compilation)."""
    with open(os.path.join(run["workdir"], "result.json")) as f:
        result = json.load(f)
    return (result["steps"] - 1) / (result["wall_time_s"] - result["step_seconds_max"])


def section_goodput(ctx: Context) -> Section:
    s = ctx.settings
    base = os.path.join(ctx.work, "goodput")
    timeout = 10 * s.goodput_seconds + 120
    bar = _progress(None, "goodput: calibration, fault-free, faulty run", total=3)
    calibration = _goodput_run(
        os.path.join(base, "calibration"), s.goodput_calibration_steps, "", timeout
    )
    bar.update()
    steps = int(_steps_per_second(calibration) * s.goodput_seconds)
    runs = {"without faults": _goodput_run(os.path.join(base, "clean"), steps, "", timeout)}
    bar.update()
    # Faults placed by the fault-free run's own rate land about every goodput_every seconds.
    rate = _steps_per_second(runs["without faults"])
    # At least the intended number of faults, even when the calibration and fault-free
    # runs ran at different speeds (a loaded machine): never space them wider than that.
    wanted = max(2, int(s.goodput_seconds // s.goodput_every))
    interval = min(int(rate * s.goodput_every), steps // (wanted + 1))
    plan = goodput_plan(steps, max(1, interval))
    runs["with faults"] = _goodput_run(os.path.join(base, "faults"), steps, plan, timeout)
    bar.close()
    clean, faulty = runs["without faults"], runs["with faults"]
    goodput = {
        "wall_ratio": clean["wall_s"] / faulty["wall_s"],
        "accounted": accounted_goodput(faulty, 1.0 / rate),
    }
    plot = ctx.plot_path("goodput_run.png")
    from jaxdml.plots import plot_run

    plot_run(faulty["workdir"], out=plot, title=f"goodput run with faults: {plan}")
    body = _goodput_body(s, rate, steps, plan, clean, faulty, goodput)
    data = {"steps_per_s": rate, "steps": steps, "plan": plan, "goodput": goodput, "runs": runs}
    return Section("goodput", body, data, [plot])


def accounted_goodput(run: dict, step_seconds: float) -> float:
    """1 - (seconds the events say were lost + redone steps x step time) / wall time.

    The seconds cover detection, recovery, and each crash until the restarted process
    resumed (its start included); redone steps are those computed again afterwards.
    """
    lost = run["lost_s"] + run["lost_steps"] * step_seconds
    return 1.0 - lost / run["wall_s"]


def _fault_times(events: list[dict]) -> dict[str, float]:
    """{plan entry: time it first fired} (a span like nan@5-7 fires once per step)."""
    times: dict[str, float] = {}
    for e in events:
        if e["kind"] == "fault_injected":
            times.setdefault(e["fault"].split("#")[0], e["time"])
    return times


def _goodput_body(s: Settings, rate, steps, plan, clean, faulty, goodput) -> str:
    rows = []
    for name, r in (("without faults", clean), ("with faults", faulty)):
        rows.append(
            [
                name,
                "yes" if r["completed"] else "**NO**",
                f"{r['wall_s']:.1f}",
                f"{steps / r['wall_s']:.1f}",
                r["faults"],
                len(r["exit_codes"]) - 1,
                r["lost_steps"],
                f"{r['lost_s']:.1f}",
            ]
        )
    times = faulty["fault_times"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    gap = f"{_median(gaps):.1f} s" if gaps else "n/a"
    rotation = ", ".join(GOODPUT_ROTATION)
    header = ["run", "completed", "wall s", "useful steps/s", "faults", "restarts",
              "lost steps", "lost s (events)"]  # fmt: skip
    return (
        "The seed config with protections on (checkpoint every 100 steps, fingerprints every "
        f"50, watchdog 5 s) for {steps} steps, sized to about {s.goodput_seconds:.0f} s by a "
        f"calibration run. The fault-free run then measured {rate:.0f} steps/s (its own wall "
        "time, process start and compilation excluded), from which the faulty run gets a "
        f"fault every ~{s.goodput_every:.0f} s (every {int(rate * s.goodput_every)} steps; "
        f"median gap between injections as measured: {gap}), rotating {rotation}; it is "
        "restarted after each crash like a scheduler would (`jaxdml.chaos.run_plan`). "
        f"Plan: `{plan}`.\n\n"
        f"**Goodput = {goodput['wall_ratio']:.2f}** as fault-free wall time / faulty wall "
        "time (process starts and restarts included), and "
        f"**{goodput['accounted']:.2f}** from the fault accounting: 1 - (seconds lost per "
        "the events + redone steps x the fault-free step time) / faulty wall time. The wall "
        "ratio compares two runs minutes apart, so on a shared machine it carries their "
        "speed difference too; and on simulated CPU devices a mesh that lost devices can run "
        "faster, not slower (the devices share the same cores).\n\n" + _table(header, rows)
    )


# ----------------------------------------------------------------------------- models


def _run_script_if_present(ctx: Context, name: str) -> tuple[str, bool]:
    """Runs scripts/<name>.py; under --quick with its --quick flag, or else with
    --repeats=1 when it has that flag.

    Returns:
      (markdown: the command and its stdout, a failure with its stderr, or 'not available
      yet' when the script does not exist; whether it did not fail).
    """
    path = os.path.join(REPO, "scripts", f"{name}.py")
    if not os.path.exists(path):
        return f"`scripts/{name}.py`: not available yet.", True
    with open(path) as f:
        source = f.read()
    cmd = [sys.executable, path]
    if ctx.quick and '"quick"' in source:
        cmd.append("--quick")
    elif ctx.quick and '"repeats"' in source:
        cmd.append("--repeats=1")
    shown = f"`python {' '.join([f'scripts/{name}.py', *cmd[2:]])}`"
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx.settings.script_timeout
        )
    except subprocess.TimeoutExpired:
        return f"{shown} **timed out** after {ctx.settings.script_timeout:.0f} s.", False
    ctx.shared[name] = {"command": cmd[1:], "returncode": proc.returncode}
    if proc.returncode != 0:
        tail = proc.stderr[-3000:]
        return f"{shown} **failed** (exit {proc.returncode}):\n\n```\n{tail}\n```", False
    return f"{shown}:\n\n{proc.stdout.strip()}", True


def section_models(ctx: Context) -> Section:
    text, ok = _run_script_if_present(ctx, "bench_models")
    return Section("models", text, dict(ctx.shared.get("bench_models", {})), failed=not ok)


# ---------------------------------------------------------------------------- scaling


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux, VmHWM of /proc/self/status:
    ru_maxrss would include the parent's peak, inherited across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _float32_problem(rows: int):
    """A linearly separable-ish problem made directly in float32, so that generating it
    does not set the process's peak memory (make_classification works in float64)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal(FEATURES).astype(np.float32)
    y = (x @ w + rng.standard_normal(rows, dtype=np.float32) > 0).astype(np.int32)
    return x, y


def scaling_point(rows: int, num_devices: int, seconds: float) -> dict:
    """Step time and memory of jaxdml's GD step on `rows` x FEATURES data and
    `num_devices` simulated devices (call in a fresh process: the device count is fixed
    when JAX starts)."""
    import jax

    jax.config.update("jax_num_cpu_devices", num_devices)
    import optax

    from jaxdml.data import GlobalBatcher
    from jaxdml.mesh import make_mesh
    from jaxdml.models.linear import LinearModel
    from jaxdml.training.loop import Loop
    from jaxdml.training.state import init_state
    from jaxdml.training.step import make_gradient_step

    mesh = make_mesh(jax.devices()[:num_devices])
    rss_start = _rss_bytes()  # JAX started, no data yet
    x, y = _float32_problem(rows)
    model, opt = LinearModel(FEATURES, 2), optax.sgd(0.1)
    step = make_gradient_step(model, opt, mesh)
    batcher = GlobalBatcher(x, y, None, 0)

    def run(state, until: int):
        loop = Loop(step, batcher, mesh, until)
        return loop.run(state)

    state = run(init_state(model, opt, 0, mesh), 3)  # compile and place the data
    t0 = time.perf_counter()
    state = run(state, 8)
    n = max(5, int(seconds / max((time.perf_counter() - t0) / 5, 1e-6)))
    t0 = time.perf_counter()
    run(state, 8 + n)
    step_s = (time.perf_counter() - t0) / n
    peak = _peak_rss_bytes()
    return {
        "rows": rows,
        "devices": num_devices,
        "features": FEATURES,
        "steps_timed": n,
        "step_s": step_s,
        "rss_start_bytes": rss_start,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": max(peak - rss_start, 1),
        "x_bytes": int(x.nbytes),
        "x_bytes_per_device": int(x.nbytes) // num_devices,
    }


def _scaling_subprocess(rows: int, devices: int, seconds: float) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker=scaling",
        f"--worker_rows={rows}",
        f"--worker_devices={devices}",
        f"--worker_seconds={seconds}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"scaling point {rows} rows x {devices} devices failed:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loglog_slope(xs, ys) -> float:
    """Slope of log(y) against log(x) (least squares): cost ~ x^slope."""
    import numpy as np

    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def section_scaling(ctx: Context) -> Section:
    s = ctx.settings
    points = [(r, 1) for r in s.scaling_rows]
    points += [(s.scaling_device_rows, d) for d in s.scaling_devices]
    results = {}
    for rows, d in _progress(points, "scaling points"):
        if (rows, d) not in results:
            results[(rows, d)] = _scaling_subprocess(rows, d, s.scaling_seconds)
    by_rows = [results[(r, 1)] for r in s.scaling_rows]
    by_dev = [results[(s.scaling_device_rows, d)] for d in s.scaling_devices]
    slopes = {
        "step_time_vs_rows": loglog_slope(s.scaling_rows, [p["step_s"] for p in by_rows]),
        "memory_growth_vs_rows": loglog_slope(
            s.scaling_rows, [p["rss_growth_bytes"] for p in by_rows]
        ),
        "step_time_vs_devices": loglog_slope(s.scaling_devices, [p["step_s"] for p in by_dev]),
    }
    first, last = by_rows[0], by_rows[-1]
    slopes["memory_per_x_byte"] = (last["rss_growth_bytes"] - first["rss_growth_bytes"]) / (
        last["x_bytes"] - first["x_bytes"]
    )
    body = _scaling_body(s, by_rows, by_dev, slopes)
    data = {"by_rows": by_rows, "by_devices": by_dev, "slopes": slopes}
    return Section("scaling", body, data, [_plot_scaling(ctx, by_rows, by_dev, slopes)])


def _scaling_table(points: list[dict]) -> str:
    mb = 2.0**20
    header = ["rows", "devices", "step ms", "peak RSS MB", "RSS growth MB", "X MB per device"]
    rows = [
        [p["rows"], p["devices"], f"{1e3 * p['step_s']:.2f}", f"{p['peak_rss_bytes'] / mb:.0f}",
         f"{p['rss_growth_bytes'] / mb:.0f}", f"{p['x_bytes_per_device'] / mb:.1f}"]
        for p in points
    ]  # fmt: skip
    return _table(header, rows)


def _scaling_body(s: Settings, by_rows, by_dev, slopes) -> str:
    return (
        f"jaxdml's full-batch GD step (logistic regression, {FEATURES} features, `Loop` with "
        "dispatch depth 2) in a fresh process per point; step time after compilation. Memory: "
        "peak RSS of the process (VmHWM) and its growth over the RSS once JAX "
        "had started, before the data existed (the host copy of X, the gathered batch, the "
        "devices' copy, which on CPU is host memory too, and compilation). Slopes are least "
        "squares of log(cost) on log(size): 1 is linear growth, 0 flat.\n\n"
        f"**vs data size** (1 device): step time ~ rows^{slopes['step_time_vs_rows']:.2f}, "
        f"memory growth ~ rows^{slopes['memory_growth_vs_rows']:.2f} (a fixed part, mostly "
        "compilation, flattens the small sizes; at the margin, from the smallest to the largest "
        f"size, the process grew by {slopes['memory_per_x_byte']:.1f} bytes per byte of X)\n\n"
        f"{_scaling_table(by_rows)}\n\n"
        f"**vs device count** ({s.scaling_device_rows} rows; simulated CPU devices share the "
        f"machine's {os.cpu_count()} cores, so this measures the cost of splitting and "
        "aggregating, not a speed-up): step time ~ "
        f"devices^{slopes['step_time_vs_devices']:.2f}\n\n{_scaling_table(by_dev)}"
    )


def _plot_scaling(ctx: Context, by_rows, by_dev, slopes) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    rows = [p["rows"] for p in by_rows]
    axes[0].loglog(rows, [1e3 * p["step_s"] for p in by_rows], "o-")
    axes[0].set(xlabel="rows", ylabel="step ms",
                title=f"step time vs rows (slope {slopes['step_time_vs_rows']:.2f})")  # fmt: skip
    mb = 2.0**20
    axes[1].loglog(rows, [p["rss_growth_bytes"] / mb for p in by_rows], "o-", label="RSS growth")
    axes[1].loglog(rows, [p["x_bytes"] / mb for p in by_rows], "s--", label="X bytes")
    axes[1].set(xlabel="rows", ylabel="MB",
                title=f"memory vs rows (slope {slopes['memory_growth_vs_rows']:.2f})")  # fmt: skip
    axes[1].legend(fontsize=8)
    devs = [p["devices"] for p in by_dev]
    axes[2].loglog(devs, [1e3 * p["step_s"] for p in by_dev], "o-")
    slope = slopes["step_time_vs_devices"]
    axes[2].set(xlabel="simulated devices", ylabel="step ms",
                title=f"step time vs devices (slope {slope:.2f})")  # fmt: skip
    axes[2].set_xticks(devs, [str(d) for d in devs])
    axes[2].minorticks_off()
    for ax in axes:
        ax.title.set_fontsize(9)
    return _save(fig, ctx.plot_path("scaling.png"))


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------- GPU


def gpu_figures(out: str, any_backend: bool) -> int:
    """GD step time vs the memory-bandwidth floor on the first GPU/TPU; writes
    out/gpu_<device>.md and .json. Returns the exit status (0 also when there is none)."""
    import jax

    backend = jax.default_backend()
    if backend not in ("gpu", "cuda", "rocm", "tpu") and not any_backend:
        print(f"--gpu: no GPU or TPU available (JAX backend: {backend}); nothing measured.")
        return 0
    device = jax.devices()[0]
    small = backend == "cpu"
    bandwidth = _copy_bandwidth(device, 2**24 if small else 2**28)
    rows_list = (20_000, 200_000) if small else (100_000, 1_000_000, 10_000_000, 40_000_000)
    points = [_gpu_step(device, rows, 128, bandwidth) for rows in rows_list]
    name = device.device_kind.replace(" ", "_").replace("/", "_")
    body = _table(
        ["rows", "features", "X GB", "step ms", "floor ms (X / bandwidth)", "step / floor"],
        [
            [
                p["rows"],
                p["features"],
                f"{p['x_bytes'] / 1e9:.3f}",
                f"{1e3 * p['step_s']:.3f}",
                f"{1e3 * p['floor_s']:.3f}",
                f"{p['step_s'] / p['floor_s']:.2f}",
            ]
            for p in points
        ],
    )
    text = (
        f"# GD step vs memory-bandwidth floor: {device.device_kind}\n\n"
        f"`python scripts/bench.py --gpu`, {time.strftime('%Y-%m-%d %H:%M')}, JAX "
        f"{jax.__version__}, backend {backend}, device {device}.\n\n"
        f"Measured copy bandwidth (jitted `a + 1` over {bandwidth['bytes'] / 1e9:.2f} GB, "
        f"read + write counted, median of 10): **{bandwidth['gb_per_s']:.0f} GB/s**.\n\n"
        "The floor is the time to read X once at that bandwidth; the step (jaxdml's "
        "full-batch GD step on one device, float32, median of 20 after warm-up) reads X "
        "for the forward pass and again for the gradient unless XLA fuses them, so a "
        "ratio near 2 is already bandwidth-bound.\n\n" + body + "\n"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"gpu_{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"gpu_{name}.json"), "w") as f:
        json.dump(
            {"device": device.device_kind, "bandwidth": bandwidth, "points": points}, f, indent=2
        )
    print(text)
    return 0


def _copy_bandwidth(device, n: int) -> dict:
    """Device memory bandwidth from a jitted `a + 1` over n float32 (read + write counted),
    its buffer donated so that each call reuses the memory instead of allocating."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    a = f(jax.device_put(jnp.zeros((n,), jnp.float32), device)).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        a = f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    nbytes = 2 * n * 4
    return {"bytes": nbytes, "seconds": _median(times), "gb_per_s": nbytes / _median(times) / 1e9}


def _gpu_step(device, rows: int, features: int, bandwidth: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdml.mesh import data_sharded, make_mesh
    from jaxdml.models.linear import LinearModel
    from jaxdml.training.state import init_state
    from jaxdml.training.step import make_gradient_step

    mesh = make_mesh([device])
    model, opt = LinearModel(features, 2), optax.sgd(0.1)
    step = make_gradient_step(model, opt, mesh, donate=True)
    state = init_state(model, opt, 0, mesh)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    sharded = data_sharded(mesh)
    x = jax.jit(lambda k: jax.random.normal(k, (rows, features)), out_shardings=sharded)(k1)
    y = jax.jit(
        lambda k: jax.random.bernoulli(k, 0.5, (rows,)).astype(jnp.int32), out_shardings=sharded
    )(k2)
    w = jax.device_put(jnp.ones((rows,), jnp.float32), sharded)
    batch = {"x": x, "y": y, "w": w, "pos": {"epoch": jnp.int32(1), "index": jnp.int32(0)}}
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    x_bytes = rows * features * 4
    step_s = _median(times)
    return {
        "rows": rows,
        "features": features,
        "x_bytes": x_bytes,
        "step_s": step_s,
        "floor_s": x_bytes / (bandwidth["gb_per_s"] * 1e9),
    }


# ------------------------------------------------------------------------------ report

RUNNERS: dict[str, Callable[[Context], Section]] = {
    "overhead": section_overhead,
    "checkpoint": section_checkpoint,
    "recovery": section_recovery,
    "goodput": section_goodput,
    "models": section_models,
    "scaling": section_scaling,
}


def _run_section(name: str, ctx: Context) -> Section:
    t0 = time.perf_counter()
    try:
        section = RUNNERS[name](ctx)
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


def _report(sections: list[Section], machine: dict, quick: bool, seconds: float) -> str:
    mode = "reduced sizes: a smoke test, not the reference numbers" if quick else "full sizes"
    load = ", ".join(f"{v:.1f}" for v in machine["load_average_at_start"])
    lines = [
        "# jaxdml benchmarks",
        "",
        f"Generated by `python scripts/bench.py{' --quick' if quick else ''}` ({mode}) on "
        f"{machine['date']}, commit {machine['commit']}: {machine['cpus']} CPUs, "
        f"{machine['platform']}, Python {machine['python']}, JAX {machine['jax']} "
        f"({machine['backend']}); load average at start {load}. Total time {seconds:.0f} s.",
        "",
        "Contents: " + ", ".join(TITLES[s.name] for s in sections) + ".",
    ]
    for s in sections:
        lines += ["", f"## {TITLES[s.name]}", "", s.body.strip()]
        lines += [f"\n![{s.name}]({os.path.basename(p)})" for p in s.plots]
        lines += ["", f"_Section time: {s.data.get('seconds', 0):.0f} s._"]
    return "\n".join(lines) + "\n"


def run_all(out: str, names: list[str], quick: bool, keep_work: bool) -> int:
    """Runs the sections `names`, writes out/benchmarks.md and .json; returns the exit code."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts: in-process sections use 4
    from jaxdml.cli import quiet_library_logs

    quiet_library_logs()
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="jaxdml_bench_")
    ctx = Context(out, work, QUICK if quick else FULL, quick)
    machine = _machine()
    t0 = time.perf_counter()
    sections = [_run_section(n, ctx) for n in _progress(names, "benchmarks")]
    report = _report(sections, machine, quick, time.perf_counter() - t0)
    with open(os.path.join(out, "benchmarks.md"), "w") as f:
        f.write(report)
    raw = {
        "machine": machine,
        "quick": quick,
        "sections": {s.name: {"failed": s.failed, **s.data} for s in sections},
    }
    with open(os.path.join(out, "benchmarks.json"), "w") as f:
        json.dump(raw, f, indent=2, default=str)
    print(report)
    print(f"wrote {out}/benchmarks.md; work folder {work}", file=sys.stderr)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(s.failed for s in sections) else 0


def main(argv: list[str]) -> None:
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if _WORKER.value == "scaling":
        print(json.dumps(scaling_point(_W_ROWS.value, _W_DEVICES.value, _W_SECONDS.value)))
        return
    os.chdir(REPO)  # chaos runs start `python -m experiments.train` from the checkout
    out = os.path.abspath(os.path.join(_START_DIR, _OUT.value))
    if _GPU.value:
        sys.exit(gpu_figures(out, _GPU_ANY.value))
    unknown = sorted(set(_ONLY.value) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    names = [n for n in SECTIONS if n in _ONLY.value]
    sys.exit(run_all(out, names, _QUICK.value, _KEEP.value))


_START_DIR = os.getcwd()

if __name__ == "__main__":
    app.run(main)
