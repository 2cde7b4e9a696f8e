"""A/B in one process on a GPU: the parallel form with its linear branch in two Triton kernels that read fq, fk, v
and the softmax output in their native ``[B, N, H, X]`` layouts (``benchmarks/_linear_branch_kernels.py``: per-frame
sums; read-out fused with the joint normalisation) against ``rehyat_attention`` eager and compiled, at Wan2.1-1.3B
attention shapes. An experiment: the kernels are not part of the library (result in BENCHMARKS.md section 1).

Usage (from the repository root; about a minute on an H200, CUDA and Triton needed):

    python benchmarks/ab_linear_branch.py

CPU smoke test through Triton's interpreter (float16; tiny shapes, correctness line only):

    TRITON_INTERPRET=1 python benchmarks/ab_linear_branch.py --quick

Shapes: B=1, 12 heads x 128, D'=256, 1,560 tokens per latent frame, chunk_frames 3, overlap_frames 1, bfloat16,
causal, ``stabilizer="lse"``, 21 / 42 / 84 latent frames; random q, k, v and small positive features. First a
correctness line: both forms against the float64 dense reference (7 frames x 390 tokens). Timing: CUDA events,
3 warm-up calls, median of 30, no L2 flush. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rehyat.ops import chunk_windows, rehyat_attention, rehyat_attention_reference  # noqa: E402
from rehyat.ops.hybrid import _chunk_runs, _fold, _window_softmax, _windows_view  # noqa: E402


def parallel_triton(q, k, v, fq, fk, *, frame_tokens, chunk_frames, overlap_frames):
    """``rehyat_attention`` (causal, "lse") with the linear branch in the Triton kernels; same windows and SDPA call."""
    from _linear_branch_kernels import frame_sums, readout_merge

    B, N, H, D = q.shape
    S, Dv = frame_tokens, v.shape[-1]
    T = N // S
    windows = chunk_windows(T, chunk_frames, min(overlap_frames, T))
    kv, ks = frame_sums(fk, v, S)
    prefix_kv = F.pad(kv.cumsum(dim=1), (0, 0, 0, 0, 0, 0, 1, 0))
    prefix_k = F.pad(ks.cumsum(dim=1), (0, 0, 0, 0, 1, 0))
    kf, vf = k.view(B, T, S, H, D), v.view(B, T, S, H, Dv)
    y = torch.empty(B, N, H, Dv, device=q.device, dtype=q.dtype)
    for c0, c1 in _chunk_runs(windows):
        G = c1 - c0
        w0, q0, q1 = windows[c0]
        nq, nk = q1 - q0, q1 - w0
        t0, t1 = q0 * S, windows[c1 - 1][2] * S
        step = windows[c0 + 1][0] - w0 if G > 1 else 1
        kg, vg = (_windows_view(x, w0, nk, step, G).reshape(B * G, nk * S, H, x.shape[-1]) for x in (kf, vf))
        o, _ = _window_softmax(_fold(q[:, t0:t1], B, G, nq * S), kg, vg, "lse", D ** -0.5, torch.float32)
        starts = torch.tensor([windows[c][1] * S for c in range(c0, c1)], device=q.device, dtype=torch.int32)
        sidx = torch.tensor([windows[c][0] for c in range(c0, c1)], device=q.device)
        readout_merge(fq, o, prefix_kv[:, sidx], prefix_k[:, sidx], starts, nq * S, y=y)
    return y


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def median_ms(fn, reps=30):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(3):
        fn()
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, correctness line only (with TRITON_INTERPRET=1 "
                   "on the CPU: needs triton installed, e.g. pip install triton==3.6.0)")
    quick = p.parse_args(argv).quick
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not (quick and interpreted):
        raise SystemExit("ab_linear_branch.py needs a CUDA device (or TRITON_INTERPRET=1 with --quick)")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("ab_linear_branch.py needs triton (pip install triton==3.6.0 for the CPU interpreter)") from None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    dev = "cpu" if quick and interpreted else "cuda"
    dt = torch.float16 if dev == "cpu" else torch.bfloat16  # the interpreter's tl.dot does not take bfloat16
    H, D, Fd, S = (2, 16, 32, 20) if quick else (12, 128, 256, 1560)
    g = torch.Generator().manual_seed(0)
    Ts, Ss = 7, (20 if quick else 390)
    q, k, v = (torch.randn(1, Ts * Ss, H, D, generator=g) for _ in range(3))
    fq, fk = (torch.rand(1, Ts * Ss, H, Fd, generator=g) / Fd ** 0.5 for _ in range(2))
    small = dict(frame_tokens=Ss, chunk_frames=3, overlap_frames=1)
    ref = rehyat_attention_reference(q.double(), k.double(), v.double(), fq.double(), fk.double(), **small)
    x = [t.to(dev, dt) for t in (q, k, v, fq, fk)]
    print(f"small ({Ts} frames x {Ss} tokens): triton linear branch vs float64 reference "
          f"{rel(parallel_triton(*x, **small).cpu(), ref):.2e}; rehyat_attention vs float64 reference "
          f"{rel(rehyat_attention(*x, **small).cpu(), ref):.2e}")
    if dev == "cpu":
        return 0
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    kw = dict(frame_tokens=S, chunk_frames=3, overlap_frames=1)
    comp = torch.compile(rehyat_attention, dynamic=False)
    print("| frames | rehyat_attention eager | compiled | triton linear branch | rel. diff vs eager |")
    print("|---|---|---|---|---|")
    for T in (21, 42, 84):
        q, k, v = (torch.randn(1, T * S, H, D, device=dev, dtype=dt) for _ in range(3))
        fq, fk = ((torch.rand(1, T * S, H, Fd, device=dev) / Fd ** 0.5).to(dt) for _ in range(2))
        with torch.no_grad():
            e = rehyat_attention(q, k, v, fq, fk, **kw)
            t = parallel_triton(q, k, v, fq, fk, **kw)
            ms = [median_ms(lambda f=f: f(q, k, v, fq, fk, **kw)) for f in (rehyat_attention, comp, parallel_triton)]
        print(f"| {T} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | {rel(t, e):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
