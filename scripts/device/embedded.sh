#!/usr/bin/env bash
# The embedded models in one device call (one H200): world data, the block-causal teacher from scratch, its ReHyAt
# student (distil, then fine-tune with the teacher-velocity loss), world checks of both. Each stage has a time
# limit; a stage stopped by it is finished from its last checkpoint; every model is packed into $OUT as soon as
# it exists (the student stage is scripts/device/student.sh). Env: T_STEPS T_BATCH T_LIMIT D_STEPS D_BATCH D_LIMIT
# F_STEPS F_BATCH F_LIMIT EVAL_PROMPTS.
source scripts/device/common.sh
T_STEPS=${T_STEPS:-1400} T_BATCH=${T_BATCH:-128} T_LIMIT=${T_LIMIT:-230}
D_STEPS=${D_STEPS:-300} D_BATCH=${D_BATCH:-16} D_LIMIT=${D_LIMIT:-80}
F_STEPS=${F_STEPS:-600} F_BATCH=${F_BATCH:-64} F_LIMIT=${F_LIMIT:-110}
EVAL_PROMPTS=${EVAL_PROMPTS:-32}
stamp data
cli world export --format dataset --text-embeddings "$TABLE" --num-videos 16000 --frames 16 --seed 0 \
    --out "$W/data" --overwrite
stamp teacher
targs=(--config configs/world_teacher.json --components-from configs/world_components --chunk-causal 4 --data "$W/data"
       --batch-size "$T_BATCH" --lr 1e-3 --warmup-steps 100 --lr-schedule cosine --min-lr-ratio 0.1 --text-dropout 0.1
       --weight-decay 0.01 --checkpoint-every 200)
run_limited finetune "$W/teacher" "$T_LIMIT" "${targs[@]}" --steps "$T_STEPS"
cp "$W/teacher/train/log.jsonl" "$OUT/teacher_log.jsonl"; pack "$W/teacher" teacher
D_STEPS=$D_STEPS D_BATCH=$D_BATCH D_LIMIT=$D_LIMIT F_STEPS=$F_STEPS F_BATCH=$F_BATCH F_LIMIT=$F_LIMIT \
    EVAL_PROMPTS=$EVAL_PROMPTS bash scripts/device/student.sh
