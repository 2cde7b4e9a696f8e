"""World checks of several model folders at one length, on the CPU: ``python scripts/probes/checks_at_length.py
FRAMES N SEED MODEL[,MODEL...] [FIRST]`` (the world_eval prompts ``caption(sample_scene(10_000 + i))`` for
FIRST <= i < FIRST + N, FIRST default 0; one seed, 20 steps, guidance 4, parallel mode, float32; the first model
is the reference of PSNR). Prints one line per model: colour, shape, direction, persistence, speed (px/frame) and
PSNR of the whole video against the first."""
import sys

import numpy as np
import torch

from rehyat.evaluation import video_similarity
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene, summarise

torch.set_num_threads(2)
TABLE = ".devcarry/world_text_embeddings.safetensors"
frames, n, seed, models = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
prompts = [caption(sample_scene(10_000 + i)) for i in range(first, first + n)]
ref = None
for folder in models:
    pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE)
    vids = [pipe(p, num_frames=frames, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=seed,
                 progress=False).video for p in prompts]
    checks = [check_video(v, p) for v, p in zip(vids, prompts)]
    s = summarise(checks)
    speed = np.mean([abs(c["mean_velocity"][0]) + abs(c["mean_velocity"][1]) for c in checks])
    psnr = "" if ref is None else np.mean([video_similarity(v, r)["psnr"] for v, r in zip(vids, ref)])
    psnr = "" if ref is None else f", PSNR vs {models[0]} {psnr:.1f} dB"
    ref = vids if ref is None else ref
    print(f"{folder} at {frames} frames: " + ", ".join(f"{k} {float(s[k]):.3f}" for k in
          ("colour_present", "shape_correct", "direction_correct", "persistence")) + f", speed {speed:.2f}{psnr}",
          flush=True)
