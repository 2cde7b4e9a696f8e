#!/usr/bin/env bash
# The embedded teacher on one H200 (device call 1): world data, the block-causal teacher from scratch, its world
# checks. Env: STEPS, BATCH, LR, LIMIT (seconds of training before it is stopped and finished from its checkpoint).
source scripts/device/common.sh
STEPS=${STEPS:-1800} BATCH=${BATCH:-256} LR=${LR:-1e-3} LIMIT=${LIMIT:-420} VIDEOS=${VIDEOS:-16000}
stamp data
cli world export --format dataset --text-embeddings "$TABLE" --num-videos "$VIDEOS" --frames 16 --seed 0 \
    --out "$W/data" --overwrite
stamp teacher
args=(--data "$W/data" --batch-size "$BATCH" --lr "$LR" --warmup-steps 200 --lr-schedule cosine --min-lr-ratio 0.1
      --text-dropout 0.1 --weight-decay 0.01 --checkpoint-every 200)
timeout -s INT "$LIMIT" python3 -m rehyat.cli finetune --config configs/world_teacher.json \
    --components-from configs/world_components --chunk-causal 4 --out "$W/teacher" --steps "$STEPS" "${args[@]}" \
    --no-progress --overwrite || finish_from_checkpoint finetune "$W/teacher" --config configs/world_teacher.json \
    --components-from configs/world_components --chunk-causal 4 "${args[@]}"
cp "$W/teacher/train/log.jsonl" "$OUT/teacher_log.jsonl"
pack "$W/teacher" teacher
stamp eval
timeout 150 python3 scripts/device/world_eval.py "$OUT/teacher_eval.json" --model "teacher=$W/teacher" \
    --prompts 48 --seeds 0,1 --frames 16 || echo "eval failed or timed out"
stamp done
ls -la "$OUT"
