"""The per-block diagnostics (attention error, linear share, softmax share of the same keys) of a ReHyAt model
folder at several lengths: ``python scripts/probes/share_vs_length.py FOLDER 16,128,256 [H|off]`` (40x40 world models;
the optional third argument overrides the folder's ``linear_norm_frames``: an int, or ``off`` for plain sums)."""
import sys, torch
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.evaluation import block_diagnostics
torch.set_num_threads(1)
pipe = ReHyAtVideoPipeline.from_pretrained(sys.argv[1], text_embeddings=".devcarry/world_text_embeddings.safetensors")
if len(sys.argv) > 3:
    from rehyat.models import set_linear_norm_frames
    set_linear_norm_frames(pipe.transformer, None if sys.argv[3] == "off" else int(sys.argv[3]))
emb = pipe.encode_prompt(["a red circle moving right on a grey background"])
for frames in [int(f) for f in sys.argv[2].split(",")]:
    d = block_diagnostics(pipe, emb, frames, 40, 40)
    print(frames, {b: (round(v["rel_error"], 3), round(v["linear_share"], 3), round(v["teacher_share"], 3)) for b, v in d.items()}, flush=True)
