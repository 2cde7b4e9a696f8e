#!/usr/bin/env bash
# The student of a teacher carried to the device as a packed model folder (default .devcarry/teacher.tar.gz, as
# teacher_resume.sh returns it): unpack it into $W/teacher, export the world data it was trained on (16,000 videos
# of 16 frames, seed 0), then scripts/device/student.sh (its env settings apply). Env: TEACHER_TAR.
source scripts/device/common.sh
TEACHER_TAR=${TEACHER_TAR:-.devcarry/teacher.tar.gz}
[ -f "$TEACHER_TAR" ] || { echo "no packed teacher at $TEACHER_TAR"; exit 2; }
rm -rf "$W/teacher" && tar -C "$W" -xzf "$TEACHER_TAR"
[ -f "$W/data.done" ] || { stamp data
  cli world export --format dataset --text-embeddings "$TABLE" --num-videos 16000 --frames 16 --seed 0 \
      --out "$W/data" --overwrite && touch "$W/data.done"; }
bash scripts/device/student.sh
