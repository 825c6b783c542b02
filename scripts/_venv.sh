# Sourced by demo.sh and test.sh: make .venv (Python >= 3.11) if missing and install EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=".venv/.jaxdml-installed-${EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
