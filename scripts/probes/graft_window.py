"""Graft two students of one teacher into an all-ReHyAt model: the blocks BLOCKS of FAR (a student whose blocks
include them, with their feature maps) get overlap_frames WIDE; every other block is NEAR's (its own settings and
feature maps). With WIDE >= frames - chunk_frames the grafted blocks' windows hold every earlier frame at that
length (exact chunk-causal softmax, as NEAR's softmax blocks), while at longer lengths their window stays bounded
and the linear branch takes the rest. Both students must share the teacher's weights (trained with
--trainable feature_maps); checked bitwise.
``python scripts/probes/graft_window.py NEAR FAR "0,2,5" 12 OUT [--window-only]`` (--window-only: the grafted blocks'
linear branch off, linear_log_scale -30, exp(-30) ~ 1e-13: a sliding softmax window of WIDE earlier frames)."""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

window_only = "--window-only" in sys.argv[6:]
near, far, blocks, wide, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
blocks = [int(b) for b in blocks.split(",")]
if out.exists():
    sys.exit(f"{out} exists: choose a new folder")
W = "transformer/diffusion_pytorch_model.safetensors"
a, b = load_file(near / W), load_file(far / W)
for k, v in a.items():
    if ".processor." not in k and not torch.equal(v, b[k]):
        sys.exit(f"{k} differs between the two students: they must share their teacher's weights")
merged = dict(a)
merged.update({k: v for k, v in b.items() if any(k.startswith(f"blocks.{i}.attn1.processor.") for i in blocks)})
if window_only:
    for i in blocks:
        merged[f"blocks.{i}.attn1.processor.linear_log_scale"] = torch.full_like(
            merged[f"blocks.{i}.attn1.processor.linear_log_scale"], -30.0)
cfg = json.loads((near / "transformer/rehyat_config.json").read_text())
fcfg = json.loads((far / "transformer/rehyat_config.json").read_text())
assert cfg["feature_map_input"] == fcfg["feature_map_input"] and cfg["chunk_frames"] == fcfg["chunk_frames"]
settings = {str(i): {"overlap_frames": cfg["overlap_frames"]} for i in cfg["blocks"]}
settings.update({str(i): {"overlap_frames": wide} for i in blocks})
cfg["blocks"] = sorted(set(cfg["blocks"]) | set(blocks))
cfg["block_settings"] = {k: settings[k] for k in sorted(settings, key=int)}
shutil.copytree(near, out, ignore=shutil.ignore_patterns("train", "*.safetensors"))
save_file(merged, out / W)
(out / "transformer/rehyat_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
model_cfg = json.loads((near / "transformer/config.json").read_text())
model_cfg["rehyat"] = cfg  # the same settings are kept in both files
(out / "transformer/config.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
(out / "graft.json").write_text(json.dumps({"near": str(near), "far": str(far), "blocks": blocks,
                                            "overlap_frames": wide, "window_only": window_only},
                                           indent=2) + "\n")
print(f"wrote {out}: blocks {cfg['blocks']}, settings {cfg['block_settings']}")
