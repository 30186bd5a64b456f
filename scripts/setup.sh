#!/usr/bin/env bash
# Create .venv (if needed) and install Inferix with its test extra. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a CPU build on machines without CUDA; a torch range the pin does not satisfy would pull
# a multi-GB CUDA wheel instead.
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
echo "Inferix installed in $(pwd)/.venv"
