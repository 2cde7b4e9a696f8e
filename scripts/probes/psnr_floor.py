"""How far apart two near-identical models sample from the same noise: the teacher against itself with every weight
multiplied by (1 + eps * N(0, 1)), PSNR of the whole video (rehyat.evaluation.video_similarity) per eps, 16 frames,
the world_eval prompts, 20 steps, guidance 4, CPU float32. ``python scripts/probes/psnr_floor.py TEACHER 8
1e-4,1e-3,1e-2 [STUDENT]`` (with STUDENT: its PSNR on the same prompts too)."""
import sys

import numpy as np
import torch

from rehyat.evaluation import video_similarity
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, sample_scene

torch.set_num_threads(2)
TABLE = ".devcarry/world_text_embeddings.safetensors"
folder, n, epss = sys.argv[1], int(sys.argv[2]), [float(e) for e in sys.argv[3].split(",")]
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]


def videos(pipe):
    return [pipe(p, num_frames=16, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=0,
                 progress=False).video for p in prompts]


def report(name, vids, ref):
    psnr = [video_similarity(v, r)["psnr"] for v, r in zip(vids, ref)]
    print(f"{name}: PSNR vs teacher {np.mean(psnr):.2f} dB (per video {np.round(psnr, 1).tolist()})", flush=True)


pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE)
ref = videos(pipe)
state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
for eps in epss:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in pipe.transformer.state_dict().items():
            if p.is_floating_point():
                p.copy_(state[k] * (1 + eps * torch.randn(p.shape, generator=g)))
    report(f"teacher, weights x (1 + {eps:g} N(0,1))", videos(pipe), ref)
if len(sys.argv) > 4:
    student = ReHyAtVideoPipeline.from_pretrained(sys.argv[4], text_embeddings=TABLE)
    report(f"student {sys.argv[4]}", videos(student), ref)
