#!/usr/bin/env bash
# Creates .venv if needed, installs jaxdml, and runs the main demo: the seed example
# (logistic regression by distributed full-batch GD on 4 simulated devices), first
# fault-free, then with injected faults that the supervisor recovers from.
EXTRAS=datasets
source "$(dirname "$0")/_venv.sh"
base=${1:-runs/demo}
rm -rf "$base"
run() {
  python -m experiments.train --config=configs/seed_logreg.py --workdir="$1" \
    --config.train.log_every=100 --config.checkpoint.every_steps=50 \
    --config.supervisor.fingerprint_every=25 "${@:2}" 2>&1 | grep -v "^I"
}
echo "== fault-free =="
run "$base/clean"
echo
echo "== with faults: NaN batch at 60, device 3 lost at 100, bit flip on device 1 at 150,"
echo "   two more devices lost at 220 =="
run "$base/faults" --config.faults="nan@60,device_loss@100:3,bitflip@150:1,device_loss@220:1+2"
echo
echo "records in $base/*/: result.json metrics.jsonl events.jsonl params.npz checkpoints/"
