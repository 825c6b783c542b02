#!/usr/bin/env bash
# Creates .venv if needed, installs jaxdml with its test extras, runs ruff and the whole suite
# on two pytest-xdist workers (a test file per worker: module fixtures are built once).
EXTRAS=test,datasets,tensorboard,plots
source "$(dirname "$0")/_venv.sh"
ruff check .
ruff format --check .
python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
