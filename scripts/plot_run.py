"""Plots a run's loss and accuracy with every fault and recovery of events.jsonl marked.

  python scripts/plot_run.py runs/demo/faults                  # -> runs/demo/faults/run.png
  python scripts/plot_run.py runs/demo/faults --out=docs/demo_run.png

Needs matplotlib (pip install 'jaxdml[plots]').
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/run.png).")
_TITLE = flags.DEFINE_string("title", None, "Figure title (default: folder name and result).")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: plot_run.py WORKDIR [--out=FILE.png]")
    from jaxdml.plots import plot_run

    workdir = argv[1]
    out = _OUT.value or os.path.join(workdir, "run.png")
    try:
        plot_run(workdir, out=out, title=_TITLE.value)
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    app.run(main)
