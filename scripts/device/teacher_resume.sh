#!/usr/bin/env bash
# The embedded teacher over several device calls (each at most 10 minutes): the first call exports the world data
# and starts the block-causal teacher; a later call resumes it from $W (machine still warm) or from the checkpoint
# carried back in .devcarry/ckpt/ (split into 15 MB parts, since a file from $OUT is at most 16 MiB). Every call
# returns the checkpoint parts, the log and the packed model; EVAL=1 adds the world checks (48 captions x 2 seeds).
# Env: STEPS (the cosine schedule's length), BATCH, LR, LIMIT (seconds of training in this call), EVAL.
source scripts/device/common.sh
STEPS=${STEPS:-6000} BATCH=${BATCH:-128} LR=${LR:-1e-3} LIMIT=${LIMIT:-420} EVAL=${EVAL:-0}
[ -f "$W/data.done" ] || { stamp data
  cli world export --format dataset --text-embeddings "$TABLE" --num-videos 16000 --frames 16 --seed 0 \
      --out "$W/data" --overwrite && touch "$W/data.done"; }
args=(--config configs/world_teacher.json --components-from configs/world_components --chunk-causal 4 --data "$W/data"
      --batch-size "$BATCH" --lr "$LR" --warmup-steps 200 --lr-schedule cosine --min-lr-ratio 0.1 --text-dropout 0.1
      --weight-decay 0.01 --checkpoint-every 250)
resume=(--overwrite)
if [ ! -f "$W/teacher/train/checkpoint.pt" ] && ls .devcarry/ckpt/checkpoint.part-* >/dev/null 2>&1; then
  stamp "restoring the carried checkpoint"
  mkdir -p "$W/teacher/train" && cat .devcarry/ckpt/checkpoint.part-* > "$W/teacher/train/checkpoint.pt"
  cp .devcarry/ckpt/log.jsonl "$W/teacher/train/log.jsonl"
fi
[ -f "$W/teacher/train/checkpoint.pt" ] && resume=(--resume)
stamp "teacher ${resume[*]}"
timeout -s INT "$LIMIT" python3 -m rehyat.cli finetune "${args[@]}" --out "$W/teacher" --steps "$STEPS" \
    --no-progress "${resume[@]}" || finish_from_checkpoint finetune "$W/teacher" "${args[@]}"
cp "$W/teacher/train/log.jsonl" "$OUT/teacher_log.jsonl"
split -b 15M -d "$W/teacher/train/checkpoint.pt" "$OUT/checkpoint.part-"
pack "$W/teacher" teacher
if [ "$EVAL" = 1 ]; then stamp eval
  timeout 150 python3 scripts/device/world_eval.py "$OUT/teacher_eval.json" --model "teacher=$W/teacher" \
      --prompts 48 --seeds 0,1 --frames 16 || echo "eval failed or timed out"
fi
stamp done
ls -la "$OUT"
