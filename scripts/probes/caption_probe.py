"""Does a world model use each caption word? Its flow-matching loss on 32 ground-truth world videos with the right
caption and with one word swapped (shape, direction to the opposite, colour) or the null caption, at several noise
levels. ``python scripts/probes/caption_probe.py MODEL_FOLDER FRAME_SIZE`` (the caption table in .devcarry/,
see docs/results/embedded_models/TRAINING.md)."""
import sys

import torch

from rehyat.models import load_transformer
from rehyat.world import sample_scene, render_video, caption, Scene, SHAPES, DIRECTIONS
from rehyat.training.finetune import flow_matching_inputs
torch.set_num_threads(2)
folder, H = sys.argv[1], int(sys.argv[2])
from rehyat.text_encoder import TextEmbeddingTable
table = TextEmbeddingTable.load(".devcarry/world_text_embeddings.safetensors")
m = load_transformer(folder).eval()
scenes = [sample_scene(20_000 + i) for i in range(32)]
x0 = torch.stack([torch.from_numpy(render_video(s, 16, H, H)).permute(3, 0, 1, 2).float() / 127.5 - 1 for s in scenes])
def swap(s, field, options):
    for o in options:
        if o != getattr(s, field):
            try:
                return Scene(**{**s.to_dict(), field: o})
            except ValueError:
                continue
variants = {"right": [caption(s) for s in scenes],
            "shape swapped": [caption(swap(s, "shape", SHAPES)) for s in scenes],
            "direction swapped": [caption(swap(s, "direction", [{"left": "right", "right": "left", "up": "down", "down": "up"}[s.direction]])) for s in scenes],
            "colour swapped": [caption(swap(s, "colour", ["red", "blue", "green", "yellow", "white", "black", "grey"])) for s in scenes],
            "null": [""] * len(scenes)}
emb = {k: table.lookup(v) for k, v in variants.items()}
g = torch.Generator().manual_seed(0)
noise = torch.randn(x0.shape, generator=g)
print("t", *variants)
for t in (0.3, 0.5, 0.7, 0.85, 0.95):
    xt, ts, target = flow_matching_inputs(x0, noise, torch.full((len(scenes),), t))
    row = []
    with torch.no_grad():
        for k, e in emb.items():
            out = m(xt, ts, e, return_dict=False)[0]
            row.append(float(((out - target) ** 2).mean()))
    print(t, " ".join(f"{v:.4f}" for v in row), flush=True)
