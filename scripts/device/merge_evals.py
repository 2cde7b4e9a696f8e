"""Merge the shard files of scripts/device/eval_models.sh: ``python scripts/device/merge_evals.py DIR [--reference
teacher] [--out merged.json]``. Per model and length: the world checks over all its videos (the mean over shards,
weighted by videos) and, from the saved videos, PSNR / SSIM against the reference model's video of the same prompt
and seed (``rehyat.evaluation.video_similarity``: the whole video's PSNR). Prints a Markdown table."""
import argparse
import glob
import json
import os
import re

import numpy as np

from rehyat.evaluation import video_similarity

KEYS = ("colour_present", "shape_correct", "direction_correct", "persistence", "flicker", "speed_px_per_frame")

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--reference", default="teacher")
p.add_argument("--out", default=None)
a = p.parse_args()
groups = {}
for f in sorted(glob.glob(os.path.join(a.dir, "eval_*_shard*.json"))):
    for row in json.load(open(f))["rows"]:
        groups.setdefault((row["model"], row["frames"], row["mode"]), []).append(row)
merged = []
for (model, frames, mode), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    n = sum(r["videos"] for r in rows)
    out = {"model": model, "frames": frames, "mode": mode, "videos": n,
           **{k: sum(r[k] * r["videos"] for r in rows) / n for k in KEYS}}
    sims = []
    for path in glob.glob(os.path.join(a.dir, "videos", f"{model}_F{frames}_p*_s*.npy")):
        ref = re.sub(rf"/{re.escape(model)}_F", f"/{a.reference}_F", path)
        if model != a.reference and os.path.exists(ref):
            sims.append(video_similarity(np.load(path), np.load(ref)))
    if sims:
        out["psnr_vs_reference"] = float(np.mean([s["psnr"] for s in sims]))
        out["ssim_vs_reference"] = float(np.mean([s["ssim"] for s in sims]))
        out["paired_videos"] = len(sims)
    merged.append(out)
cols = ["model", "frames", "mode", "videos", *KEYS, "psnr_vs_reference", "ssim_vs_reference"]
print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
for r in merged:
    print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
if a.out:
    json.dump({"reference": a.reference, "rows": merged}, open(a.out, "w"), indent=1)
