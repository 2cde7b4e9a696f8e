"""Where one eager denoising forward spends its GPU time: the Wan2.1-1.3B-geometry teacher against ReHyAt 30/30,
through PyTorch's profiler.

Usage (from the repository root, CUDA only; under a minute on an H200):

    python benchmarks/profile_end_to_end.py [--latent-frames 21] [--out DIR]

Same model and inputs as benchmarks/bench_end_to_end.py (random weights, all bfloat16, 480x832, text embeddings
[1, 512, 4096], timestep 500; ReHyAt: every block converted, chunk_frames 3, overlap_frames 1, polynomial feature
maps), cuDNN SDPA preferred. Two untimed forwards, then one profiled forward per model. Prints, per model, the
operator table sorted by self CUDA time; ``--out DIR`` also writes ``profile_teacher.txt`` and
``profile_rehyat.txt``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from wan_bench_common import WAN_1_3B, build_model, probe_sdpa, sdpa_context  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rehyat.models import convert_wan  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent-frames", type=int, default=21, help="latent frames (21 = an 81-frame video)")
    p.add_argument("--rows", type=int, default=30, help="operators per table")
    p.add_argument("--out", default=None, help="folder for the two tables")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_end_to_end.py needs a CUDA device")
    dev, dt = torch.device("cuda"), torch.bfloat16
    teacher = build_model(WAN_1_3B, dev, dt, 0, False)
    torch.manual_seed(3)
    rehyat = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=3, overlap_frames=1)
    x = torch.randn(1, 16, args.latent_frames, 60, 104, device=dev, dtype=dt)
    e = torch.randn(1, 512, WAN_1_3B["text_dim"], device=dev, dtype=dt)
    t = torch.tensor([500.0], device=dev)
    backend = probe_sdpa("cudnn", dev)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    for name, model in (("teacher", teacher), ("rehyat", rehyat)):
        with torch.no_grad(), sdpa_context(backend, dev):
            for _ in range(2):
                model(x, t, e, return_dict=False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(x, t, e, return_dict=False)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                          max_name_column_width=60)
        print(f"==== {name}: one forward, {args.latent_frames} latent frames\n{table}", flush=True)
        if args.out:
            with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
                f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
