"""Plots of a run: loss and accuracy curves with every fault and recovery marked.

Needs matplotlib (`pip install 'jaxdml[plots]'`); it is imported only when a plot
is made. The figures are built with matplotlib's object API (no pyplot), so they
render without a display and do not disturb a notebook's backend.

  fig = jaxdml.plots.plot_run("runs/demo/faults", out="demo.png")
"""

from __future__ import annotations

import collections
import json
import math
import os

from jaxdml.metrics import EventLog, read_jsonl

# Line colour per event kind; anything else (lifecycle events) is grey.
EVENT_COLORS = {
    "fault_injected": "#7f7f7f",
    "device_loss": "#d62728",
    "host_loss": "#d62728",
    "nan": "#ff7f0e",
    "loss_spike": "#ff7f0e",
    "rollback": "#9467bd",
    "sdc": "#8c564b",
    "hang": "#e377c2",
    "preemption": "#17becf",
    "resumed": "#2ca02c",
    "gave_up": "#000000",
}
# When several events share a step, the line takes the colour of the first of these.
_PRECEDENCE = ("gave_up", "hang", "device_loss", "host_loss", "sdc", "rollback", "nan",
               "loss_spike", "preemption", "resumed")  # fmt: skip


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "jaxdml.plots needs matplotlib: pip install 'jaxdml[plots]' "
            f"(or pip install matplotlib) ({e})"
        ) from e
    return Figure


def _lead_color(events: list[dict]) -> str:
    kinds = [e["kind"] for e in events]
    return EVENT_COLORS.get(next((k for k in _PRECEDENCE if k in kinds), kinds[0]), "#7f7f7f")


def _clusters(events: list[dict], gap: float) -> list[list[dict]]:
    """Events in step order, split where the next one is more than `gap` steps after the
    first of its cluster (their labels would overlap)."""
    clusters: list[list[dict]] = []
    for e in sorted(events, key=lambda e: int(e["step"])):
        if clusters and int(e["step"]) - int(clusters[-1][0]["step"]) <= gap:
            clusters[-1].append(e)
        else:
            clusters.append([e])
    return clusters


def cluster_label(events: list[dict]) -> str:
    """One label for events close together: each kind once, with its count and the seconds
    it lost; an injected fault is folded into the detection of the same kind.

    Args:
      events: rows of events.jsonl.

    Returns:
      e.g. 'device_loss 0.42 s (injected)', 'injected bitflip / sdc 0.69 s', 'nan x3 0.01 s'.
    """
    injected = {e.get("fault_kind") for e in events if e["kind"] == "fault_injected"}
    detected = {e["kind"] for e in events if e["kind"] != "fault_injected"}
    parts: dict[str, list] = {}  # label key -> [count, seconds lost or None]
    for e in events:
        if e["kind"] == "fault_injected":
            if e.get("fault_kind") in detected:
                continue
            key = f"injected {e.get('fault_kind', '?')}"
        else:
            key = e["kind"]
        part = parts.setdefault(key, [0, None])
        part[0] += 1
        if isinstance(e.get("seconds_lost"), int | float):
            part[1] = (part[1] or 0.0) + e["seconds_lost"]
    labels = []
    for key, (n, seconds) in parts.items():
        text = (
            key + (f" x{n}" if n > 1 else "") + (f" {seconds:.2f} s" if seconds is not None else "")
        )
        labels.append(text + (" (injected)" if key in injected else ""))
    return " / ".join(labels)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _title(workdir: str, result: dict) -> str:
    title = os.path.basename(os.path.normpath(workdir))
    parts = [f"{k}={result[k]}" for k in ("steps", "num_devices") if k in result]
    for k in ("test_accuracy", "goodput"):
        if isinstance(result.get(k), int | float):
            parts.append(f"{k}={result[k]:.4f}")
    return f"{title}  ({', '.join(parts)})" if parts else title


def _mark_events(axes, events: list[dict], last_step: int) -> None:
    by_step: dict[int, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_step[int(e["step"])].append(e)
    for ax in axes:
        for step, at_step in by_step.items():
            ax.axvline(step, color=_lead_color(at_step), lw=1.0, ls="--", alpha=0.8)
    top = axes[0]
    for i, cluster in enumerate(_clusters(events, gap=0.01 * max(last_step, 1))):
        # Alternate top and bottom, so that neighbouring clusters' labels do not overlap.
        y, va = (0.98, "top") if i % 2 == 0 else (0.02, "bottom")
        top.text(int(cluster[0]["step"]), y, cluster_label(cluster), rotation=90, va=va,
                 ha="right", fontsize=7, color=_lead_color(cluster),
                 transform=top.get_xaxis_transform())  # fmt: skip


def plot_run(workdir: str, out: str | None = None, title: str | None = None):
    """Loss and accuracy curves of a run, with every event of events.jsonl marked.

    Top panel: training loss per step (log scale when it spans decades; skipped and
    set-aside steps are gaps). Bottom panel: batch accuracy per step, plus train/test accuracy where
    `train.eval_every` recorded them and the final test accuracy of result.json.
    Each step with events gets a dashed vertical line coloured by its most severe
    event; events within 1% of the run's steps share one label naming each kind, its
    count and the seconds it lost.

    Args:
      workdir: a run folder (metrics.jsonl, events.jsonl, optional result.json).
      out: write the figure to this PNG path (folders are created).
      title: figure title (default: the folder name and the result's headline).

    Returns:
      The matplotlib Figure.

    Raises:
      ImportError: matplotlib is not installed (install the 'plots' extra).
      FileNotFoundError: the folder has no metrics.jsonl.
    """
    figure_class = _figure_class()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{metrics_path}: no such file (is {workdir} a run folder?)")
    rows = read_jsonl(metrics_path)
    events = EventLog.read(workdir)
    result_path = os.path.join(workdir, "result.json")
    result = json.load(open(result_path)) if os.path.exists(result_path) else {}  # noqa: SIM115

    fig = figure_class(figsize=(10, 6.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    loss_ax.plot(*_series(rows, "loss"), lw=1.2, color="#1f77b4", label="loss")
    finite = [v for v in _series(rows, "loss")[1] if math.isfinite(v) and v > 0]
    if finite and max(finite) > 20 * min(finite):
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("training loss")
    acc_ax.plot(*_series(rows, "batch_accuracy"), lw=1.2, color="#1f77b4", label="batch accuracy")
    for key, marker in (("train_accuracy", "o"), ("test_accuracy", "s")):
        steps, values = _series(rows, key)
        if steps:
            acc_ax.plot(steps, values, marker=marker, ms=3, lw=0.8, label=key.replace("_", " "))
    if isinstance(result.get("test_accuracy"), int | float):
        acc_ax.axhline(result["test_accuracy"], color="#2ca02c", lw=0.8, ls=":",
                       label=f"final test accuracy {result['test_accuracy']:.4f}")  # fmt: skip
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_xlabel("step")
    acc_ax.legend(loc="lower right", fontsize=8)
    _mark_events((loss_ax, acc_ax), events, max((r["step"] for r in rows), default=1))
    fig.suptitle(title or _title(workdir, result), fontsize=10)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig
