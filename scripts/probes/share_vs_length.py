"""The per-block diagnostics (attention error, linear share, softmax share of the same keys) of a ReHyAt model
folder at several lengths: ``python scripts/probes/share_vs_length.py FOLDER 16,128,256`` (40x40 world models)."""
import sys, torch
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.evaluation import block_diagnostics
torch.set_num_threads(1)
pipe = ReHyAtVideoPipeline.from_pretrained(sys.argv[1], text_embeddings=".devcarry/world_text_embeddings.safetensors")
emb = pipe.encode_prompt(["a red circle moving right on a grey background"])
for frames in [int(f) for f in sys.argv[2].split(",")]:
    d = block_diagnostics(pipe, emb, frames, 40, 40)
    print(frames, {b: (round(v["rel_error"], 3), round(v["linear_share"], 3), round(v["teacher_share"], 3)) for b, v in d.items()}, flush=True)
