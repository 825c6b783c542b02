"""What the operator sees of a run: a tqdm progress bar with a steady ETA, one log line
per log period, and one warning line per recovery or skipped update.

The bar is on by default where someone watches (stderr is a terminal, or a Jupyter
kernel) and off elsewhere (a log file, a launcher's pipe, another process than 0), or
with `train.progress=False`. Its rate comes from the rows' finish times after a loop's
first step, so compilation does not spoil the ETA.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from absl import logging
from tqdm import tqdm

from jaxdml.training.hooks import Hook


class _Bar(tqdm):
    """A tqdm bar whose rate (and so its ETA) is the one set from the rows, once known."""

    steady_rate: float | None = None

    @property
    def format_dict(self):
        d = super().format_dict
        if self.steady_rate:
            d["rate"] = self.steady_rate
        return d


def watched(stream: IO) -> bool:
    """True when a person likely watches `stream`: a terminal, or a Jupyter kernel's."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class Progress(Hook):
    """The progress bar, the log lines and the warning lines of a run.

    Args:
      total: the run's last step.
      log_every: one log line every this many steps (loss; test accuracy when evaluated
        in the period; steps/s).
      enabled: False: no bar at all (the log and warning lines stay).
      stream: where the bar goes (default stderr).
      force: draw the bar even when `stream` is not watched (tests).
    """

    def __init__(self, total: int, log_every: int, enabled=True, stream=None, force=False):
        self.total, self.every = total, log_every
        self.stream = stream if stream is not None else sys.stderr
        self.show = enabled and (force or watched(self.stream))
        self.bar: _Bar | None = None
        # (step, finish time) where the bar's and the log line's rates were last measured;
        # a loop's first step (compilation) is never inside a measurement.
        self._ref: tuple[int, float] | None = None
        self._period: tuple[int, float] | None = None
        self._rate: float | None = None  # smoothed steps/s, for the ETA
        self._eval: tuple[int, float] | None = None  # newest (step, test accuracy)
        self._logged = 0  # step of the last log line

    def begin(self, step: int) -> None:
        """A loop starts at `step` (first, after a resume, after a recovery): its first
        step compiles, so the rate is measured again from the one after it."""
        self._ref = self._period = None
        self._logged = step - step % self.every
        if not self.show:
            return
        if self.bar is None:
            # A terminal that reports no size (some containers' ptys) gets 80 x 20: tqdm
            # would draw nothing at width 0 (or height -1).
            sized = _columns(self.stream) > 0
            self.bar = _Bar(total=self.total, initial=step, file=self.stream, unit="step",
                            dynamic_ncols=sized, ncols=None if sized else 80,
                            nrows=None if sized else 20, leave=True)  # fmt: skip
        elif self.bar.n != step:
            self.bar.n = step
            self.bar.refresh()

    def on_metrics(self, rows: list[dict]) -> None:
        if self.show and self.bar is None:
            self.begin(rows[0]["step"] - 1)
        if self._ref is None:  # this loop's first finished step: compilation included
            self._ref = self._period = (rows[0]["step"], rows[0]["time"])
        for row in rows:
            if "test_accuracy" in row:
                self._eval = (row["step"], row["test_accuracy"])
            if row.get("skipped"):
                self.warn(f"step {row['step']}: non-finite update skipped")
            if row["step"] % self.every == 0 or row["step"] == self.total:
                rate = _rate(self._period, row)
                self._period = (row["step"], row["time"])
                self.log(self.line(row, rate))
        rate = _rate(self._ref, rows[-1])
        if rate is not None:
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
            self._ref = (rows[-1]["step"], rows[-1]["time"])
        if self.bar is not None:
            self.bar.steady_rate = self._rate
            self.bar.set_postfix(loss=f"{rows[-1]['loss']:.4g}", refresh=False)
            self.bar.update(rows[-1]["step"] - self.bar.n)

    def line(self, row: dict, rate: float | None = None) -> str:
        """The log line of `row`: step, loss, test accuracy (when evaluated since the
        previous line), steps/s over the period (`rate`)."""
        parts = [f"step {row['step']}/{self.total}", f"loss {row['loss']:.5f}"]
        if self._eval is not None and self._eval[0] > self._logged:
            parts.append(f"test_accuracy {self._eval[1]:.4f}")
        if rate is not None:
            parts.append(f"{rate:.1f} steps/s")
        self._logged = row["step"]
        return "  ".join(parts)

    def on_event(self, event: dict) -> None:
        """An events.jsonl line: a recovery becomes one warning line."""
        if "resumed_at" not in event:  # not a recovery (a skipped update is its row's)
            return
        lost = event.get("seconds_lost")
        text = f"step {event['step']}: {event['kind']}: {event.get('action', 'recovered')}"
        self.warn(text + (f" ({lost:.2f} s lost)" if lost is not None else ""))

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            logging.info("%s", text)

    def warn(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write("warning: " + text, file=self.stream)
        else:
            logging.warning("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _rate(since: tuple[int, float] | None, row: dict) -> float | None:
    """Steps per second from `since` (step, finish time) to `row`; None when no step or
    no time lies between them."""
    if since is None or row["step"] <= since[0] or row["time"] <= since[1]:
        return None
    return (row["step"] - since[0]) / (row["time"] - since[1])


def _columns(stream: IO) -> int:
    """The width of the terminal behind `stream` (0: none, or it reports none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
