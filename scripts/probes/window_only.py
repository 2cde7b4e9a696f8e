"""What the softmax window alone carries: the teacher converted with every block ReHyAt (chunk_frames 4, the
teacher's own chunks) and its linear branch switched off (linear_log_scale -30: exp(-30) ~ 1e-13), so each query
sees only its chunk and the overlap frames before it, for overlap_frames in OVERLAPS; world checks (speed, ...)
beside the teacher, 16 frames, the world_eval prompts, seed 0, CPU float32. ``python scripts/probes/window_only.py
TEACHER 8 1,2,3``."""
import sys

import numpy as np
import torch

from rehyat.models import convert_wan
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene, summarise

torch.set_num_threads(2)
TABLE = ".devcarry/world_text_embeddings.safetensors"
folder, n, overlaps = sys.argv[1], int(sys.argv[2]), [int(o) for o in sys.argv[3].split(",")]
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]


def checks(pipe, name):
    vids = [pipe(p, num_frames=16, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=0,
                 progress=False).video for p in prompts]
    s = summarise([check_video(v, p) for v, p in zip(vids, prompts)])
    print(name, {k: round(float(s[k]), 3) for k in ("colour_present", "shape_correct", "direction_correct",
                                                     "persistence", "speed")}, flush=True)
    return vids


ref = checks(ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE), "teacher (block-causal)")
for overlap in overlaps:
    from diffusers import WanTransformer3DModel

    pipe = ReHyAtVideoPipeline.from_pretrained(folder, text_embeddings=TABLE)
    plain = WanTransformer3DModel.from_pretrained(f"{folder}/transformer")
    pipe.transformer = convert_wan(plain, chunk_frames=4, overlap_frames=overlap, softmax_blocks="chunk_causal")
    with torch.no_grad():
        for proc in pipe.transformer.attn_processors.values():
            if getattr(proc, "linear_log_scale", None) is not None:
                proc.linear_log_scale.fill_(-30.0)
    vids = checks(pipe, f"window only, overlap_frames {overlap}")
    mse = [np.mean((a.astype(float) - b.astype(float)) ** 2) for a, b in zip(vids, ref)]
    print("  PSNR vs teacher", round(float(np.mean([10 * np.log10(255**2 / max(m, 1e-10)) for m in mse])), 2))
