"""Does the linear branch depend on absolute frame positions? Per block, the relative error of the hybrid attention
output against block-causal softmax (teacher forcing, `block_diagnostics`) on the same 16-frame noisy latents with
RoPE's frame positions starting at 0 and at a later frame. Softmax attention under RoPE depends only on position
differences, so any change comes from the feature maps seeing rotated q, k at positions they were not trained on.
python scripts/probes/position_shift.py MODEL [OFFSETS=0,16,48,112] [FRAMES=16]"""
import sys, torch
from rehyat.evaluation import block_diagnostics
from rehyat.models.wan import get_context
from rehyat.pipelines import ReHyAtVideoPipeline

pipe = ReHyAtVideoPipeline.from_pretrained(sys.argv[1], text_embeddings=".devcarry/world_text_embeddings.safetensors")
offsets = [int(o) for o in (sys.argv[2] if len(sys.argv) > 2 else "0,16,48,112").split(",")]
frames = int(sys.argv[3]) if len(sys.argv) > 3 else 16
emb = pipe.encode_prompt(["a red circle moving right on a grey background"])
ctx = get_context(pipe.transformer)
for off in offsets:
    ctx.frame_offset = off
    d = block_diagnostics(pipe, emb, frames, 40, 40)
    assert ctx.frame_offset == off, "block_diagnostics reset the frame offset"
    print(f"offset {off:4d}: rel. error", " ".join(f"{v['rel_error']:.3f}" for v in d.values()),
          "| linear share", " ".join(f"{v['linear_share']:.3f}" for v in d.values()), flush=True)
ctx.frame_offset = 0
