#!/usr/bin/env bash
# Train the project's embedded models with the project's own commands: world data -> teacher from scratch ->
# convert + distil (stage 1) -> fine-tune on 16-frame clips (stage 2, two runs) -> fine-tune on longer clips
# (stage 3) -> evaluate. The defaults are the recipe of the shipped models, except that their stage 3 had a first
# run (1,000 x 32 on 3,000 clips) before this one (docs/results/embedded_models/TRAINING.md has the commands and the
# times on H200s); every size is an environment variable so a CPU smoke run can shrink it.
#
#   WORK=/tmp/w OUT=/tmp/out bash scripts/train_embedded.sh            # full run
#   VIDEOS=64 TEACHER_STEPS=4 DISTILL_STEPS=2 FT_STEPS=2 FT2_STEPS=1 LONG_VIDEOS=8 LONG_STEPS=1 EVAL=0 ... # smoke run
#   TEACHER_INIT=rehyat/assets/teacher STAGES=data,teacher ...       # continue training the shipped teacher
#   TEACHER_DIR=rehyat/assets/teacher STAGES=data,student,eval ...     # a new student of the shipped teacher
#   LONG_INIT=path/to/student STAGES=long ...    # only stage 3, from that student (left as it is) into STUDENT_DIR
set -euo pipefail
WORK=${WORK:-/tmp/rehyat_embedded}
OUT=${OUT:-$WORK/out}
PY=${PY:-python3}
TABLE=${TABLE:-.devcarry/world_text_embeddings.safetensors}   # MiniLM embeddings of every world caption
VIDEOS=${VIDEOS:-16000}
TEACHER_STEPS=${TEACHER_STEPS:-3000}
DISTILL_STEPS=${DISTILL_STEPS:-1500}
FT_STEPS=${FT_STEPS:-2000}
BATCH=${BATCH:-128}                 # global batch of the student fine-tuning
FT_LR=${FT_LR:-5e-4}                # peak learning rate of the student fine-tuning (cosine to 0, FT_WARMUP steps up)
FT_WARMUP=${FT_WARMUP:-100}
FT2_STEPS=${FT2_STEPS:-900}         # a second fine-tuning run from the first one's weights (0: none), fresh schedule
FT2_BATCH=${FT2_BATCH:-256}
FT2_LR=${FT2_LR:-3e-4}
FT2_WARMUP=${FT2_WARMUP:-50}
DISTILL_BATCH=${DISTILL_BATCH:-32}
TEACHER_DIR=${TEACHER_DIR:-$WORK/teacher}  # the teacher the student stages start from (e.g. rehyat/assets/teacher)
STUDENT_DIR=${STUDENT_DIR:-$WORK/student}  # where the fine-tuned student goes (and what eval reads)
EVAL_DIR=${EVAL_DIR:-$WORK/eval}
LONG_FRAMES=${LONG_FRAMES:-64}      # stage 3: clip length of the long-clip fine-tuning (4x the teacher's 16 frames)
LONG_VIDEOS=${LONG_VIDEOS:-6000}
LONG_STEPS=${LONG_STEPS:-1800}      # 0: no long-clip stage
LONG_BATCH=${LONG_BATCH:-64}
LONG_LR=${LONG_LR:-3e-4}
LONG_WARMUP=${LONG_WARMUP:-50}
LONG_INIT=${LONG_INIT:-}            # stage 3 without stage 2 in the same run: the student to start from
TEACHER_BATCH=${TEACHER_BATCH:-512}
TEACHER_LR=${TEACHER_LR:-1e-3}
NPROC=${NPROC:-1}                   # GPUs for the teacher and the fine-tuning (torchrun data parallelism)
TEACHER_INIT=${TEACHER_INIT:-}      # teacher folder to continue from (e.g. rehyat/assets/teacher); empty: from scratch
TEACHER_WARMUP=${TEACHER_WARMUP:-200}
TEACHER_COMPILE=${TEACHER_COMPILE:-0}  # 1: torch.compile the teacher (runs on the CPU; its GPU speed is not measured)
EVAL=${EVAL:-1}
STAGES=${STAGES:-data,teacher,student,eval}  # "student" = distill,finetune,long
for stage in ${STAGES//,/ }; do
  case "$stage" in data|teacher|student|distill|finetune|long|eval) ;;
    *) echo "STAGES: unknown stage '$stage' (expected a comma-separated list of data, teacher, student," \
            "distill, finetune, long, eval)" >&2; exit 2 ;;
  esac
done
for v in VIDEOS TEACHER_STEPS DISTILL_STEPS FT_STEPS BATCH FT_WARMUP FT2_STEPS FT2_BATCH FT2_WARMUP DISTILL_BATCH \
         TEACHER_BATCH NPROC TEACHER_WARMUP LONG_FRAMES LONG_VIDEOS LONG_STEPS LONG_BATCH LONG_WARMUP; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v: expected a whole number >= 0, got '${!v}'" >&2; exit 2; }
done
has() { [[ ",$STAGES," == *",$1,"* ]]; }
has student && STAGES="$STAGES,distill,finetune,long"
if has long && [[ "$LONG_STEPS" -gt 0 ]]; then
  # stage 3 starts from LONG_INIT, or else from the student stage 2 writes into STUDENT_DIR in this same run
  if [[ -n "$LONG_INIT" ]]; then
    [[ -f "$LONG_INIT/transformer/config.json" ]] || {
      echo "LONG_INIT: '$LONG_INIT' is not a model folder (no transformer/config.json)" >&2; exit 2; }
    [[ "$(realpath -m "$LONG_INIT")" != "$(realpath -m "$STUDENT_DIR")" ]] || {
      echo "LONG_INIT and STUDENT_DIR are the same folder ('$STUDENT_DIR'); stage 3 writes STUDENT_DIR" >&2; exit 2; }
  elif ! has finetune; then
    echo "STAGES has 'long' without 'finetune': set LONG_INIT to the student stage 3 starts from" >&2; exit 2
  fi
elif has long; then
  echo "LONG_STEPS is 0: no long-clip stage" >&2
fi
mkdir -p "$WORK" "$OUT"
cli() { $PY -m rehyat.cli "$@"; }
# training commands: torchrun over NPROC GPUs (the global batch and the random draws do not depend on NPROC)
train() { if [[ "$NPROC" -gt 1 ]]; then $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
              -m rehyat.cli "$@"; else cli "$@"; fi; }

if has data; then
  cli world export --format dataset --text-embeddings "$TABLE" --num-videos "$VIDEOS" --frames 16 --height 48 \
      --width 48 --seed 0 --out "$WORK/data" --overwrite
fi
if has teacher; then
  # stage 0: the teacher, a small pixel-space WanTransformer3DModel trained from scratch with flow matching
  # (TEACHER_INIT: more steps on an earlier teacher's weights, fresh optimizer and schedule, so a long run can be
  # spread over several device sessions without carrying optimizer checkpoints)
  if [[ -n "$TEACHER_INIT" ]]; then src=(--model "$TEACHER_INIT");
  else src=(--config configs/world_teacher.json --components-from configs/world_components); fi
  [[ "$TEACHER_COMPILE" == 1 ]] && src+=(--compile)
  train finetune "${src[@]}" --data "$WORK/data" \
      --out "$WORK/teacher" --steps "$TEACHER_STEPS" --batch-size "$TEACHER_BATCH" --lr "$TEACHER_LR" \
      --warmup-steps "$TEACHER_WARMUP" \
      --lr-schedule cosine --min-lr-ratio 0.1 --text-dropout 0.1 --weight-decay 0.01 --no-progress --overwrite
fi
if has distill; then
  # stage 1: convert every block (chunk 4 frames, overlap 1) and distil the feature maps along the teacher's
  # own sampling trajectories, teacher-forced
  cli distill --teacher "$TEACHER_DIR" --data "$WORK/data" --out "$WORK/distilled" --blocks all \
      --chunk-frames 4 --overlap-frames 1 --steps "$DISTILL_STEPS" --sampling-steps 20 --batch-size "$DISTILL_BATCH" \
      --lr 2e-3 --no-progress --overwrite
fi
if has finetune; then
  # stage 2: flow-matching fine-tuning of the whole student on the world data plus the teacher-velocity loss
  train finetune --model "$WORK/distilled" --data "$WORK/data" --teacher "$TEACHER_DIR" --teacher-weight 1.0 \
      --out "$STUDENT_DIR" --steps "$FT_STEPS" --batch-size "$BATCH" --lr "$FT_LR" --warmup-steps "$FT_WARMUP" \
      --lr-schedule cosine --text-dropout 0.1 --no-progress --overwrite
  if [[ "$FT2_STEPS" -gt 0 ]]; then
    # the same loss again from the first run's weights, larger batch, lower peak learning rate
    rm -rf "$STUDENT_DIR.stage1" && mv "$STUDENT_DIR" "$STUDENT_DIR.stage1"
    train finetune --model "$STUDENT_DIR.stage1" --data "$WORK/data" --teacher "$TEACHER_DIR" --teacher-weight 1.0 \
        --out "$STUDENT_DIR" --steps "$FT2_STEPS" --batch-size "$FT2_BATCH" --lr "$FT2_LR" \
        --warmup-steps "$FT2_WARMUP" --lr-schedule cosine --text-dropout 0.1 --no-progress --overwrite
  fi
fi
if has long && [[ "$LONG_STEPS" -gt 0 ]]; then
  # stage 3: the student fine-tuned on world clips LONG_FRAMES long (the world has ground truth at any length),
  # flow matching only: the teacher was trained on 16 frames and fails beyond them; ReHyAt's cost is linear in
  # the length, so these clips cost about LONG_FRAMES/16 times a 16-frame one
  cli world export --format dataset --text-embeddings "$TABLE" --num-videos "$LONG_VIDEOS" --frames "$LONG_FRAMES" \
      --height 48 --width 48 --seed 1 --out "$WORK/data_long" --overwrite
  src=$LONG_INIT
  if [[ -z "$src" ]]; then  # the student stage 2 wrote in this run: kept as STUDENT_DIR.stage2
    src=$STUDENT_DIR.stage2
    rm -rf "$src" && mv "$STUDENT_DIR" "$src"
  fi
  train finetune --model "$src" --data "$WORK/data_long" --out "$STUDENT_DIR" --steps "$LONG_STEPS" \
      --batch-size "$LONG_BATCH" --lr "$LONG_LR" --warmup-steps "$LONG_WARMUP" --lr-schedule cosine \
      --text-dropout 0.1 --no-progress --overwrite
fi
if has eval && [[ "$EVAL" == 1 ]]; then
  cli eval --teacher "$TEACHER_DIR" --student "$STUDENT_DIR" --num-prompts "${EVAL_PROMPTS:-4}" \
      --lengths "${EVAL_LENGTHS:-1,4,16}" --text-embeddings "$TABLE" --out "$EVAL_DIR" --overwrite
fi
# what comes back: the two model folders (without optimizer checkpoints), logs and reports
for m in teacher distilled; do
  [[ -d "$WORK/$m" ]] || continue
  tar -C "$WORK" --exclude="$m/train/checkpoint*" -czf "$OUT/$m.tar.gz" "$m"
done
if [[ -d "$STUDENT_DIR" ]]; then
  tar -C "$(dirname "$STUDENT_DIR")" --exclude="train/checkpoint*" -czf "$OUT/student.tar.gz" "$(basename "$STUDENT_DIR")"
fi
[[ -d "$EVAL_DIR" ]] && cp "$EVAL_DIR/eval.md" "$EVAL_DIR/eval.json" "$OUT/" || true
ls -la "$OUT"
