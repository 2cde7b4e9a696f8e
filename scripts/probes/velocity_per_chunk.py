"""Where a student leaves its teacher: along the teacher's own sampling trajectories (world prompts, CPU, float32),
the relative error of the student's velocity against the teacher's, per sampler step and per chunk of latent
frames, and the PSNR per frame of the two models' videos from the same noise.
python scripts/probes/velocity_per_chunk.py TEACHER STUDENT [PROMPTS] [SEEDS] [FRAMES] [CHUNK] > out.json"""
import json, sys
import numpy as np, torch
from rehyat.evaluation.metrics import _generate
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.world import caption, sample_scene

teacher, student = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
seeds = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "0,1").split(",")]
frames = int(sys.argv[5]) if len(sys.argv) > 5 else 16
chunk = int(sys.argv[6]) if len(sys.argv) > 6 else 4
table = ".devcarry/world_text_embeddings.safetensors"
pt = ReHyAtVideoPipeline.from_pretrained(teacher, text_embeddings=table)
ps = ReHyAtVideoPipeline.from_pretrained(student, text_embeddings=table)
calls = []
def hook(mod, args, kwargs, out):
    calls.append((args, kwargs, out))
pt.transformer.register_forward_hook(hook, with_kwargs=True)
prompts = [caption(sample_scene(10_000 + i)) for i in range(n)]
err = {}  # (call index within the run, chunk) -> list of rel errors
psnr = []
for pr in prompts:
    for s in seeds:
        calls.clear()
        vt = _generate(pt, pr, frames, 40, 40, 20, 4.0, s, "parallel").video
        vs = _generate(ps, pr, frames, 40, 40, 20, 4.0, s, "parallel").video
        d = (vt.astype(np.float64) - vs.astype(np.float64)) ** 2
        psnr.append([float(10 * np.log10(255**2 / max(m, 1e-10))) for m in d.reshape(d.shape[0], -1).mean(1)])
        with torch.no_grad():
            for i, (args, kwargs, out) in enumerate(calls):
                ref = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
                got = ps.transformer(*args, **kwargs)
                got = got[0] if isinstance(got, tuple) else getattr(got, "sample", got)
                for c in range(0, ref.shape[2], chunk):
                    r, g = ref[:, :, c:c + chunk], got[:, :, c:c + chunk]
                    err.setdefault(f"{i}:{c // chunk}", []).append(float((g - r).norm() / r.norm()))
res = {"teacher": teacher, "student": student, "prompts": n, "seeds": seeds, "frames": frames,
       "psnr_per_frame": np.mean(psnr, 0).tolist(), "psnr_mean": float(np.mean(psnr)),
       "velocity_rel_error": {k: float(np.mean(v)) for k, v in err.items()}}
print(json.dumps(res, indent=1))
