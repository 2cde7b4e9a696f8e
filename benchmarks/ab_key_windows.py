"""A/B in one process on a GPU: ``rehyat_attention`` with its key/value windows as strided views (the library's
code) against the same operator with the windows copied (``.contiguous()``, what the earlier gather by frame index
produced), side by side, compiled, at Wan2.1-1.3B attention shapes.

Usage (from the repository root, CUDA only; about a minute on an H200):

    python benchmarks/ab_key_windows.py

Shapes: B=1, 12 heads x 128, D'=256, 1,560 tokens per latent frame, chunk_frames 3, overlap_frames 1, bfloat16,
21 / 42 / 84 latent frames; random q, k, v and small positive features. Timing: CUDA events, 3 warm-up calls,
median of 30 (10 for forward+backward, 21 frames only); no L2 flush (benchmarks/bench_attention.py flushes, so
its absolute times differ). The rows run "view", "copy", "view again", so drift during the run shows as a
difference between the two "view" rows. Prints a Markdown table and the largest |view - copy| difference.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rehyat.ops.hybrid as hybrid  # noqa: E402
from wan_bench_common import timed_call  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from rehyat.ops import rehyat_attention  # noqa: E402

S, H, D, FD = 1560, 12, 128, 256
VIEW = hybrid._windows_view


def copied_windows(*args):
    return VIEW(*args).contiguous()


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    return statistics.median(timed_call(fn, cuda=True)[0] for _ in range(reps))


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("ab_key_windows.py needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| frames | windows | full cuDNN fwd ms | fwd ms | fwd speed-up | full fwd+bwd ms | fwd+bwd ms | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for T in (21, 42, 84):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, T * S, H, D, device=dev, dtype=dt, generator=g) for _ in range(3))
        fq, fk = (torch.rand(1, T * S, H, FD, device=dev, dtype=dt, generator=g) * 0.05 for _ in range(2))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            full = median_ms(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2)))
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def full_fwd_bwd():
                F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2),
                                               vg.transpose(1, 2)).sum().backward()

            full_fb = median_ms(full_fwd_bwd, 10) if T == 21 else float("nan")
        outs = {}
        for name, fn in (("view", VIEW), ("copy", copied_windows), ("view again", VIEW)):
            hybrid._windows_view = fn
            torch._dynamo.reset()
            op = torch.compile(lambda *a: rehyat_attention(*a, frame_tokens=S, chunk_frames=3, overlap_frames=1),
                               dynamic=False)
            fwd = median_ms(lambda: op(q, k, v, fq, fk))
            outs[name] = op(q, k, v, fq, fk).float()
            fb = float("nan")
            if T == 21:
                ins = [x.detach().requires_grad_() for x in (q, k, v, fq, fk)]
                fb = median_ms(lambda: op(*ins).float().sum().backward(), 10)
            print(f"| {T} | {name} | {full:.2f} | {fwd:.3f} | {full / fwd:.2f}x | {full_fb:.2f} | {fb:.2f} | "
                  f"{full_fb / fb:.2f}x |", flush=True)
        hybrid._windows_view = VIEW
        print(f"  max |view - copy| = {(outs['view'] - outs['copy']).abs().max().item():.3e}")
        del q, k, v, fq, fk
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
