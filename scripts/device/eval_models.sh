#!/usr/bin/env bash
# World checks of model folders on the GPU, split over processes (the tiny models leave the GPU idle; one process
# per model and prompt shard): each NAME=PATH[:MODE] of MODELS is a model folder, or a packed one that is unpacked
# into $W; then for each length of FRAMES run scripts/device/world_eval.py on SHARDS prompt shards of each model at
# once (shards, logs and videos in $W/evals), then merge them (scripts/device/merge_evals.py: $OUT/merged.json and
# its table $OUT/merged.md, PSNR against REFERENCE) and pack for $OUT (at most 8 files come back): evals.tar.gz
# (shards and logs) and videos_F<frames>.tar.gz.
# Env: MODELS (space-separated NAME=PATH[:MODE]; PATH a folder, or a tarball holding one), FRAMES (e.g. "16 128"),
# PROMPTS (per length, default 24), SEEDS (default 0,1), SHARDS (default 4), LIMIT (seconds per length, default
# 200), REFERENCE (default teacher), PRECISION (world_eval.py --precision, default auto: bf16 on the GPU). Videos
# of two models of the same name would overwrite each other.
source scripts/device/common.sh
export OMP_NUM_THREADS=1
PROMPTS=${PROMPTS:-24} SEEDS=${SEEDS:-0,1} SHARDS=${SHARDS:-4} LIMIT=${LIMIT:-200} FRAMES=${FRAMES:-16}
REFERENCE=${REFERENCE:-teacher} PRECISION=${PRECISION:-auto} E=$W/evals
mkdir -p "$E"
specs=()
for m in $MODELS; do
  name=${m%%=*} rest=${m#*=}; path=${rest%%:*}; mode=; [[ $rest == *:* ]] && mode=":${rest#*:}"
  if [ -d "$path" ]; then specs+=("$name=$path$mode"); continue; fi
  rm -rf "${W:?}/$name" && mkdir -p "$W/$name" && tar -C "$W/$name" -xzf "$path"  # no stale folder of a warm machine
  specs+=("$name=$W/$name/$(ls "$W/$name" | head -1)$mode")
done
per=$(( (PROMPTS + SHARDS - 1) / SHARDS ))
for frames in $FRAMES; do stamp "eval at $frames frames: ${specs[*]}"
  for spec in "${specs[@]}"; do for ((s = 0; s < SHARDS; s++)); do
    timeout "$LIMIT" python3 scripts/device/world_eval.py "$E/eval_${spec%%=*}_F${frames}_shard$s.json" \
        --model "$spec" --prompts "$per" --first-prompt $((s * per)) --seeds "$SEEDS" --frames "$frames" \
        --precision "$PRECISION" --save-videos "$E/videos" > "$E/log_${spec%%=*}_F${frames}_shard$s.txt" 2>&1 &
  done; done
  wait; stamp "done at $frames frames"
  (cd "$E/videos" && tar -czf "$OUT/videos_F$frames.tar.gz" ./*_F"$frames"_*.npy)
done
python3 scripts/device/merge_evals.py "$E" --reference "$REFERENCE" --out "$OUT/merged.json" | tee "$OUT/merged.md"
tar -C "$E" -czf "$OUT/evals.tar.gz" --exclude=videos .
ls -la "$OUT"
