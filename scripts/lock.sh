#!/usr/bin/env bash
# Regenerate requirements.lock, the pinned set that scripts/setup.sh installs, from pyproject.toml's ranges
# (pip-tools' pip-compile, run from a venv of its own in .venv-tools). Existing pins are kept unless asked:
#   bash scripts/lock.sh                      # add what is missing, keep every other pin
#   bash scripts/lock.sh --upgrade            # move every pin to the newest release the ranges allow
#   bash scripts/lock.sh --upgrade-package gradio
# Then run `bash scripts/test.sh` and commit the lock with what it tested.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-tools
if [ ! -x "$tools/bin/pip-compile" ]; then
  "${PYTHON:-python3}" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "pip-tools>=7.4"
fi
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/bin/pip-compile" --quiet --extra test --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml
# pip may resolve torch to a local CPU build (2.13.0+cpu); the lock names the release, which that build satisfies
sed -i -E 's/^torch==([0-9][0-9.]*)\+[A-Za-z0-9.]+/torch==\1/' requirements.lock
echo "wrote requirements.lock ($(grep -cE '^[A-Za-z0-9]' requirements.lock) pinned packages)"
