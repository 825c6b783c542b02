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
from typing import Any

from jaxdml.metrics import EventLog

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


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def event_label(event: dict[str, Any]) -> str:
    """A short label for one events.jsonl row: its kind and the seconds it cost.

    Args:
      event: a row of events.jsonl.

    Returns:
      e.g. 'device_loss 0.42 s', 'injected nan', 'resumed'.
    """
    if event["kind"] == "fault_injected":
        return f"injected {event.get('fault_kind', '?')}"
    lost = event.get("seconds_lost")
    return event["kind"] + (f" {lost:.2f} s" if isinstance(lost, int | float) else "")


def _grouped_events(events: list[dict]) -> list[tuple[int, str, str]]:
    """(step, colour, label) per step that has events, labels joined in log order."""
    by_step: dict[int, list[dict]] = collections.defaultdict(list)
    for e in events:
        by_step[int(e["step"])].append(e)
    out = []
    for step in sorted(by_step):
        kinds = [e["kind"] for e in by_step[step]]
        lead = next((k for k in _PRECEDENCE if k in kinds), kinds[0])
        color = EVENT_COLORS.get(lead, "#7f7f7f")
        out.append((step, color, _step_label(by_step[step])))
    return out


def _step_label(events: list[dict]) -> str:
    """The events of one step, an injected fault folded into its detection of the same kind."""
    injected = [e.get("fault_kind") for e in events if e["kind"] == "fault_injected"]
    labels = []
    for e in events:
        if e["kind"] == "fault_injected" and any(o["kind"] == e.get("fault_kind") for o in events):
            continue
        folded = e["kind"] != "fault_injected" and e["kind"] in injected
        labels.append(event_label(e) + (" (injected)" if folded else ""))
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


def _mark_events(axes, grouped: list[tuple[int, str, str]]) -> None:
    for ax in axes:
        for step, color, _ in grouped:
            ax.axvline(step, color=color, lw=1.0, ls="--", alpha=0.8)
    top = axes[0]
    for i, (step, color, label) in enumerate(grouped):
        # Alternate the label's height so that neighbouring events stay readable.
        y = 0.98 if i % 2 == 0 else 0.60
        top.text(step, y, label, transform=top.get_xaxis_transform(), rotation=90,
                 va="top", ha="right", fontsize=7, color=color)  # fmt: skip


def plot_run(workdir: str, out: str | None = None, title: str | None = None):
    """Loss and accuracy curves of a run, with every event of events.jsonl marked.

    Top panel: training loss per step (log scale when it spans decades; skipped and
    set-aside steps are gaps). Bottom panel: batch accuracy per step, plus train/test accuracy where
    `train.eval_every` recorded them and the final test accuracy of result.json.
    Each step with events gets a dashed vertical line coloured by its most severe
    event and labelled with every event's kind and seconds lost.

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
    rows = _read_jsonl(metrics_path)
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
    _mark_events((loss_ax, acc_ax), _grouped_events(events))
    fig.suptitle(title or _title(workdir, result), fontsize=10)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig
