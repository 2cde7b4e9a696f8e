#!/usr/bin/env bash
# Several students of the carried teacher at once on one GPU (the tiny models leave it mostly idle; one process
# per run): distillations side by side, then fine-tunings of them side by side, then world checks of the teacher and
# every student at 16 frames (the same prompts and noise, fp32 so that PSNR compares models, not bf16 rounding),
# PSNR against the teacher; the best RETURN students by PSNR come back packed, with the logs and checks in
# sweep.tar.gz. Every run has a time limit; a run stopped by it is finished from its last checkpoint.
# Env:
#   TEACHER_TAR  packed teacher folder (default .devcarry/teacher.tar.gz)
#   DISTILLS     space-separated NAME:OVERLAP_FRAMES:BLOCKS[:BLOCK_OVERLAPS] (BLOCKS "all" or "1,3,4"; other blocks
#                become chunk-causal softmax; BLOCK_OVERLAPS e.g. "0=12,2=12,5=12", distill --block-overlap-frames);
#                all at chunk 4, spatial feature-map inputs, --mass-weight 1
#   VARIANTS     space-separated NAME:DISTILL:SOURCE:TRAINABLE; SOURCE "data" (flow matching plus the teacher's
#                velocity on the exported 16-frame clips) or "traj" (the teacher's velocity along its own sampling
#                trajectories of the world captions); TRAINABLE "feature_maps" or "all"
#   D_STEPS D_BATCH D_LIMIT F_STEPS F_BATCH F_LIMIT EVAL_PROMPTS EVAL_LIMIT RETURN, DATA_VIDEOS (default 16000)
source scripts/device/common.sh
export OMP_NUM_THREADS=2
TEACHER_TAR=${TEACHER_TAR:-.devcarry/teacher.tar.gz}
D_STEPS=${D_STEPS:-300} D_BATCH=${D_BATCH:-16} D_LIMIT=${D_LIMIT:-120}
F_STEPS=${F_STEPS:-600} F_BATCH=${F_BATCH:-64} F_LIMIT=${F_LIMIT:-180}
EVAL_PROMPTS=${EVAL_PROMPTS:-24} EVAL_LIMIT=${EVAL_LIMIT:-120} RETURN=${RETURN:-3}
DATA_VIDEOS=${DATA_VIDEOS:-16000}
S=$W/sweep
mkdir -p "$S/logs" "$S/evals" "$S/reports"
rm -rf "$W/teacher" && tar -C "$W" -xzf "$TEACHER_TAR"
[ -f "$W/data.done" ] || { stamp data
  cli world export --format dataset --text-embeddings "$TABLE" --num-videos "$DATA_VIDEOS" --frames 16 --seed 0 \
      --out "$W/data" --overwrite > "$S/logs/data.txt" 2>&1 && touch "$W/data.done"; }

stamp "distill: $DISTILLS"
for d in $DISTILLS; do IFS=: read -r name overlap blocks per_block <<< "$d"
  extra=(); [ -z "$per_block" ] || extra=(--block-overlap-frames "$per_block")
  run_limited distill "$S/$name" "$D_LIMIT" --teacher "$W/teacher" --data "$W/data" --blocks "$blocks" \
      --chunk-frames 4 --overlap-frames "$overlap" --softmax-blocks chunk_causal --sampling-steps 20 \
      --batch-size "$D_BATCH" --lr 2e-3 --checkpoint-every 50 --mass-every 25 --feature-map-input spatial \
      --mass-weight 1 --steps "$D_STEPS" "${extra[@]}" > "$S/logs/distill_$name.txt" 2>&1 &
done
wait

stamp "finetune: $VARIANTS"
names=()
for v in $VARIANTS; do IFS=: read -r name from source trainable <<< "$v"
  names+=("$name")
  if [ "$source" = data ]; then src=(--data "$W/data" --teacher-weight 1.0 --text-dropout 0.1)
  else src=(--text-embeddings "$TABLE" --sampling-steps 20 --frames 16 --height 40 --width 40); fi
  run_limited finetune "$S/$name" "$F_LIMIT" --model "$S/$from" --teacher "$W/teacher" "${src[@]}" \
      --batch-size "$F_BATCH" --lr 5e-4 --warmup-steps 50 --lr-schedule cosine --checkpoint-every 50 \
      --trainable "$trainable" --steps "$F_STEPS" > "$S/logs/finetune_$name.txt" 2>&1 &
done
wait

stamp "eval at 16 frames"
models="teacher=$W/teacher"; for m in "${names[@]}"; do models+=" $m=$S/$m"; done
MODELS=$models FRAMES=16 PROMPTS=$EVAL_PROMPTS SHARDS=2 LIMIT=$EVAL_LIMIT PRECISION=fp32 W=$S OUT=$S/checks \
    bash scripts/device/eval_models.sh > "$S/logs/eval.txt" 2>&1
cp "$S/checks/merged.json" "$S/checks/merged.md" "$S/" && cat "$S/merged.md"

stamp pack
best=$(python3 -c "import json,sys; rows=[r for r in json.load(open(sys.argv[1]))['rows'] if 'psnr_vs_reference' in r]
print(' '.join(r['model'] for r in sorted(rows, key=lambda r: -r['psnr_vs_reference'])[:int(sys.argv[2])]))" \
    "$S/merged.json" "$RETURN")
for m in $best; do pack "$S/$m" "$m"; done
for d in "$S"/*/; do for f in distill_report.json distill_report.md train/log.jsonl; do
  [ -f "$d$f" ] && mkdir -p "$S/reports/$(basename "$d")" && cp "$d$f" "$S/reports/$(basename "$d")/"; done; done
tar -C "$S" -czf "$OUT/sweep.tar.gz" logs reports merged.json merged.md --exclude=videos evals
stamp done
ls -la "$OUT"
