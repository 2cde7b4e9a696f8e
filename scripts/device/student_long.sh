#!/usr/bin/env bash
# Long-clip fine-tuning of the student in $W/student (after student.sh in the same call, or unpacked from
# STUDENT_TAR): flow matching on world clips of LONG_FRAMES frames (the world has ground truth at any length;
# no teacher loss, the teacher was trained at 16 frames), then world checks at 128 frames (both students streamed,
# then the teacher) and at 16 frames (teacher, student before and after, the same prompts and noise). Each stage
# has a time limit; a stage stopped by it is finished from its last checkpoint; the model is packed into $OUT as
# soon as it exists. Env: STUDENT_TAR, TEACHER_TAR (packed folders to unpack into $W first), LONG_FRAMES
# LONG_VIDEOS L_STEPS L_BATCH L_LR L_LIMIT L_TRAINABLE (all or feature_maps) EVAL_PROMPTS EVAL_LIMIT EVAL128_LIMIT
# EVAL128_SEEDS (a limit of 0 skips its checks), L_NAME (the output folder and tarball, default student_long),
# L_FROM (the folder in $W to fine-tune, default student).
source scripts/device/common.sh
LONG_FRAMES=${LONG_FRAMES:-64} LONG_VIDEOS=${LONG_VIDEOS:-3000} L_STEPS=${L_STEPS:-600} L_BATCH=${L_BATCH:-16}
L_LR=${L_LR:-3e-4} L_LIMIT=${L_LIMIT:-120} L_TRAINABLE=${L_TRAINABLE:-feature_maps} L_NAME=${L_NAME:-student_long}
L_FROM=${L_FROM:-student}
EVAL_PROMPTS=${EVAL_PROMPTS:-24} EVAL_LIMIT=${EVAL_LIMIT:-60}
EVAL128_LIMIT=${EVAL128_LIMIT:-120} EVAL128_SEEDS=${EVAL128_SEEDS:-0}
if [ -n "${STUDENT_TAR:-}" ]; then rm -rf "$W/student" && tar -C "$W" -xzf "$STUDENT_TAR"; fi
if [ -n "${TEACHER_TAR:-}" ]; then rm -rf "$W/teacher" && tar -C "$W" -xzf "$TEACHER_TAR"; fi
[ -d "$W/$L_FROM" ] || { echo "no student in $W/$L_FROM (run student.sh first or set STUDENT_TAR)"; exit 2; }
stamp "long data ($LONG_VIDEOS x $LONG_FRAMES frames)"
cli world export --format dataset --text-embeddings "$TABLE" --num-videos "$LONG_VIDEOS" --frames "$LONG_FRAMES" \
    --seed 1 --out "$W/data_long" --overwrite
stamp "long fine-tune"
largs=(--model "$W/$L_FROM" --data "$W/data_long" --batch-size "$L_BATCH" --lr "$L_LR" --warmup-steps 30
       --lr-schedule cosine --text-dropout 0.1 --checkpoint-every 100 --trainable "$L_TRAINABLE")
run_limited finetune "$W/$L_NAME" "$L_LIMIT" "${largs[@]}" --steps "$L_STEPS"
pack "$W/$L_NAME" "$L_NAME"
cp "$W/$L_NAME/train/log.jsonl" "$OUT/${L_NAME}_log.jsonl"
[ "$EVAL128_LIMIT" = 0 ] || { stamp "eval at 128 frames"
timeout "$EVAL128_LIMIT" python3 scripts/device/world_eval.py "$OUT/eval128_long.json" \
    --model "$L_NAME=$W/$L_NAME:streaming" --model "student=$W/student:streaming" \
    --model "teacher=$W/teacher" --prompts 8 --seeds "$EVAL128_SEEDS" --frames 128 \
    || echo "eval at 128 frames stopped"; }
[ "$EVAL_LIMIT" = 0 ] || { stamp "eval at 16 frames"
timeout "$EVAL_LIMIT" python3 scripts/device/world_eval.py "$OUT/eval16_long.json" --model "teacher=$W/teacher" \
    --model "student=$W/student" --model "$L_NAME=$W/$L_NAME" --prompts "$EVAL_PROMPTS" --seeds 0,1 \
    --frames 16 || echo "eval stopped"; }
stamp done
ls -la "$OUT"
