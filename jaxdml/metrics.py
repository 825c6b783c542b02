"""Run records: metrics.jsonl, events.jsonl, optional TensorBoard, result.json."""

from __future__ import annotations

import atexit
import functools
import json
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    return v


# Numpy values are converted only where json meets one (its `default`): the loop's rows
# hold Python numbers, and a conversion of every value cost a third of a row's encoding.
# One encoder for the process: json.dumps(..., default=) builds a new one per call.
_ENCODER = json.JSONEncoder(default=_jsonable)


def encode_rows(rows: list[dict]) -> str:
    """The rows as JSON lines (a metrics row: ~8 us, most of it the floats' repr)."""
    return "".join(_ENCODER.encode(row) + "\n" for row in rows)


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line (a torn last line is dropped with
    a warning: a killed writer can leave one). No file: no rows."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s: dropping a torn line", path)
    return rows


def last_row_through(path: str, step: float = float("inf")) -> tuple[int, dict | None]:
    """(the byte offset just past it, the row) of the last whole row of a step-ordered
    .jsonl file whose step is at most `step`; (0, None) when there is none. Reads the
    file from its end, only as far back as that row."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return 0, None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = m.rfind(b"\n") + 1  # past the last newline: a torn line is not whole
            while end > 0:
                start = m.rfind(b"\n", 0, end - 1) + 1
                try:
                    row = json.loads(m[start:end])
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    return end, row
                end = start
    return 0, None


class JsonlWriter:
    """Appends one JSON object per line and flushes it, so a killed run loses nothing written."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f = open(path, "a")  # noqa: SIM115 (kept open for the run)

    def write(self, row: dict) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict]) -> None:
        """Appends the rows with one write and one flush."""
        self._f.write(encode_rows(rows))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def rows(self) -> list[dict]:
        return read_jsonl(self.path)


class MetricsWriter(JsonlWriter):
    """metrics.jsonl (one row per step) plus TensorBoard scalars when asked for.

    The rows are written by a thread of their own (`write_rows` encodes them and queues
    the text): the file and TensorBoard stay off the training loop's path. The JSON
    encoding does not: a Python thread holds the GIL while it encodes, and the loop,
    which lets go of the GIL in every step's dispatch and wait, then waits for it to
    come back (measured on a no-op step: 24-30 us per step with the thread encoding,
    14 us encoding in the loop's thread).
    `durable_step` is the newest step whose row is on disk; `accept(step)` says that
    every hook took the rows through `step` without raising (the anomaly guard raises
    on rows it rejects). A checkpoint is sealed only once its step is `through` both
    (jaxdml.checkpoint.Tier.poll): a kill that loses queued rows never leaves a
    checkpoint newer than metrics.jsonl, and a rollback never restores one saved after
    the rows that caused it. `drain()` waits for the queue; reading, truncating and
    closing drain first.
    """

    def __init__(self, workdir: str, tensorboard: bool = False):
        super().__init__(os.path.join(workdir, "metrics.jsonl"))
        self.durable_step = 0
        self.accepted_step = 0
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._writer, name="jaxdml-metrics", daemon=True)
        self._thread.start()
        atexit.register(self.drain)  # a process that never closed its writer keeps its rows
        self._tb = None
        self._tb_dir = os.path.join(workdir, "tb")
        self._restarts = 0
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.warning("tensorboardX not installed: pip install 'jaxdml[tensorboard]'")
            else:
                # tensorboardX's flush() writes only what its writer thread already took
                # from the queue; that thread flushes the file every flush_secs (default
                # 120 s). At 1 s, an event recorded just before a kill or hang is on disk.
                self._writer_class = functools.partial(SummaryWriter, flush_secs=1)
                self._tb = self._writer_class(self._tb_dir)

    @property
    def tensorboard(self):
        """The tensorboardX SummaryWriter (None when TensorBoard is off or not installed)."""
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: a resumed run redoes those steps and logs them again.

        The rows are in step order, one per step, so the file is cut in place just past
        the last whole row at or before `step`, found from the end: a resume costs the
        rows it drops, not the run's length (rewriting the whole file took seconds at a
        few hundred thousand rows). One truncate(2) call: a kill leaves the file either
        whole or cut, never a kept row torn. A torn last line goes with the cut.

        TensorBoard's files are append-only: a new writer with `purge_step=step + 1`
        records a restart there, and TensorBoard discards every earlier event at that
        step or later, so it shows each step once, as metrics.jsonl does.
        """
        self.drain()
        self.durable_step = self.accepted_step = step
        self._f.close()
        end, _ = last_row_through(self.path, step)
        if os.path.exists(self.path):
            os.truncate(self.path, end)
        self._f = open(self.path, "a")  # noqa: SIM115
        if self._tb is not None:
            self._tb.close()
            # Its own file name even within the same second (the name has the time in
            # seconds), sorting after the earlier ones: TensorBoard reads them in order.
            self._restarts += 1
            suffix = f".r{self._restarts:04d}"
            self._tb = self._writer_class(self._tb_dir, purge_step=step + 1, filename_suffix=suffix)

    def write_rows(self, rows: list[dict]) -> None:
        """Queues the rows' JSON lines for the writer thread, with copies of the rows for
        TensorBoard (a later hook may still change its own); a failed write is raised
        here, next."""
        self._raise_failure()
        if not rows:
            return
        tb_rows = [dict(row) for row in rows] if self._tb is not None else []
        self._queue.put((encode_rows(rows), tb_rows, rows[-1].get("step")))

    @property
    def through(self) -> int:
        """The newest step whose rows, and every earlier step's, are accepted and on disk."""
        return min(self.durable_step, self.accepted_step)

    def accept(self, step: int) -> None:
        """Every hook took the rows through `step` (the loop calls this)."""
        self.accepted_step = max(self.accepted_step, step)

    def drain(self) -> None:
        """Waits until every queued row is written."""
        if self._thread.is_alive():
            self._queue.join()
        self._raise_failure()

    def rows(self) -> list[dict]:
        self.drain()
        return super().rows()

    def _writer(self) -> None:
        while (queued := self._queue.get()) is not None:
            try:
                self._write_now(queued)
            except Exception as e:  # noqa: BLE001 -- raised in the loop's thread
                self._error = self._error or e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_now(self, queued: tuple[str, list[dict], int | None]) -> None:
        text, tb_rows, last_step = queued
        self._f.write(text)
        self._f.flush()
        if self._tb is not None:
            for row in tb_rows:
                step = int(row["step"])
                for k, v in row.items():
                    if k not in ("step", "time") and isinstance(v, int | float | np.number):
                        self._tb.add_scalar(k, float(v), step)
        if last_step is not None:
            self.durable_step = int(last_step)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._thread.is_alive():
                self._queue.put(None)
                self._thread.join()
            atexit.unregister(self.drain)
            super().close()
            if self._tb is not None:
                self._tb.close()


class EventLog(JsonlWriter):
    """events.jsonl: one line per fault, recovery or lifecycle event.

    Args:
      workdir: run folder.
      clock: wall clock (injectable for tests).
      tensorboard: a function returning the tensorboardX SummaryWriter to mirror
        events to (the MetricsWriter's `tensorboard`, which a resume replaces), or
        None. Each event becomes a scalar at its step, `faults/<kind>` = 1 for an
        injected fault and `events/<kind>` = seconds lost (0 when none) for the rest,
        plus its JSON line as text under `events`.
    """

    def __init__(self, workdir: str, clock=time.time, tensorboard=None):
        super().__init__(os.path.join(workdir, "events.jsonl"))
        self._clock = clock
        self.tensorboard = tensorboard
        self.listeners: list[Callable[[dict], None]] = []  # each gets every recorded row

    @staticmethod
    def read(workdir: str) -> list[dict]:
        """The events of a workdir, oldest first."""
        return read_jsonl(os.path.join(workdir, "events.jsonl"))

    def record(self, kind: str, step: int, **fields: Any) -> dict:
        row = {"time": self._clock(), "kind": kind, "step": int(step), **fields}
        self.write(row)
        if self.tensorboard is not None and self.tensorboard() is not None:
            self._mirror(row)
        for listener in self.listeners:
            listener(row)
        return row

    def _mirror(self, row: dict) -> None:
        tb, step = self.tensorboard(), row["step"]
        if row["kind"] == "fault_injected":
            tb.add_scalar(f"faults/{row.get('fault_kind', 'unknown')}", 1.0, step)
        else:
            tb.add_scalar(f"events/{row['kind']}", float(row.get("seconds_lost") or 0.0), step)
        tb.add_text("events", json.dumps({k: _jsonable(v) for k, v in row.items()}), step)
        tb.flush()  # events are rare, and a hang or kill may follow at once (see flush_secs)


def write_json(path: str, obj: dict) -> None:
    """Writes `obj` as JSON atomically (temp file + rename): a kill leaves the old file or
    the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: _jsonable(v) for k, v in obj.items()}, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
