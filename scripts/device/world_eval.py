"""World checks of one or two model folders on a GPU (or CPU): ``python3 scripts/device/world_eval.py OUT.json
--model NAME=FOLDER[:MODE] ... --prompts 48 --seeds 0,1 --frames 16[,128]``; the same prompts and noise for
every model, and PSNR/SSIM of every model against the first. Prompts: the ``rehyat eval`` ones
(``caption(sample_scene(10_000 + i))``)."""
import argparse
import json
import os
import time

import numpy as np

import torch

from rehyat.evaluation.metrics import _generate, video_similarity
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene, summarise

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--model", action="append", required=True)
p.add_argument("--prompts", type=int, default=48)
p.add_argument("--first-prompt", type=int, default=0, help="index of the first prompt (to split a run over processes)")
p.add_argument("--save-videos", default=None, help="folder: each video as NAME_F<frames>_p<prompt>_s<seed>.npy (uint8)")
p.add_argument("--seeds", default="0,1")
p.add_argument("--frames", default="16")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--guidance", type=float, default=4.0)
p.add_argument("--text-embeddings", default=".devcarry/world_text_embeddings.safetensors")
p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
               help="auto: bf16 on a GPU, fp32 on the CPU; fp32 for PSNR between models (bf16 rounding differs)")
a = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.precision,
                                                              torch.bfloat16 if dev == "cuda" else torch.float32)
prompts = [caption(sample_scene(10_000 + i)) for i in range(a.first_prompt, a.first_prompt + a.prompts)]
seeds = [int(s) for s in a.seeds.split(",")]
rows = []
for frames in [int(f) for f in a.frames.split(",")]:
    first = None
    for spec in a.model:
        name, rest = spec.split("=", 1)
        folder, _, mode = rest.partition(":")
        pipe = ReHyAtVideoPipeline.from_pretrained(folder, torch_dtype=dtype, device=dev,  # eager, as timed before
                                                   text_embeddings=a.text_embeddings, compile="off")
        t0 = time.time()
        runs = [(pr, s, _generate(pipe, pr, frames, 40, 40, a.steps, a.guidance, s, mode or "parallel"))
                for pr in prompts for s in seeds]
        checks = [check_video(r.video, pr) for pr, _, r in runs]
        if a.save_videos:
            os.makedirs(a.save_videos, exist_ok=True)
            for i, (_, s, r) in enumerate(runs):
                stem = f"{name}_F{frames}_p{a.first_prompt + i // len(seeds)}_s{s}"
                np.save(os.path.join(a.save_videos, stem + ".npy"), r.video)
        row = {"model": name, "folder": folder, "mode": mode or "parallel", "frames": frames, "videos": len(runs),
               "seconds": time.time() - t0, **summarise(checks)}
        speeds = [abs(c["mean_velocity"][0]) + abs(c["mean_velocity"][1]) for c in checks]
        row["speed_px_per_frame"] = sum(speeds) / len(speeds)
        if first is None:
            first = runs
        else:
            sims = [video_similarity(r.video, f.video) for (_, _, r), (_, _, f) in zip(runs, first)]
            row["psnr_vs_first"] = sum(s["psnr"] for s in sims) / len(sims)
            row["ssim_vs_first"] = sum(s["ssim"] for s in sims) / len(sims)
        row["per_video"] = [{"prompt": pr, "seed": s, **{k: c[k] for k in ("colour_present", "shape_correct",
                            "direction_correct", "persistence", "shape_predicted", "direction_predicted")}}
                            for (pr, s, _), c in zip(runs, checks)]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "per_video"}, flush=True)
        del pipe
        json.dump({"prompts": prompts, "seeds": seeds, "rows": rows}, open(a.out, "w"), indent=1)
