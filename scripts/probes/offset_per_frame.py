"""Where a student's video leaves its teacher's, frame by frame: ``python scripts/probes/offset_per_frame.py TEACHER
STUDENT 8`` (16 frames, the world_eval prompts, seed 0, 20 steps, guidance 4, CPU float32). Prints, per frame, the
mean over videos of the PSNR between the two frames and of the distance (pixels, on the wrapping 40x40 torus)
between the centroids of the prompted object's largest blob in each (frames where either blob is missing are left
out of that frame's mean)."""
import sys

import numpy as np
import torch

from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, sample_scene
from rehyat.world.checks import _as_video, _frame_blobs, _target

torch.set_num_threads(2)
TABLE = ".devcarry/world_text_embeddings.safetensors"
teacher, student, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]


def videos(folder):
    pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE)
    return [pipe(p, num_frames=16, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=0,
                 progress=False).video for p in prompts]


def centroids(video, prompt):
    blobs, _, _ = _frame_blobs(_as_video(video), _target(prompt), min_area=0.01, max_area=0.35, margin=1)
    return [None if b is None else (b["cy"], b["cx"]) for b in blobs]


def torus(a, b, size=40.0):
    d = [abs(x - y) % size for x, y in zip(a, b)]
    return float(np.hypot(*[min(v, size - v) for v in d]))


psnr, dist = [[] for _ in range(16)], [[] for _ in range(16)]
for p, t, s in zip(prompts, videos(teacher), videos(student)):
    for f, (ct, cs) in enumerate(zip(centroids(t, p), centroids(s, p))):
        mse = np.mean((t[f].astype(np.float64) - s[f].astype(np.float64)) ** 2)
        psnr[f].append(100.0 if mse == 0 else min(10 * np.log10(255.0**2 / mse), 100.0))
        if ct is not None and cs is not None:
            dist[f].append(torus(ct, cs))
for f in range(16):
    d = np.mean(dist[f]) if dist[f] else float("nan")
    print(f"frame {f:2d}: PSNR {np.mean(psnr[f]):6.2f} dB, centroid distance {d:5.2f} px ({len(dist[f])} videos)")
