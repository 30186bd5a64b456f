#!/usr/bin/env bash
# Set up, then make a video with the embedded default model (the trained toy world): video.mp4 + profile JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
inferix generate --prompt "${PROMPT:-a sunny meadow}" --frames "${FRAMES:-128}" --out "${OUT:-video.mp4}" --profile "$@"
