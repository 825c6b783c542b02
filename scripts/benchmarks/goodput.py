"""Goodput under faults: a run with a fault every 30 s for 5 minutes vs the same run without
faults, restarted like a scheduler would (jaxdml.chaos.run_plan)."""

from __future__ import annotations

import functools
import json
import os

from .common import Context, Section, Settings, _median, _progress, _table
from .recovery import _read_events, _train_command

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


def _goodput_command(
    steps: int,
    config: str,
    local_every_steps: int = 100,
    watchdog_secs: float = 5.0,
    steps_per_call: int = 1,
) -> list[str]:
    """The goodput runs' command. `local_every_steps`: the memory tier's step schedule
    (0: the config's own). Every 100 steps, besides the default every 5 s, suits a
    millisecond step (seed_logreg); the persistent tier saves by time (every_secs, 300 s):
    an Orbax save every 100 steps of such a step would cost the loop more than the faults
    (docs/architecture.md). A config with slow steps (wide_mlp) has its own schedule.
    `watchdog_secs`: the hang watchdog's floor; `steps_per_call`: train.steps_per_call."""
    schedule = [f"--config.checkpoint.local_every_steps={local_every_steps}"]
    return [
        *_train_command(steps, config),
        *(schedule if local_every_steps else []),
        "--config.supervisor.fingerprint_every=50",
        f"--config.supervisor.watchdog_secs={watchdog_secs:g}",
        # A hang is max(floor, 4 x the median step) without progress: the default 50x is
        # a minute on a 1-s step (wide_mlp), most of the run's 30 s between faults.
        f"--config.supervisor.watchdog_step_factor={WATCHDOG_STEP_FACTOR:g}",
        f"--config.train.steps_per_call={steps_per_call}",
        "--config.train.log_every=1000000",
    ]


# The goodput runs' hang rule: no progress for max(floor, factor x the median step).
WATCHDOG_STEP_FACTOR = 4.0
WATCHDOG_QUIET_MARGIN = 2.0


def watchdog_floor(calibration: dict) -> float:
    """The goodput runs' hang floor from a fault-free run: twice its longest wait between
    steps outside compiling, restoring and recovering (result.json), at least 1 s.

    Twice, not ten times: the longest wait already holds a fault-free run's worst host
    work (a 205-MB save waits for the steps in flight: 2.4 s on wide_mlp's 0.8-s step),
    so ten times it made wide_mlp's hang cost 24 s each (docs/architecture.md)."""
    return max(1.0, WATCHDOG_QUIET_MARGIN * calibration["watchdog_longest_quiet_s"])


def _goodput_run(
    workdir: str,
    config: str,
    steps: int,
    plan: str,
    timeout: float,
    local_every_steps: int,
    watchdog_secs: float = 5.0,
    steps_per_call: int = 1,
) -> dict:
    """Runs `config` for `steps` with `plan`, restarted until done; its record."""
    from jaxdml import chaos

    crashes = plan.count("sigkill") + plan.count("hang")
    command = _goodput_command(steps, config, local_every_steps, watchdog_secs, steps_per_call)
    codes, wall = chaos.run_plan(command, workdir, plan, max_attempts=crashes + 3, timeout=timeout)
    events = _read_events(workdir)
    lost_steps, lost_s = chaos.lost_work(events)
    fault_times = _fault_times(events)
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115
    from jaxdml import goodput

    return {
        "workdir": workdir,
        "steps": steps,
        "exit_codes": codes,
        "wall_s": wall,
        "completed": codes[-1] == 0 and bool(result),
        "last_attempt_wall_time_s": result.get("wall_time_s"),
        "watchdog_longest_quiet_s": result.get("watchdog_longest_quiet_s"),
        "faults": len(fault_times),
        "fault_times": sorted(fault_times.values()),
        "lost_steps": lost_steps,
        "lost_s": lost_s,
        "job": goodput.summarize(goodput.read(workdir)),  # the job record's categories
    }


def _steps_per_second(run: dict) -> float:
    """Steps/s of a finished fault-free run, without its first step (compilation)."""
    with open(os.path.join(run["workdir"], "result.json")) as f:
        result = json.load(f)
    return (result["steps"] - 1) / (result["wall_time_s"] - result["step_seconds_max"])


def run(ctx: Context) -> Section:
    """The goodput section: calibration, fault-free and faulty runs, a table and the
    faulty run's plot (jaxdml.plots.plot_run)."""
    s = ctx.settings
    base = os.path.join(ctx.work, "goodput")
    timeout = 10 * s.goodput_seconds + 120
    bar = _progress(None, "goodput: calibration, fault-free, faulty run", total=3)
    run_one = functools.partial(
        _goodput_run,
        config=s.goodput_config,
        timeout=timeout,
        local_every_steps=s.goodput_local_every_steps,
        steps_per_call=s.goodput_steps_per_call,
    )
    calibration = run_one(
        os.path.join(base, "calibration"), steps=s.goodput_calibration_steps, plan=""
    )
    bar.update()
    floor = s.goodput_watchdog_secs or watchdog_floor(calibration)
    run_one = functools.partial(run_one, watchdog_secs=floor)
    steps = int(_steps_per_second(calibration) * s.goodput_seconds)
    runs = {"without faults": run_one(os.path.join(base, "clean"), steps=steps, plan="")}
    bar.update()
    # Faults placed by the fault-free run's own rate land about every goodput_every seconds.
    rate = _steps_per_second(runs["without faults"])
    # At least the intended number of faults, even when the calibration and fault-free
    # runs ran at different speeds (a loaded machine): never space them wider than that.
    wanted = max(2, int(s.goodput_seconds // s.goodput_every))
    interval = min(int(rate * s.goodput_every), steps // (wanted + 1))
    plan = goodput_plan(steps, max(1, interval))
    runs["with faults"] = run_one(os.path.join(base, "faults"), steps=steps, plan=plan)
    bar.close()
    clean, faulty = runs["without faults"], runs["with faults"]
    goodput = {
        "wall_ratio": clean["wall_s"] / faulty["wall_s"],
        # The category accounting (goodput.jsonl): 1 - what the faults cost (redone,
        # recovery, down, and the restarts' start-up, restore and compilation) / wall.
        "job_records": 1.0 - faulty["job"]["fault_fraction"],
        "events": accounted_goodput(faulty, 1.0 / rate),
    }
    plot = ctx.plot_path("goodput_run.png")
    from jaxdml.plots import plot_run

    plot_run(faulty["workdir"], out=plot, title=f"goodput run with faults: {plan}")
    bars = ctx.plot_path("goodput_categories.png")
    from jaxdml import goodput as job_goodput

    job_goodput.plot(faulty["job"], bars, title="with faults:")
    body = _goodput_body(s, rate, steps, plan, clean, faulty, goodput, floor, calibration)
    data = {
        "config": s.goodput_config,
        "watchdog_secs": floor,
        "calibration": calibration,
        "steps_per_s": rate,
        "steps": steps,
        "plan": plan,
        "goodput": goodput,
        "runs": runs,
    }
    return Section("goodput", body, data, [plot, bars])


def accounted_goodput(run: dict, step_seconds: float) -> float:
    """1 - (seconds the events say were lost + redone steps x step time) / wall time (the
    events' estimate, before the job records existed; kept for comparison).

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


def _goodput_body(s: Settings, rate, steps, plan, clean, faulty, goodput, floor, calib) -> str:
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
                r["job"]["steps_redone"],
                f"{r['lost_s']:.1f}",
                f"{r['job']['job_goodput']:.3f}",
            ]
        )
    times = faulty["fault_times"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    gap = f"{_median(gaps):.1f} s" if gaps else "n/a"
    rotation = ", ".join(GOODPUT_ROTATION)
    header = ["run", "completed", "wall s", "useful steps/s", "faults", "restarts",
              "steps redone", "lost s (events)", "job goodput"]  # fmt: skip
    categories = _table(
        ["category", "without faults s", "with faults s", "with faults %"],
        [
            [k, f"{clean['job']['seconds'][k]:.2f}", f"{v:.2f}",
             f"{100 * faulty['job']['fractions'][k]:.1f}"]
            for k, v in faulty["job"]["seconds"].items()
        ],
    )  # fmt: skip
    k = s.goodput_local_every_steps
    memory = f"every {k} steps and every 5 s" if k else "on the config's own schedule"
    quiet = calib.get("watchdog_longest_quiet_s")
    why = (
        "set with --set=goodput_watchdog_secs"
        if s.goodput_watchdog_secs
        else f"{WATCHDOG_QUIET_MARGIN:g} x the calibration run's longest wait between steps, "
        f"{1e3 * quiet:.0f} ms, at least 1 s"
    )
    per_call = s.goodput_steps_per_call
    calls = f", {per_call} steps per call (`train.steps_per_call`)" if per_call > 1 else ""
    return (
        f"The `{s.goodput_config}` config with protections on (checkpoint {memory} in the "
        "memory tier, every 300 s in the persistent tier, fingerprints "
        f"every 50 steps, watchdog max({floor:.2g} s, {WATCHDOG_STEP_FACTOR:g} x the median "
        f"step): the floor is "
        f"{why}{calls}) for "
        f"{steps} steps, sized to about {s.goodput_seconds:.0f} s by a "
        f"calibration run. The fault-free run then measured {rate:.3g} steps/s (its own wall "
        "time, process start and compilation excluded), from which the faulty run gets a "
        f"fault every ~{s.goodput_every:.0f} s (every {int(rate * s.goodput_every)} steps; "
        f"median gap between injections as measured: {gap}), rotating {rotation}; it is "
        "restarted after each crash like a scheduler would (`jaxdml.chaos.run_plan`). "
        f"Plan: `{plan}`.\n\n"
        f"**Goodput = {goodput['wall_ratio']:.3f}** as fault-free wall time / faulty wall "
        "time (process starts and restarts included), and "
        f"**{goodput['job_records']:.3f}** from the job records (`jaxdml.goodput`): 1 - "
        f"what the faults cost ({faulty['job']['fault_seconds']:.1f} s: redone steps, "
        "in-process recovery, time down, and the start-up, restore and compilation of the "
        "process lives and loops that followed a fault) / the faulty job's wall time "
        f"({faulty['job']['job_wall_seconds']:.1f} s, first process start to last record). "
        "The job goodput in the table is productive step time / the job's wall time, "
        "faults or not (start-up, compilation and checkpoint blocking are badput too). The "
        "events' older estimate, 1 - (seconds lost per the events + redone steps x the "
        "fault-free step time) / faulty wall time, "
        f"gives {goodput['events']:.3f}. The wall ratio compares two runs minutes apart, so "
        "on a shared machine it carries their speed difference too; and on simulated CPU "
        "devices a mesh that lost devices can run faster, not slower (the devices share the "
        "same cores).\n\n" + _table(header, rows) + "\n\n"
        "Where each job's wall time went (`python -m experiments.goodput WORKDIR`):\n\n"
        + categories
        + _hidden_line(clean["job"], faulty["job"])
    )


def _hidden_line(clean: dict, faulty: dict) -> str:
    """The host work between steps that the steps in flight hid (productive time)."""
    without, with_ = clean.get("hidden_seconds", {}), faulty.get("hidden_seconds", {})
    kinds = sorted({*without, *with_})
    if not kinds:
        return ""
    each = ", ".join(
        f"{k} {without.get(k, 0.0):.1f} s without faults, {with_.get(k, 0.0):.1f} s with them"
        for k in kinds
    )
    return (
        "\n\nHost work between steps that the steps in flight hid (the devices never ran "
        f"dry during it, so it is productive time, in no category): {each}."
    )
