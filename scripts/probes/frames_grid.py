"""A PNG of sampled frames, one row per (model, prompt): ``python scripts/probes/frames_grid.py OUT.png FRAMES STRIDE
MODEL[,MODEL...] PROMPT [PROMPT...]`` (seed 0, 20 steps, guidance 4, parallel mode, 40x40 world models, CPU;
frames 0, STRIDE, 2 STRIDE, ... and the last; each frame scaled 3x; a 2-pixel white line between rows)."""
import sys

import numpy as np
import torch
from PIL import Image

from rehyat.pipelines import ReHyAtVideoPipeline

torch.set_num_threads(2)
out, frames, stride, models, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
rows = []
for folder in models.split(","):
    pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=".devcarry/world_text_embeddings.safetensors")
    for p in prompts:
        v = pipe(p, num_frames=frames, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=0,
                 progress=False).video
        picks = sorted(set(range(0, frames, stride)) | {frames - 1})
        rows.append(np.concatenate([v[i] for i in picks], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
        print(folder, p, "done", flush=True)
img = np.concatenate(rows[:-1], axis=0)
Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(out)
