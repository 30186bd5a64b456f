#!/usr/bin/env bash
# Create .venv (if needed) and install Inferix with its test extra from the pinned set in requirements.lock.
# Safe to run again: it installs only what differs from the lock.
#   LATEST=1 VENV=.venv-latest bash scripts/setup.sh   # a fresh venv with the newest releases pyproject.toml allows
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LATEST=${LATEST:-0}
if [ "$LATEST" = 1 ]; then
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a CPU build on machines without CUDA; a torch range the pin does not satisfy would pull
# a multi-GB CUDA wheel instead.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install --quiet "torch==2.13.0"
if [ "$LATEST" = 1 ]; then
  python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
else
  # the lock and the project's ranges together: pip refuses a lock that pyproject.toml no longer admits
  python -m pip install --quiet -r requirements.lock -e ".[test]"
fi
echo "Inferix installed in $(pwd)/$VENV"
