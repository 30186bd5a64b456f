#!/usr/bin/env bash
# Set up (plus Chromium and ffmpeg for the browser tests), then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium ffmpeg >/dev/null
  else
    echo "note: chromium/ffmpeg missing and apt-get unavailable; browser tests will fail" >&2
  fi
fi
bash scripts/setup.sh
. .venv/bin/activate
# Triton kernels run on the CPU only through the interpreter, switched on before any kernel is decorated.
export TRITON_INTERPRET=1
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
python -m pytest -q "$@"
