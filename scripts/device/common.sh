# Sourced by the scripts/device/*.sh runs on a lent GPU machine (no diffusers there, nothing downloadable): installs
# the carried diffusers wheel and sets the paths. Carry .whl/ (the wheel) and .devcarry/ (the world caption table).
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# once per machine: a second script in the same call (teacher_resume.sh then student.sh) finds it installed
python3 -c "import diffusers" 2>/dev/null || { python3 -m pip install -q --no-deps .whl/diffusers-*.whl 2>&1 | grep -v -i warning || true; }
TABLE=${TABLE:-.devcarry/world_text_embeddings.safetensors}
OUT=${OUT:-/tmp/out}
W=${W:-/tmp/w}
mkdir -p "$W" "$OUT"
cli() { python3 -m rehyat.cli "$@"; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
# pack a model folder for $OUT without optimizer checkpoints (a model folder is a few MB; a checkpoint is 22 MB)
pack() { tar -C "$(dirname "$1")" --exclude="train/checkpoint*" -czf "$OUT/$2.tar.gz" "$(basename "$1")"; }
# finish a run that was stopped by its time limit from its last checkpoint (no more steps: writes the model folder)
finish_from_checkpoint() {
  local cmd=$1 out=$2; shift 2
  local step
  step=$(python3 -c "import torch,sys; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['step'])" \
         "$out/train/checkpoint.pt")
  stamp "time limit: finishing $out from its checkpoint at step $step"
  cli "$cmd" "$@" --out "$out" --steps "$step" --resume --no-progress
}
# run_limited CMD OUT LIMIT ARGS...: `rehyat CMD ARGS --out OUT` (ARGS hold --steps) stopped by SIGINT after LIMIT
# seconds and then finished from its last checkpoint (the later --steps of the finish wins)
run_limited() {
  local cmd=$1 out=$2 limit=$3; shift 3
  timeout -s INT "$limit" python3 -m rehyat.cli "$cmd" "$@" --out "$out" --no-progress --overwrite \
      || finish_from_checkpoint "$cmd" "$out" "$@"
}
