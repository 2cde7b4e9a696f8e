"""World checks of one model folder at one length, with the shape check per 16-frame segment (CPU, float32):
``python scripts/probes/checks_by_segment.py FOLDER FIRST N SEED FRAMES MODE TAG [VIDEO_DIR]``; prompts
``caption(sample_scene(10_000 + i))`` for FIRST <= i < FIRST + N (the world_eval ones), one seed, 20 steps,
guidance 4, MODE parallel / recurrent / streaming. One line per video: TAG, prompt index, seed, frames, seconds,
colour / shape / direction / persistence / speed (along the prompted direction, px/frame), the shape score of each
16-frame segment, the prompt. With VIDEO_DIR each video is saved there as TAG_F<frames>_p<i>_s<seed>.npy (uint8).
``THREADS`` sets torch's threads (default 2). Pool the lines with ``scripts/probes/pool_checks.py``."""
import os
import sys
import time

import numpy as np
import torch

from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
TABLE = ".devcarry/world_text_embeddings.safetensors"
folder, first, n, seed, frames, mode, tag = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6], sys.argv[7]
videos = sys.argv[8] if len(sys.argv) > 8 else None
pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE)
for i in range(first, first + n):
    prompt, t0 = caption(sample_scene(10_000 + i)), time.time()
    v = np.asarray(pipe(prompt, num_frames=frames, height=40, width=40, num_inference_steps=20, guidance_scale=4.0,
                        seed=seed, progress=False, mode=mode).video)
    if videos:
        os.makedirs(videos, exist_ok=True)
        np.save(os.path.join(videos, f"{tag}_F{frames}_p{i}_s{seed}.npy"), v)
    c = check_video(v, prompt)
    segs = [check_video(v[s:s + 16], prompt)["shape_correct"] for s in range(0, frames, 16)]
    scores = " ".join(f"{k} {c[k]:.3f}" for k in ("colour_present", "shape_correct", "direction_correct",
                                                  "persistence", "speed"))
    print(tag, i, seed, frames, f"{time.time() - t0:.0f}s", scores, "| seg", " ".join(f"{x:.2f}" for x in segs), "|",
          prompt, flush=True)
