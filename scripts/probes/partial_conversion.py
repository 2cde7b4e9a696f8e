"""How close to its teacher a student gets with fewer ReHyAt blocks, without training: in a converted student, the
blocks not in KEEP get overlap_frames = 64 (their window then holds every earlier frame: exact chunk-causal
softmax, the teacher's own attention), the others stay ReHyAt; PSNR of the whole video against the teacher and the
world checks, 16 frames, the world_eval prompts, seed 0, CPU float32. ``python scripts/probes/partial_conversion.py
TEACHER STUDENT 8 "1,3,4;1,3,4,5;0,1,2,3,4,5" [OVERLAP]`` (each ;-separated entry one run; OVERLAP: the ReHyAt
blocks' overlap_frames, default their own)."""
import sys

import numpy as np
import torch

from rehyat.evaluation import video_similarity
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, check_video, sample_scene, summarise

torch.set_num_threads(2)
TABLE = ".devcarry/world_text_embeddings.safetensors"
teacher, student, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
keeps = [[int(b) for b in k.split(",")] for k in sys.argv[4].split(";")]
overlap = int(sys.argv[5]) if len(sys.argv) > 5 else None
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]


def videos(pipe):
    return [pipe(p, num_frames=16, height=40, width=40, num_inference_steps=20, guidance_scale=4.0, seed=0,
                 progress=False).video for p in prompts]


ref = videos(ReHyAtVideoPipeline.from_pretrained(teacher, text_embeddings=TABLE))
for keep in keeps:
    pipe = ReHyAtVideoPipeline.from_pretrained(student, text_embeddings=TABLE)
    for b, block in enumerate(pipe.transformer.blocks):
        if b not in keep:
            block.attn1.processor.overlap_frames = 64
        elif overlap is not None:
            block.attn1.processor.overlap_frames = overlap
    vids = videos(pipe)
    s = summarise([check_video(v, p) for v, p in zip(vids, prompts)])
    psnr = np.mean([video_similarity(v, r)["psnr"] for v, r in zip(vids, ref)])
    checks = {k: round(float(s[k]), 3) for k in ("colour_present", "shape_correct", "direction_correct",
                                                  "persistence", "speed")}
    print(f"ReHyAt blocks {keep} (overlap_frames {overlap or 'own'}): PSNR vs teacher {psnr:.2f} dB", checks, flush=True)
