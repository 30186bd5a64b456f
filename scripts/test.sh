#!/usr/bin/env bash
# Set up (plus Chromium and ffmpeg for the browser tests), then run the whole test suite on the CPU.
#   bash scripts/test.sh                 # the pinned set (requirements.lock) in .venv; pytest options pass through
#   bash scripts/test.sh -m "not slow"   # the fast inner loop
#   bash scripts/test.sh --latest        # a fresh .venv-latest with the newest releases pyproject.toml allows
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv latest=0
if [ "${1:-}" = "--latest" ]; then
  shift
  venv=.venv-latest latest=1
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium ffmpeg >/dev/null
  else
    echo "note: chromium/ffmpeg missing and apt-get unavailable; browser tests will fail" >&2
  fi
fi
VENV=$venv LATEST=$latest bash scripts/setup.sh
. "$venv/bin/activate"
if [ "$latest" = 1 ]; then
  python -m pip list --format=freeze 2>/dev/null | grep -viE '^(pip|setuptools|wheel)==' > "$venv/installed.txt"
  echo "newest releases: $venv/installed.txt; differences from requirements.lock:"
  python - "$venv/installed.txt" <<'PY' || true
import re, sys
pin = lambda path: {m[1].lower().replace("_", "-"): m[2].split("+")[0] for m in
                    (re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", l) for l in open(path)) if m}
lock, now = pin("requirements.lock"), pin(sys.argv[1])
for name in sorted(set(lock) | set(now)):
    if lock.get(name) != now.get(name) and name != "inferix":
        print(f"  {name}: {lock.get(name, '-')} -> {now.get(name, '-')}")
PY
fi
# Triton kernels run on the CPU only through the interpreter, switched on before any kernel is decorated.
export TRITON_INTERPRET=1
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
python -m pytest -q "$@"
