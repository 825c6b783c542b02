#!/usr/bin/env bash
# Creates .venv if needed, installs jaxdml with its test extras, runs ruff and the whole suite.
EXTRAS=test,datasets,tensorboard,plots
source "$(dirname "$0")/_venv.sh"
ruff check .
ruff format --check .
python -m pytest -q --durations=25 "$@"
