#!/usr/bin/env bash
# The recipe of the shipped toy-world weights, stage by stage (docs/toyworld.md, "How the shipped weights were
# made"). Stages 1-7 have wall-clock budgets in minutes, which SCALE multiplies (SCALE=0.5 halves them); stages
# 8 and 9 are step-based. Each stage starts from the previous stage's EMA weights (--init) and writes its own
# checkpoint folder, so an interrupted stage is continued with `inferix train toyworld --resume OUT/<stage> ...`.
#
#   bash scripts/train_toyworld.sh [OUT_DIR]        # default runs/toyworld_recipe
#   then: cp OUT_DIR/11_corrector/toyworld.{json,safetensors} models/weights/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/toyworld_recipe}
SCALE=${SCALE:-1}
THREADS=${THREADS:-2}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
minutes() { "$PY" -c "print(round($1 * $SCALE, 2))"; }
train() { "$PY" -m inferix.models.toyworld.train --threads "$THREADS" --checkpoint-every 300 "$@"; }

# 1. Teacher forcing from scratch: contiguous 3-block clips (66 min).
train --seed 0 --steps 2000 --batch 4 --max-minutes "$(minutes 66)" --out "$OUT/1_teacher"
# 2. Rollout fine-tuning: half of the batches have the model's own blocks as context (24 min).
train --init "$OUT/1_teacher" --seed 1 --rollout-p 0.5 --rollout-max-blocks 6 --lr 3e-4 --warmup 20 --batch 4 \
      --steps 3000 --max-minutes "$(minutes 24)" --out "$OUT/2_rollout"
# 3. More of the same, more rollouts (20 min).
train --init "$OUT/2_rollout" --seed 2 --rollout-p 0.7 --lr 2e-4 --warmup 20 --batch 4 --steps 3000 \
      --max-minutes "$(minutes 20)" --out "$OUT/3_rollout"
# 4. The engine's cache layout: 2 sink blocks from the episode start + the latest block + the target, with
#    sink rollouts, and 10x loss weight on the agent and the ball (135 min). The bundle it exports says
#    window 16, sink 8.
train --init "$OUT/3_rollout" --seed 3 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.3 --rollout-max-blocks 8 \
      --dynamic-weight 10 --lr 5e-4 --warmup 50 --batch 8 --steps 4000 --max-minutes "$(minutes 135)" \
      --out "$OUT/4_sink"
# 5. More of stage 4 from its EMA weights at a lower peak rate (85 min).
train --init "$OUT/4_sink" --seed 6 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.3 --rollout-max-blocks 8 \
      --dynamic-weight 10 --lr 2e-4 --warmup 50 --batch 8 --steps 3000 --max-minutes "$(minutes 85)" \
      --out "$OUT/5_sink_more"
# 6. One-step training: stage 5 again, with every target block at pure noise (the one step the bundle samples
#    with), from stage 5's EMA weights (62 min).
train --init "$OUT/5_sink_more" --seed 8 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.3 --rollout-max-blocks 8 \
      --dynamic-weight 10 --p-sigma-one 1.0 --lr 2e-4 --warmup 30 --batch 8 --steps 3000 \
      --max-minutes "$(minutes 62)" --out "$OUT/6_one_step"
# 7. More of stage 6 from its EMA weights, new data (seed 9), a lower peak rate (62 min).
train --init "$OUT/6_one_step" --seed 9 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.3 --rollout-max-blocks 8 \
      --dynamic-weight 10 --p-sigma-one 1.0 --lr 1.5e-4 --warmup 30 --batch 8 --steps 3000 \
      --max-minutes "$(minutes 62)" --out "$OUT/7_one_step_more"
# 8 and 9 ran on one GPU (an H200): batch 64, simulator worker processes, two runs side by side. The step counts
#    are those the GPU reached in its time budget (7 and 4.2 min); on 2 CPU cores the same steps would take 9 h
#    or more.
#    GPU_ARGS (default: --workers 7) is added; the device is CUDA when torch sees one.
GPU_ARGS=${GPU_ARGS:---workers 7}
# 8. More of stage 7 with 8x the batch (62,784 clips).
train --init "$OUT/7_one_step_more" --seed 20 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.3 --rollout-max-blocks 8 \
      --dynamic-weight 10 --p-sigma-one 1.0 --lr 1.5e-4 --warmup 30 --batch 64 --steps 981 $GPU_ARGS \
      --out "$OUT/8_batch64"
# 9. From stage 8's bundle: 60 % of the batches on the model's own rollouts, a lower peak rate (35,904 clips).
train --init "$OUT/8_batch64/toyworld.json" --seed 23 --sink-blocks 2 --clip-blocks 4 --rollout-p 0.6 \
      --rollout-max-blocks 8 --dynamic-weight 10 --p-sigma-one 1.0 --lr 1e-4 --warmup 30 --batch 64 --steps 561 \
      $GPU_ARGS --out "$OUT/9_rollouts"
# 10. The pixel refiner: stage 9's DiT unchanged, one denoising step, and a small conv decoder trained on the
#    DiT's own blocks (from true context, and far into its own rollouts with its own sprites as targets) to render
#    them crisp, reading the median of the first 8 frames as a reference image (about 35 min on the CPU;
#    step-based, SCALE does not apply).
"$PY" -m inferix train toyworld-decoder --model "$OUT/9_rollouts/toyworld.json" --denoising-steps 1000 --steps 4500 \
      --reference-frames 8 --seed 1 --threads "$THREADS" --out "$OUT/10_decoder"
# 11. The action corrector: DiT and refiner unchanged; a per-frame conv net that corrects each block's estimate
#    before its commit, distilled from the hv,d,a mirror-view ensemble in two rounds (the second on rollouts that
#    commit the first corrector); about 21 min on the CPU, step-based.
"$PY" -m inferix train toyworld-corrector --model "$OUT/10_decoder/toyworld.json" --episodes 24 --rounds 2 --steps 2000 \
      --threads "$THREADS" --out "$OUT/11_corrector"
echo "done: $OUT/11_corrector/toyworld.json (+ .safetensors)"
