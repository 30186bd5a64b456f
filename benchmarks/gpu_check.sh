#!/usr/bin/env bash
# GPU check for the Triton kernels: native (compiled) kernel tests, then the attention benchmark.
# Installs nothing: torch (CUDA build), triton and pytest must already be importable by `python`.
# Usage: benchmarks/gpu_check.sh [output dir]   (default: $TMPDIR/inferix_gpu_check)
# Runtime: under 10 minutes on one H100 (most of it Triton/Inductor compilation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${TMPDIR:-/tmp}/inferix_gpu_check}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter

python - <<'PY' || { echo "gpu_check: no usable CUDA device" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY

status=0
echo "== 1/8 GPU-marked kernel tests (bf16/fp16/fp32 at Wan shapes, large-pool offsets, model end to end)"
timeout 300 python -m pytest -q tests/kernels -m gpu -rs 2>&1 | tee "$OUT_DIR/pytest_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2/8 the ordinary kernel tests, run natively on the GPU (no interpreter)"
timeout 300 python -m pytest -q tests/kernels -m "not gpu" -rs 2>&1 | tee "$OUT_DIR/pytest_native.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3/8 attention benchmark (Self-Forcing cache shape, bf16): $OUT_DIR/bench_attention.json"
timeout 420 python -m inferix.bench_attention --iters 20 --warmup 5 > "$OUT_DIR/bench_attention.json" \
    2> "$OUT_DIR/bench_attention.log" || status=1
python - "$OUT_DIR/bench_attention.json" <<'PY' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
print(r["flop_formula"])
for row in r["rows"]:
    cells = [f"Lk={row['lk']:>6}"]
    for key in ("triton_paged", "triton_paged_raw_key_rope", "sdpa_flash", "sdpa_flash_incl_gather", "flex"):
        v = row.get(key)
        if v is None:
            continue
        cells.append(f"{key} {v['tflops']:7.1f}" if isinstance(v, dict) else f"{key} {v}")
    print("  ".join(cells))
PY

echo "== 4/8 end-to-end generation, Wan2.1 1.3B shape with random weights, 480x832, 81 frames (JSON)"
timeout 420 python -m inferix.cli bench generate --preset wan2.1-t2v-1.3b --frames 81 \
    > "$OUT_DIR/bench_generate.json" 2> "$OUT_DIR/bench_generate.log" || status=1
python -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('gpu','pixel_fps_including_decode','time_to_first_frame_s','block_latency_p50_s','peak_memory_mib')})" "$OUT_DIR/bench_generate.json" || status=1

echo "== 5/8 the toy world on the GPU: the default (corrector) and three mirror views, 256 frames each (JSON)"
for m in none hv,d,a; do
  args=(--frames 256 --device cuda --out "$OUT_DIR/toyworld_$m.mp4" --profile "$OUT_DIR/toyworld_$m.json")
  [ "$m" = none ] || args+=(--model-option "mirrors=$m" --model-option corrector=off)
  timeout 300 python -m inferix.cli generate "${args[@]}" > "$OUT_DIR/toyworld_$m.log" 2>&1 || status=1
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: r.get(k) for k in ('pixel_fps_including_decode','time_to_first_frame_s','kv_pool_mib','corrector')})" \
    "$OUT_DIR/toyworld_$m.json" "$m" || status=1
done

echo "== 6/8 speed ladder, Wan2.1 1.3B shape, random weights, 480x832, 81 frames: a plain reference loop (dense"
echo "       cache, Self-Forcing semantics) beside the engine eager / + overlapped decode / + compile / + CUDA graphs"
echo "       / + FP8 / + TAEHV, window 15 (JSON: $OUT_DIR/speed_ladder.json)"
timeout 420 python benchmarks/speed_ladder.py --preset wan2.1-t2v-1.3b --frames 81 --window 15 \
    > "$OUT_DIR/speed_ladder.json" 2> "$OUT_DIR/speed_ladder.log" || status=1
python - "$OUT_DIR/speed_ladder.json" <<'PY' || status=1
import json, sys
r = json.load(open(sys.argv[1]))
for name, v in r["rungs"].items():
    print(f"{name:>10}", v.get("error") or {k: round(v[k], 4) for k in ("pixel_fps_including_decode",
          "time_to_first_frame_s", "block_latency_p50_s")})
PY

echo "== 7/8 block latency along a stream (tiny DiT, window 12 + sink 3, 300 blocks) and engine overhead (JSON)"
timeout 240 python -m inferix.cli bench engine --device cuda --blocks 300 > "$OUT_DIR/bench_engine.json" \
    2> "$OUT_DIR/bench_engine.log" || status=1
python -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['block_latency'], r['engine_overhead']['overhead_fraction'])" \
    "$OUT_DIR/bench_engine.json" || status=1

echo "== 8/8 Matrix-Game 2.0 at its released shape (random weights), 352x640, 97 frames, start image + keys (JSON)"
timeout 420 python -m inferix.cli bench generate --preset matrix-game-2.0 --device cuda --attention sdpa --frames 97 \
    > "$OUT_DIR/bench_matrix_game.json" 2> "$OUT_DIR/bench_matrix_game.log" || status=1
python -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('gpu','resolution','pixel_fps_including_decode','time_to_first_frame_s','time_to_first_frame_from_request_s','block_latency_p50_s','peak_memory_mib')})" "$OUT_DIR/bench_matrix_game.json" || status=1

echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) (logs in $OUT_DIR)"
exit $status
