#!/usr/bin/env bash
# Creates .venv if needed, installs jaxdml, and runs the main demo: the seed example
# (logistic regression by distributed full-batch GD on 4 simulated devices).
EXTRAS=datasets
source "$(dirname "$0")/_venv.sh"
workdir=${1:-runs/demo}
rm -rf "$workdir"
python -m experiments.train --config=configs/seed_logreg.py --workdir="$workdir" \
  --config.train.log_every=100
echo "records in $workdir: result.json metrics.jsonl events.jsonl"
