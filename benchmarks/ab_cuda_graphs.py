"""A/B in one process on a GPU: CUDA graphs (``torch.compile(..., mode="reduce-overhead")``) against the default
``torch.compile`` mode, for the parallel operator ``rehyat_attention`` (with cuDNN full attention as the baseline of
the speed-up) and for the recurrent step's compiled core (all chunks of a 21-frame sequence back to back, carrying
the state, per chunk, against the compiled parallel form's time per chunk). Wan2.1-1.3B attention shapes.

Usage (from the repository root; about a minute on an H200, CUDA needed):

    python benchmarks/ab_cuda_graphs.py [FRAMES]     # FRAMES: comma-separated latent frame counts, default 21,84

Shapes: B=1, 12 heads x 128, D'=256, 1,560 tokens per latent frame, chunk_frames 3, overlap_frames 1, bfloat16,
causal, ``stabilizer="lse"``; random q, k, v and small positive features. Timing: CUDA events, a 256 MiB buffer
written before each call (L2 flush), 5 rounds that each time every variant (median of 15 calls), so drift shows as
the spread of the rounds; the median of the rounds is reported with their range. The compiled variants' outputs
are checked against eager ``rehyat_attention`` (relative difference printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rehyat.ops.hybrid as hybrid  # noqa: E402
from wan_bench_common import timed_call  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from rehyat.ops import rehyat_attention, rehyat_attention_step  # noqa: E402

H, D, FD, S, TC, TO = 12, 128, 256, 1560, 3, 1
KW = dict(frame_tokens=S, chunk_frames=TC, overlap_frames=TO)


def timed_rounds(fns: dict, flush: torch.Tensor, rounds: int = 5, reps: int = 15, per: int = 1) -> dict:
    """{name: [median ms of each round / per]}, the variants interleaved within each round."""
    res = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            times = []
            for _ in range(reps):
                flush.zero_()
                times.append(timed_call(fn, cuda=True)[0])
            res[n].append(statistics.median(times) / per)
    return res


def inputs(T: int, dev: str, dt: torch.dtype) -> list:
    q, k, v = (torch.randn(1, T * S, H, D, device=dev, dtype=dt) for _ in range(3))
    fq, fk = ((torch.rand(1, T * S, H, FD, device=dev) / FD ** 0.5).to(dt) for _ in range(2))
    return [q, k, v, fq, fk]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("frames", nargs="?", default="21,84", help="comma-separated latent frame counts (default 21,84)")
    args = p.parse_args(argv)
    frames = [int(x) for x in args.frames.split(",") if x]
    if not torch.cuda.is_available():
        raise SystemExit("ab_cuda_graphs.py needs a CUDA device")
    t0 = time.time()
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")

    def full(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    ops = {"compiled": torch.compile(rehyat_attention, dynamic=False),
           "compiled reduce-overhead": torch.compile(rehyat_attention, dynamic=False, mode="reduce-overhead")}
    lines = []
    for T in frames:
        x = inputs(T, dev, dt)
        fns = {"full attention, cuDNN": lambda x=x: full(*x[:3])}
        with torch.no_grad():
            ref = rehyat_attention(*x, **KW)
            for name, op in ops.items():
                for _ in range(3):
                    y = op(*x, **KW)
                print(f"{T} frames, {name}: warm at {time.time() - t0:.0f} s, rel. diff vs eager "
                      f"{float((y.double() - ref.double()).norm() / ref.double().norm()):.1e}")
                del y
                fns[name] = lambda op=op, x=x: op(*x, **KW)
            res = timed_rounds(fns, flush)
        base = statistics.median(res["full attention, cuDNN"])
        for n, ms in res.items():
            m = statistics.median(ms)
            lines.append(f"| {T} | {n} | {m:.3f} ms ({min(ms):.3f}-{max(ms):.3f}) | {base / m:.2f}x |")
        del x, ref
        torch.cuda.empty_cache()
    print("| latent frames | variant | forward, median of 5 rounds (range) | speed-up vs cuDNN |")
    print("|---|---|---|---|")
    print("\n".join(lines))

    # The recurrent step, 21 frames: every chunk back to back, carrying the state, per chunk.
    T, n = 21, TC * S
    C = T // TC
    x = inputs(T, dev, dt)

    def sequence():
        torch.compiler.cudagraph_mark_step_begin()  # a new sequence: earlier CUDA-graph outputs may be overwritten
        state = None
        for c in range(C):
            _, state = rehyat_attention_step(*(t[:, c * n:(c + 1) * n] for t in x), state, frame_tokens=S,
                                             overlap_frames=TO, compiled=True)

    cores = {"step, compiled core": torch.compile(hybrid._step_core, dynamic=False),
             "step, compiled core reduce-overhead": torch.compile(hybrid._step_core, dynamic=False,
                                                                  mode="reduce-overhead")}
    parallel = torch.compile(rehyat_attention, dynamic=False)
    saved = hybrid._COMPILED_STEP_CORE
    try:
        with torch.no_grad():
            fns = {"parallel form, compiled": lambda: parallel(*x, **KW)}
            for name, core in cores.items():
                hybrid._COMPILED_STEP_CORE = core
                for _ in range(3):
                    sequence()
                fns[name] = lambda core=core: (setattr(hybrid, "_COMPILED_STEP_CORE", core), sequence())
            for _ in range(2):
                parallel(*x, **KW)
            res = timed_rounds(fns, flush, per=C)
    finally:
        hybrid._COMPILED_STEP_CORE = saved
    base = statistics.median(res["parallel form, compiled"])
    print(f"\n| {C} chunks of 21 frames, back to back | per chunk, median of 5 rounds (range) | vs parallel per chunk |")
    print("|---|---|---|")
    for name, ms in res.items():
        m = statistics.median(ms)
        print(f"| {name} | {m:.3f} ms ({min(ms):.3f}-{max(ms):.3f}) | {m / base:.3f}x |")
    print(f"end at {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
