#!/usr/bin/env bash
# The ReHyAt student of the teacher in $W/teacher (after teacher.sh or teacher_resume.sh in the same call): distil
# every block (chunk 4, OVERLAP_FRAMES overlap frames, default 1; block-causal like its teacher), fine-tune with
# the teacher-velocity loss, world checks of teacher, student and distilled model on the same prompts and noise.
# Each stage has a time limit; a stage stopped by it is finished from its last checkpoint; every model is packed
# into $OUT as soon as it exists.
# Env: D_STEPS D_BATCH D_LIMIT F_STEPS F_BATCH F_LIMIT EVAL_PROMPTS EVAL_LIMIT, FEATURE_MAP_INPUT (rotated, spatial,
# unrotated), MASS_WEIGHT (distill --mass-weight), F_TRAINABLE (finetune --trainable: all or feature_maps),
# F_STEPS=0 stops after distillation, EVAL_LIMIT (seconds for the 16-frame checks; 0 skips them), EVAL128_LIMIT
# (seconds for the 128-frame checks of the streamed student and the teacher, 8 prompts; 0 skips them).
source scripts/device/common.sh
D_STEPS=${D_STEPS:-300} D_BATCH=${D_BATCH:-16} D_LIMIT=${D_LIMIT:-80}
F_STEPS=${F_STEPS:-600} F_BATCH=${F_BATCH:-64} F_LIMIT=${F_LIMIT:-110}
EVAL_PROMPTS=${EVAL_PROMPTS:-32} EVAL_LIMIT=${EVAL_LIMIT:-100} EVAL128_LIMIT=${EVAL128_LIMIT:-0}
FEATURE_MAP_INPUT=${FEATURE_MAP_INPUT:-rotated} MASS_WEIGHT=${MASS_WEIGHT:-0} F_TRAINABLE=${F_TRAINABLE:-all}
OVERLAP_FRAMES=${OVERLAP_FRAMES:-1}
stamp distill
dargs=(--teacher "$W/teacher" --data "$W/data" --blocks all --chunk-frames 4 --overlap-frames "$OVERLAP_FRAMES"
       --softmax-blocks chunk_causal --sampling-steps 20 --batch-size "$D_BATCH" --lr 2e-3 --checkpoint-every 50
       --mass-every 25 --feature-map-input "$FEATURE_MAP_INPUT" --mass-weight "$MASS_WEIGHT")
run_limited distill "$W/distilled" "$D_LIMIT" "${dargs[@]}" --steps "$D_STEPS"
pack "$W/distilled" distilled
cp "$W/distilled"/distill_report.* "$OUT/"
[ "$F_STEPS" != 0 ] || { stamp "done (F_STEPS=0: no fine-tuning)"; exit 0; }
stamp finetune
fargs=(--model "$W/distilled" --data "$W/data" --teacher "$W/teacher" --teacher-weight 1.0 --batch-size "$F_BATCH"
       --lr 5e-4 --warmup-steps 50 --lr-schedule cosine --text-dropout 0.1 --checkpoint-every 100
       --trainable "$F_TRAINABLE")
run_limited finetune "$W/student" "$F_LIMIT" "${fargs[@]}" --steps "$F_STEPS"
pack "$W/student" student
if [ "$EVAL_LIMIT" != 0 ]; then stamp eval
  timeout "$EVAL_LIMIT" python3 scripts/device/world_eval.py "$OUT/eval16.json" --model "teacher=$W/teacher" \
      --model "student=$W/student" --model "distilled=$W/distilled" --prompts "$EVAL_PROMPTS" --seeds 0,1 \
      --frames 16 || echo "eval stopped"
fi
if [ "$EVAL128_LIMIT" != 0 ]; then stamp "eval at 128 frames"
  timeout "$EVAL128_LIMIT" python3 scripts/device/world_eval.py "$OUT/eval128.json" --model "student=$W/student:streaming" \
      --model "teacher=$W/teacher" --prompts 8 --seeds 0 --frames 128 || echo "eval at 128 frames stopped"
fi
cp "$W/student/train/log.jsonl" "$OUT/student_log.jsonl"
stamp done
ls -la "$OUT"
