"""World checks with the full-box and the trimmed-box shape classifier on the same videos (CPU, float32).
python eval_both.py OUT.json FOLDER[:MODE] PROMPTS SEEDS FRAMES"""
import json, sys, numpy as np, torch
from rehyat.evaluation.metrics import _generate
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene, summarise
import rehyat.world.checks as C
out, spec, n, seeds, frames = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(s) for s in sys.argv[4].split(",")], int(sys.argv[5])
folder, _, mode = spec.partition(":")
pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=".devcarry/world_text_embeddings.safetensors")
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]
new, old, rows = [], [], []
cls = C.classify_shape
for pr in prompts:
    for s in seeds:
        v = _generate(pipe, pr, frames, 40, 40, 20, 4.0, s, mode or "parallel").video
        new.append(check_video(v, pr))
        C.classify_shape = lambda m, **k: cls(m, trim_quantiles=(0.0,))
        old.append(check_video(v, pr))
        C.classify_shape = cls
        rows.append({"prompt": pr, "seed": s, "shape_new": new[-1]["shape_predicted"], "shape_old": old[-1]["shape_predicted"]})
res = {"model": spec, "frames": frames, "trimmed_box": summarise(new), "full_box": summarise(old), "per_video": rows}
json.dump(res, open(out, "w"), indent=1)
print(spec, frames, {k: round(res["trimmed_box"][k], 3) for k in ("colour_present", "shape_correct", "direction_correct", "persistence")}, "full box shape", round(res["full_box"]["shape_correct"], 3))
