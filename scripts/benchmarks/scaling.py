"""Scaling: step time and peak memory vs rows and vs simulated device count, one fresh
process per point (`bench.py --worker=scaling` runs `scaling_point`), with log-log slopes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from .common import BENCH, REPO, Context, Section, Settings, _progress, _pyplot, _save, _table

FEATURES = 20  # columns of every generated problem (as in the seed example)


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

    from jaxdml.batcher import GlobalBatcher
    from jaxdml.mesh import make_mesh
    from jaxdml.models.linear import LinearModel
    from jaxdml.training.loop import Loop
    from jaxdml.training.state import init_state
    from jaxdml.training.step import make_gradient_step

    mesh = make_mesh(jax.devices()[:num_devices])
    rss_start = _rss_bytes()  # JAX started, no data yet
    x, y = _float32_problem(rows)
    model, opt = LinearModel(FEATURES, 2), optax.sgd(0.1)
    batcher = GlobalBatcher(x, y, None, 0)
    step = make_gradient_step(model, opt, mesh, batcher.advance)

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
        BENCH,
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


def run(ctx: Context) -> Section:
    """The scaling section: every point of ctx.settings in a fresh process, slopes, tables
    and a plot."""
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
