"""A job's goodput and badput by category, across all its process lives:
python -m experiments.goodput WORKDIR [--plot=goodput.png]."""

import os
import sys

from absl import app, flags

from jaxdml import goodput

_PLOT = flags.DEFINE_string("plot", None, "Also draw a stacked bar of the categories here.")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.goodput WORKDIR [--plot=FILE]")
    workdir = argv[1]
    records = goodput.read(workdir)
    if not records:
        print(f"{workdir}: no {goodput.FILE} (not a jaxdml run folder?)", file=sys.stderr)
        sys.exit(2)
    summary = goodput.summarize(records)
    print(goodput.table(summary))
    processes = goodput.per_process(workdir)
    if len(processes) > 1:  # a multi-process job: where the processes' times differ
        print("\nper process (process 0's record is the job's):\n")
        print(goodput.process_table(processes))
    if _PLOT.value:
        try:
            goodput.plot(summary, _PLOT.value, title=os.path.basename(os.path.abspath(workdir)))
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'jaxdml[plots]')")
        else:
            print(f"wrote {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
