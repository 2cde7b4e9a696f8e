"""Probe (CPU, ``python scripts/probes/mass_probe.py 16``): per-block mass diagnostic and error of (a) fresh conversion of the shipped teacher, (b) calibrated,
(c) the shipped student (its feature maps on the teacher: it has no scale)."""
import sys, time, torch
from rehyat.models import convert_wan
from rehyat.training.components import load_model_folder
from rehyat.training.distributed import DistEnv
from rehyat.training.trajectory import TeacherTrajectories, resolve_prompt_pool
from rehyat.training.common import latent_shape_for
from rehyat.training.distill import evaluate_blocks, calibrate_linear_scale, prepare_for_distillation
torch.set_num_threads(1)
T = "rehyat/assets/teacher"
env = DistEnv(device=torch.device("cpu"))
pool = resolve_prompt_pool(T, text_embeddings=".devcarry/world_text_embeddings.safetensors", text_dim=384)
frames = int(sys.argv[1]) if len(sys.argv) > 1 else 16
shape = latent_shape_for(T, frames, 48, 48)
def traj(seed):
    pipe = load_model_folder(T)
    return TeacherTrajectories(pipe.scheduler, pool, shape, batch_size=4, sampling_steps=20, guidance_scale=4.0,
                               seed=seed, env=env)
def show(name, rec):
    print(name)
    for b, r in rec.items():
        print(f"  block {b}: rel {r['rel_error']:.3f} lin_share {r['linear_share']:.3f} teacher_share {r['teacher_share']:.3f} teacher_mass {r['teacher_mass']:.3f}")
    print("  mean rel", sum(r['rel_error'] for r in rec.values()) / len(rec))
torch.manual_seed(0)
m = convert_wan(load_model_folder(T).transformer, blocks="all", chunk_frames=4, overlap_frames=1)
prepare_for_distillation(m)
t0 = time.time()
show("fresh", evaluate_blocks(m, traj(99), env))
print("time", time.time() - t0)
g = calibrate_linear_scale(m, traj(5), env)
print("gaps", {b: [round(x, 2) for x in v] for b, v in g.items()})
show("calibrated", evaluate_blocks(m, traj(99), env))
