"""Benchmark ReHyAt hybrid attention against full softmax attention, with a correctness check in the same run.

Usage (from the repository root; on an H200 the default run, 21/42/84 latent frames, takes a few minutes):

    python benchmarks/bench_attention.py [--out DIR] [--frames 21 42 84] [--no-compile] ...
    python benchmarks/bench_attention.py --quick --device cpu        # CPU smoke test, tiny sizes, seconds

Default shapes are one Wan2.1-1.3B self-attention layer (SPEC sections 1-5): B=1, H=12 heads, D=128, feature
dim D'=256, 1,560 tokens per latent frame, chunk_frames T_c=3, overlap_frames T_o=1, bfloat16, causal linear
branch, "lse" stabiliser. Rows, per frame count (see benchmarks/README.md for details):

* full attention: ``F.scaled_dot_product_attention`` under ``sdpa_kernel(CUDNN_ATTENTION)`` and
  ``sdpa_kernel(FLASH_ATTENTION)`` (``MATH`` too on the CPU), forward and forward+backward;
* softmax windows alone: the chunk windows of ReHyAt, chunks folded into the batch, one SDPA call per window shape;
* ``rehyat_attention`` eager and under ``torch.compile``, forward and forward+backward (grads of q, k, v, fq, fk);
* the feature map ``PolynomialFeatureMap(H, D)`` forward: the PyTorch reference eager and compiled, and the fused
  Triton kernel (CUDA, 16-bit);
* one recurrent step ``rehyat_attention_step`` on one chunk (state with the overlap cached, state update included),
  against the parallel form's time per chunk (its total / number of chunks);
* the ReHyAt FLOP floor at 560 TFLOP/s.

Timing: CUDA events around each call, L2 flushed before each call, 2-3 input sets rotated, warm-up, median over
repeats (time.perf_counter medians on the CPU). Memory: ``torch.cuda.max_memory_allocated`` reset per row.
Correctness (bf16 operator vs the float64 dense reference on a smaller problem, recurrent vs parallel, compiled vs
eager) prints PASS/FAIL; the script exits with status 1 on FAIL. The Markdown result table is printed last;
``--out DIR`` also writes ``DIR/bench_attention.json`` and ``DIR/bench_attention.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rehyat.modules import PolynomialFeatureMap  # noqa: E402
from wan_bench_common import timed_call  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from rehyat.ops.feature_map import (  # noqa: E402
    fused_feature_map_supports,
    fused_kernel_config,
    polynomial_feature_map,
    polynomial_feature_map_fused,
)
from rehyat.ops import (  # noqa: E402
    chunk_windows,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

FLOOR_TFLOPS = 560.0  # reference throughput for the FLOP floor (what cuDNN SDPA reaches on an H200, SPEC section 9)
TOL = 1e-2  # relative error tolerance of every correctness check
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
BACKEND_NAMES = {"cudnn": "cuDNN", "flash": "FlashAttention", "math": "math"}
T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the elapsed time."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Timing and per-row bookkeeping
# ----------------------------------------------------------------------------------------------------------------
class Timer:
    """Median time of ``fn(i)`` over repeats; ``i`` is the repeat index, used by callers to rotate input sets.

    CUDA: one pair of CUDA events per call, a 256 MiB buffer written before each call so the L2 holds no inputs.
    CPU: time.perf_counter around each call.
    """

    def __init__(self, device: torch.device, budget_s: float, min_reps: int, max_reps: int, warmup: int):
        self.device, self.budget_s = device, budget_s
        self.min_reps, self.max_reps, self.warmup = min_reps, max_reps, warmup
        self.cuda = device.type == "cuda"
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _once(self, fn, i: int) -> float:
        """One timed call in ms."""
        if self.cuda:
            self.flush_buf.zero_()
        return timed_call(lambda: fn(i), self.cuda)[0]

    def __call__(self, fn) -> dict:
        for i in range(self.warmup):
            fn(i)
        self.sync()
        est = self._once(fn, self.warmup)  # one timed call sizes the number of repeats
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_s * 1e3 / max(est, 1e-3))))
        times = [self._once(fn, i) for i in range(reps)]
        return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def gib(nbytes: int | float) -> float:
    return nbytes / 2**30


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short(exc: BaseException, n: int = 160) -> str:
    """First line of an exception, shortened, for the table."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= n else text[: n - 3] + "..."


def run_row(ctx, frames: int, name: str, kind: str, body, flops: float | None = None, baseline: str | None = None,
            setup=None):
    """Run one benchmark row and append its result to ``ctx.rows``.

    ``body()`` (``body(setup())`` when ``setup`` is given; what ``setup`` allocates is not counted in the
    row's +GiB) does the work and returns a dict with at least ``ms`` (or raises). ``flops`` gives the
    TFLOP/s column; ``baseline`` (``"fwd"`` or ``"fwd+bwd"``) gives the speed-up column against the
    full-attention baseline of the same frame count. Out-of-memory and other errors become the row's status.
    """
    device = ctx.device
    row = {"frames": frames, "tokens": frames * ctx.args.frame_tokens, "row": name, "kind": kind, "status": "ok",
           "ms": None, "tflops": None, "speedup": None, "baseline": baseline, "peak_gib": None, "work_gib": None,
           "reps": None, "note": ""}
    free_memory(device)
    data = None
    try:
        data = setup() if setup is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        res = body(data) if setup is not None else body()
        row.update({k: v for k, v in res.items() if k in ("ms", "min_ms", "reps", "note", "status", "compile_s")})
    except torch.OutOfMemoryError:
        row["status"], row["note"] = "OOM", "out of memory"
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the table, never fatal
        row["status"], row["note"] = "error", short(exc)
        log(f"  {name}: {short(exc)}")
    data = None  # free what setup allocated before the next row
    if device.type == "cuda" and row["status"] == "ok":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_gib"], row["work_gib"] = gib(peak), gib(peak - before)
    if row["ms"] is not None:
        if flops:
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        base = ctx.baseline_ms.get((frames, baseline)) if baseline else None
        if base:
            row["speedup"] = base / row["ms"]
    ctx.rows.append(row)
    ms = f"{row['ms']:.3f} ms" if row["ms"] is not None else row["status"]
    log(f"  {frames} frames | {name} [{kind}]: {ms} {row['note']}".rstrip())
    free_memory(device)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Problem setup and FLOP counts
# ----------------------------------------------------------------------------------------------------------------
class Ctx:
    """Run-wide settings and results."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.baseline_ms: dict = {}  # (frames, "fwd" | "fwd+bwd") -> ms of the full-attention baseline
        self.baseline_name: str | None = None
        self.compile_broken: dict = {}  # name of a compiled function -> error text of its first failure
        self.timer = Timer(self.device, args.budget, args.min_reps, args.max_reps, args.warmup)
        a = args
        # Feature maps in the model's dtype, as convert_wan puts them; with bfloat16 weights their outputs are
        # bfloat16 too (float32 or float16 weights: float32 outputs).
        self.phi_q = PolynomialFeatureMap(a.heads, a.dim, a.feature_dim).to(self.device, self.dtype).eval()
        self.phi_k = PolynomialFeatureMap(a.heads, a.dim, a.feature_dim).to(self.device, self.dtype).eval()
        for p in list(self.phi_q.parameters()) + list(self.phi_k.parameters()):
            p.requires_grad_(False)
        with torch.no_grad():
            probe = torch.zeros(1, a.heads, a.dim, device=self.device, dtype=self.dtype)
            self.feature_dtype = str(self.phi_q(probe).dtype).replace("torch.", "")
        self.compiled = {}
        if a.compile:
            self.compiled = {
                "rehyat": torch.compile(rehyat_attention, dynamic=False),
                "phi": torch.compile(self.phi_q, dynamic=False),
                # the library's compiled step: its tensor work under torch.compile, graphs independent of the
                # chunk position (rehyat_attention_step(..., compiled=True))
                "step": functools.partial(rehyat_attention_step, compiled=True),
            }

    def op_kwargs(self):
        a = self.args
        return dict(frame_tokens=a.frame_tokens, chunk_frames=a.chunk_frames, overlap_frames=a.overlap_frames)


def make_inputs(ctx: Ctx, frames: int, frame_tokens: int, requires_grad: bool = True) -> dict:
    """One input set: q, k, v ``[B, N, H, D]`` (randn, like Wan's RMS-normed q, k), fq, fk = phi(q), phi(k)
    (the feature maps' output dtype, non-negative) and a random output gradient ``go``. All leaves require grad
    when asked."""
    a = ctx.args
    N = frames * frame_tokens
    shape = (a.batch, N, a.heads, a.dim)
    q, k, v = (torch.randn(shape, device=ctx.device, dtype=ctx.dtype) for _ in range(3))
    with torch.no_grad():
        fq, fk = ctx.phi_q(q), ctx.phi_k(k)
    go = torch.randn(shape, device=ctx.device, dtype=ctx.dtype)
    s = {"q": q, "k": k, "v": v, "fq": fq, "fk": fk, "go": go}
    if requires_grad:
        for name in ("q", "k", "v", "fq", "fk"):
            s[name].requires_grad_(True)
    return s


def full_attention_flops(ctx: Ctx, frames: int) -> float:
    """4 N^2 D H B: QK^T and PV of dense softmax attention, forward."""
    a = ctx.args
    N = frames * a.frame_tokens
    return 4.0 * N * N * a.dim * a.heads * a.batch


def window_flops(ctx: Ctx, frames: int) -> float:
    """Softmax windows, summed exactly over the chunks of chunk_windows: 4 * n_q * n_k * D * H * B per chunk
    (4 T_c (T_c + T_o) S^2 D H for a full chunk; the first chunk has no overlap, the last may be shorter)."""
    a = ctx.args
    S = a.frame_tokens
    total = 0
    for w0, q0, q1 in chunk_windows(frames, a.chunk_frames, a.overlap_frames):
        total += 4.0 * (q1 - q0) * S * (q1 - w0) * S * a.dim * a.heads * a.batch
    return total


def linear_flops(ctx: Ctx, frames: int) -> float:
    """Linear branch: 2 N D' D H for the per-frame sums phi_k^T v plus as much for the read-out phi_q S."""
    a = ctx.args
    return 2.0 * frames * a.frame_tokens * a.feature_dim * a.dim * a.heads * 2 * a.batch


def rehyat_flops(ctx: Ctx, frames: int) -> float:
    return window_flops(ctx, frames) + linear_flops(ctx, frames)


def phi_flops(ctx: Ctx, frames: int) -> float:
    """One feature map: 2 N H (D * hidden + hidden * D'), hidden = D'."""
    a = ctx.args
    return 2.0 * frames * a.frame_tokens * a.heads * (a.dim * a.feature_dim + a.feature_dim * a.feature_dim) * a.batch


def num_chunks(ctx: Ctx, frames: int) -> int:
    return len(chunk_windows(frames, ctx.args.chunk_frames, ctx.args.overlap_frames))


def rel_err(a: torch.Tensor, r: torch.Tensor) -> float:
    """||a - r|| / ||r|| in float64."""
    a, r = a.detach().double(), r.detach().double()
    return ((a - r).norm() / r.norm()).item()


def add_check(ctx: Ctx, name: str, err: float | None, note: str = "") -> None:
    ok = err is not None and math.isfinite(err) and err <= TOL
    ctx.checks.append({"check": name, "rel_err": err, "tol": TOL, "result": "PASS" if ok else "FAIL", "note": note})
    log(f"check {name}: {'n/a' if err is None else f'{err:.2e}'} -> {'PASS' if ok else 'FAIL'} {note}".rstrip())


# ----------------------------------------------------------------------------------------------------------------
# Correctness on a small problem (dense float64 reference)
# ----------------------------------------------------------------------------------------------------------------
def check_small(ctx: Ctx) -> None:
    """bf16 parallel and recurrent forms vs the float64 dense reference, and one chunk vs full softmax attention.

    The reference is O(B H N^2) in memory: it runs on ``--check-frames`` x ``--check-tokens`` tokens only
    (7 x 390 = 2,730 by default, about 5 GB at 12 heads), never at the benchmark sizes.
    """
    a = ctx.args
    T, S = a.check_frames, a.check_tokens
    kw = dict(frame_tokens=S, chunk_frames=a.chunk_frames, overlap_frames=a.overlap_frames)
    label = f"{T} frames x {S} tokens"
    try:
        with torch.no_grad():
            s = make_inputs(ctx, T, S, requires_grad=False)
            q, k, v, fq, fk = (s[n] for n in ("q", "k", "v", "fq", "fk"))
            out = rehyat_attention(q, k, v, fq, fk, **kw)
            ref = rehyat_attention_reference(q.double(), k.double(), v.double(), fq.double(), fk.double(), **kw)
            add_check(ctx, f"parallel {a.dtype} vs float64 reference ({label})", rel_err(out, ref))
            rec, _ = rehyat_attention_recurrent(q, k, v, fq, fk, **kw)
            add_check(ctx, f"recurrent {a.dtype} vs float64 reference ({label})", rel_err(rec, ref))
            add_check(ctx, f"recurrent vs parallel, both {a.dtype} ({label})", rel_err(rec, out))
            del ref
            one = rehyat_attention(q, k, v, fq, fk, frame_tokens=S, chunk_frames=T, overlap_frames=a.overlap_frames)
            full = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
            add_check(ctx, f"one chunk (chunk_frames >= frames) vs float64 full softmax ({label})", rel_err(one, full))
            # a NaN in one query row must come out as NaN in that row (never silently finite), on this device's
            # SDPA backend; the CPU flash kernel needs the operator's workaround, GPU kernels must not
            qn = q.clone()
            qn[0, 5, 0, 0] = float("nan")
            y = rehyat_attention(qn, k, v, fq, fk, **kw)
            bad_row_nan = bool(torch.isnan(y[0, 5, 0]).all())
            others_finite = bool(torch.isfinite(y[0, 6:]).all())
            add_check(ctx, f"NaN in one q row gives NaN in that row only ({label})",
                      0.0 if bad_row_nan and others_finite else float("inf"),
                      f"row NaN: {bad_row_nan}, other rows finite: {others_finite}")
    except torch.OutOfMemoryError:
        add_check(ctx, f"float64 reference ({label})", None, "out of memory: lower --check-tokens")
    except Exception as exc:  # noqa: BLE001
        add_check(ctx, f"float64 reference ({label})", None, short(exc))
        traceback.print_exc()
    free_memory(ctx.device)


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------
def sdpa_full(q, k, v):
    """Full softmax attention on ``[B, N, H, D]`` tensors, through the same transposes the operator uses."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def backend_unavailable(exc: RuntimeError) -> bool:
    """Whether SDPA refused the call because the chosen backend cannot run these inputs on this device."""
    return "No available kernel" in str(exc) or "No viable backend" in str(exc)


def default_sdpa_backend(ctx: Ctx) -> str:
    """The SDPA backend PyTorch picks by default for one chunk window (the one rehyat_attention gets)."""
    a = ctx.args
    try:
        n = a.chunk_frames * a.frame_tokens
        q = torch.randn(a.batch, a.heads, n, a.dim, device=ctx.device, dtype=ctx.dtype)
        choice = int(torch._fused_sdp_choice(q, q, q))
        names = {int(getattr(b, "value", b)): b.name for b in SDPBackend.__members__.values()}
        return names.get(choice, str(choice))
    except Exception as exc:  # noqa: BLE001 - private API, informative only
        return f"unknown ({short(exc, 60)})"


def rows_full_attention(ctx: Ctx, frames: int, sets: list[dict]) -> None:
    """Full attention per SDPA backend, forward and forward+backward (grads of q, k, v)."""
    flops = full_attention_flops(ctx, frames)
    for bname in ctx.args.backends:
        backend = BACKENDS[bname]
        label = f"full attention, SDPA {BACKEND_NAMES[bname]}"

        def fwd(i, backend=backend):
            s = sets[i % len(sets)]
            with torch.no_grad(), sdpa_kernel(backend):
                sdpa_full(s["q"], s["k"], s["v"])

        def fwd_bwd(i, backend=backend):
            s = sets[i % len(sets)]
            with sdpa_kernel(backend):
                out = sdpa_full(s["q"], s["k"], s["v"])
                torch.autograd.grad(out, (s["q"], s["k"], s["v"]), s["go"])

        for kind, fn, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
            def body(fn=fn):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # SDPA explains each unavailable kernel in a UserWarning
                    try:
                        fn(0)
                    except RuntimeError as exc:
                        if backend_unavailable(exc):
                            return {"ms": None, "status": "n/a", "note": f"{BACKEND_NAMES[bname]} not available here"}
                        raise
                    return ctx.timer(fn)

            row = run_row(ctx, frames, label, kind, body, flops * mult, baseline=kind)
            if row["ms"] is not None and (frames, kind) not in ctx.baseline_ms:
                # the first backend that runs is the baseline of the speed-up column (cuDNN on a GPU)
                ctx.baseline_ms[(frames, kind)] = row["ms"]
                row["speedup"] = 1.0
                if ctx.baseline_name is None:
                    ctx.baseline_name = label


def rows_windows(ctx: Ctx, frames: int, sets: list[dict]) -> None:
    """Softmax windows alone: each chunk's queries against its window, chunks of one window shape folded into
    the batch (one SDPA call per shape, gathers done before timing), forward."""
    a = ctx.args
    S = a.frame_tokens
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for w0, q0, q1 in chunk_windows(frames, a.chunk_frames, a.overlap_frames):
        groups.setdefault((q1 - q0, q1 - w0), []).append((w0, q0, q1))

    def fold(s):
        out = []
        for (nq, nk), wins in groups.items():
            def gather(x, starts, n):
                xf = x.detach().view(a.batch, frames, S, a.heads, -1)
                idx = torch.tensor([[st + j for j in range(n)] for st in starts], device=x.device)
                return xf[:, idx].reshape(a.batch * len(starts), n * S, a.heads, -1).transpose(1, 2)

            out.append((gather(s["q"], [w[1] for w in wins], nq), gather(s["k"], [w[0] for w in wins], nk),
                        gather(s["v"], [w[0] for w in wins], nk)))
        return out

    flops = window_flops(ctx, frames)
    for bname in [b for b in ctx.args.backends if b != "math"]:
        backend = BACKENDS[bname]

        def body(folded, backend=backend):
            def fwd(i):
                with torch.no_grad(), sdpa_kernel(backend):
                    for qg, kg, vg in folded[i % len(folded)]:
                        F.scaled_dot_product_attention(qg, kg, vg)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fwd(0)
                except RuntimeError as exc:
                    if backend_unavailable(exc):
                        return {"ms": None, "status": "n/a", "note": f"{BACKEND_NAMES[bname]} not available here"}
                    raise
                res = ctx.timer(fwd)
            res["note"] = f"{len(groups)} SDPA call(s), {num_chunks(ctx, frames)} chunks"
            return res

        run_row(ctx, frames, f"softmax windows alone, SDPA {BACKEND_NAMES[bname]}", "fwd", body, flops, "fwd",
                setup=lambda: [fold(s) for s in sets])


def timed_compiled(ctx: Ctx, name: str, key: str, frames: int, fn) -> dict:
    """Time ``fn``, which calls ``ctx.compiled[name]``: first call (compilation) timed with perf_counter, then the
    ordinary timing. A compile failure is reported (status "compile failed") and later calls with the same
    ``key`` (e.g. the other frame counts) are skipped."""
    if name not in ctx.compiled:
        return {"ms": None, "status": "skipped", "note": "--no-compile"}
    if key in ctx.compile_broken:
        return {"ms": None, "status": "skipped", "note": f"compile failed earlier: {ctx.compile_broken[key]}"}
    t = time.perf_counter()
    try:
        fn(0)
        ctx.timer.sync()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        ctx.compile_broken[key] = short(exc, 100)
        log(f"  torch.compile failed ({key}, {frames} frames):\n" + "".join(traceback.format_exc().splitlines(True)[-12:]))
        return {"ms": None, "status": "compile failed", "note": short(exc)}
    compile_s = time.perf_counter() - t
    res = ctx.timer(fn)
    res["compile_s"] = compile_s
    res["note"] = f"first call (compile) {compile_s:.1f} s"
    return res


def rows_rehyat(ctx: Ctx, frames: int, sets: list[dict]) -> dict:
    """rehyat_attention eager and compiled, forward and forward+backward (grads of q, k, v, fq, fk).

    Also checks compiled vs eager output and recurrent vs parallel at this size. Returns the forward ms per
    variant (for the per-chunk rows)."""
    kw = ctx.op_kwargs()
    flops = rehyat_flops(ctx, frames)
    names = ("q", "k", "v", "fq", "fk")
    fwd_ms = {}
    for variant in ("eager", "compiled"):
        op = rehyat_attention if variant == "eager" else ctx.compiled.get("rehyat")

        def fwd(i, op=op):
            s = sets[i % len(sets)]
            with torch.no_grad():
                return op(*(s[n] for n in names), **kw)

        def fwd_bwd(i, op=op):
            s = sets[i % len(sets)]
            out = op(*(s[n] for n in names), **kw)
            torch.autograd.grad(out, tuple(s[n] for n in names), s["go"])

        for kind, fn, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
            if variant == "eager":
                body = lambda fn=fn: ctx.timer(fn)  # noqa: E731
            else:
                body = lambda fn=fn, kind=kind: timed_compiled(ctx, "rehyat", f"rehyat {kind}", frames, fn)  # noqa: E731
            row = run_row(ctx, frames, f"ReHyAt rehyat_attention, {variant}", kind, body, flops * mult, kind)
            if kind == "fwd" and row["ms"] is not None:
                fwd_ms[variant] = row["ms"]

    if ctx.compiled and sets[0]["fq"].dtype != torch.float32:
        # the same operator on float32 copies of the features: its linear products then run in float32 (no tensor
        # cores); side by side with the rows above it measures what the 16-bit linear path gains
        op = ctx.compiled["rehyat"]
        f32 = [(s["fq"].detach().float(), s["fk"].detach().float()) for s in sets]  # for this row only

        def fwd32(i, op=op):
            s, (fq32, fk32) = sets[i % len(sets)], f32[i % len(sets)]
            with torch.no_grad():
                return op(s["q"], s["k"], s["v"], fq32, fk32, **kw)

        body = lambda: timed_compiled(ctx, "rehyat", "rehyat fwd f32 features", frames, fwd32)  # noqa: E731
        run_row(ctx, frames, "ReHyAt rehyat_attention, compiled, float32 features", "fwd", body, flops, "fwd")
        del f32

    # correctness at the benchmark size: compiled vs eager, recurrent vs parallel (all in the benchmark dtype)
    try:
        s = sets[0]
        with torch.no_grad():
            eager_out = rehyat_attention(*(s[n] for n in names), **kw)
            if "compiled" in fwd_ms:
                comp_out = ctx.compiled["rehyat"](*(s[n] for n in names), **kw)
                add_check(ctx, f"compiled vs eager rehyat_attention ({frames} frames)", rel_err(comp_out, eager_out))
                del comp_out
            rec, _ = rehyat_attention_recurrent(*(s[n] for n in names), **kw)
            add_check(ctx, f"recurrent vs parallel, both {ctx.args.dtype} ({frames} frames)", rel_err(rec, eager_out))
            del rec, eager_out
    except torch.OutOfMemoryError:
        log(f"  recurrent/compiled checks at {frames} frames: out of memory (not counted as FAIL)")
    free_memory(ctx.device)
    return fwd_ms


def rows_feature_map(ctx: Ctx, frames: int, sets: list[dict]) -> None:
    """phi(q) forward alone: the PyTorch reference eager and compiled, and the fused Triton kernel (where it
    applies); plus a check of both 16-bit paths against the float64 reference on the first input set."""
    flops = phi_flops(ctx, frames)
    phi = ctx.phi_q
    fused_ok = fused_feature_map_supports(sets[0]["q"].detach(), phi.w1, phi.b1, phi.w2, phi.b2, phi.degree)
    variants = [("eager", False), ("compiled", False)] + ([("fused Triton", True)] if fused_ok else [])
    for variant, fused in variants:
        op = ctx.compiled.get("phi") if variant == "compiled" else phi

        def fwd(i, op=op, fused=fused):
            phi.fused = fused
            with torch.no_grad():
                op(sets[i % len(sets)]["q"])

        if variant == "compiled":
            body = lambda: timed_compiled(ctx, "phi", "phi", frames, fwd)  # noqa: E731
        else:
            body = lambda: ctx.timer(fwd)  # noqa: E731
        name = f"feature map PolynomialFeatureMap({ctx.args.heads},{ctx.args.dim}) phi(q), {variant}"
        run_row(ctx, frames, name, "fwd", body, flops)
        if fused and ctx.rows[-1]["status"] == "ok":
            ctx.rows[-1]["note"] = f"tile {fused_kernel_config()}"
    phi.fused = True
    if fused_ok:
        try:
            q = sets[0]["q"].detach()[:, : 4 * ctx.args.frame_tokens]  # 4 frames: a float64 copy stays small
            w = [p.detach() for p in (phi.w1, phi.b1, phi.w2, phi.b2)]
            kw = dict(degree=phi.degree, positivity=phi.positivity)
            with torch.no_grad():
                ref = polynomial_feature_map(q.double(), *(p.double() for p in w), **kw)
                errs = {name: rel_err(f(q, *w, **kw), ref)
                        for name, f in (("fused", polynomial_feature_map_fused), ("torch", polynomial_feature_map))}
            add_check(ctx, f"feature map fused Triton {ctx.args.dtype} vs float64 reference (4 frames; PyTorch "
                      f"{ctx.args.dtype} path: {errs['torch']:.2e})", errs["fused"])
            del ref
        except Exception as e:  # report, do not abort the benchmark
            add_check(ctx, f"feature map fused Triton vs float64 reference: {type(e).__name__}: {e}", float("inf"))


def rows_recurrent(ctx: Ctx, frames: int, sets: list[dict], fwd_ms: dict) -> None:
    """One rehyat_attention_step on one chunk (the second: state after chunk 0, overlap frames cached; state
    update included), eager and compiled; and the parallel form's forward time per chunk (total / chunks)."""
    a = ctx.args
    S, Tc, To = a.frame_tokens, a.chunk_frames, a.overlap_frames
    n = Tc * S
    names = ("q", "k", "v", "fq", "fk")
    chunk_idx = 1 if frames >= 2 * Tc else 0
    nk = (Tc + min(To, chunk_idx * Tc)) * S
    flops = (4.0 * n * nk * a.dim + 2.0 * n * a.feature_dim * a.dim * 2) * a.heads * a.batch
    step_kw = dict(frame_tokens=S, overlap_frames=To)

    def prepare():
        steps = []
        with torch.no_grad():
            for s in sets:
                state = None
                if chunk_idx == 1:
                    _, state = rehyat_attention_step(*(s[x][:, :n].detach() for x in names), None, **step_kw)
                chunk = [s[x][:, chunk_idx * n:(chunk_idx + 1) * n].detach().clone() for x in names]
                steps.append((chunk, state))
        return steps

    for variant in ("eager", "compiled"):
        op = rehyat_attention_step if variant == "eager" else ctx.compiled.get("step")

        def body(steps, op=op, variant=variant):
            def fn(i):
                chunk, state = steps[i % len(steps)]
                with torch.no_grad():
                    op(*chunk, state, **step_kw)

            if variant == "eager":
                res = ctx.timer(fn)
            else:
                res = timed_compiled(ctx, "step", "step", frames, fn)
            if res.get("ms") is not None:
                note = f"x {num_chunks(ctx, frames)} chunks = {res['ms'] * num_chunks(ctx, frames):.2f} ms"
                res["note"] = (res.get("note", "") + "; " + note).lstrip("; ")
            return res

        run_row(ctx, frames, f"recurrent step, 1 chunk ({Tc}x{S} queries), {variant}", "fwd", body, flops,
                setup=prepare)

    # Every chunk of the sequence through the compiled step, back to back, carrying the state (what the recurrent
    # runner does): the host launches chunk c + 1 while the GPU runs chunk c, so per-call launch latency, which the
    # single-step rows above expose, is hidden as it is in the parallel form. Reported per chunk.
    C = num_chunks(ctx, frames)

    def seq_body():
        def fn(i):
            s, state = sets[i % len(sets)], None
            with torch.no_grad():
                for c in range(C):
                    _, state = ctx.compiled["step"](*(s[x][:, c * n:(c + 1) * n] for x in names), state, **step_kw)

        res = timed_compiled(ctx, "step", "step", frames, fn)
        if res.get("ms") is not None:
            res["note"] = f"{res['note']}; {res['ms']:.2f} ms for {C} chunks / {C}"
            res["ms"] = res["ms"] / C
        return res

    run_row(ctx, frames, f"recurrent steps, all {C} chunks back to back, compiled, per chunk", "fwd", seq_body,
            rehyat_flops(ctx, frames) / C)

    for variant, ms in fwd_ms.items():
        c = num_chunks(ctx, frames)
        ctx.rows.append({"frames": frames, "tokens": frames * S, "row": f"parallel form per chunk, {variant}",
                         "kind": "fwd", "status": "ok", "ms": ms / c, "tflops": rehyat_flops(ctx, frames) / c / (ms / c * 1e-3) / 1e12,
                         "speedup": None, "baseline": None, "peak_gib": None, "work_gib": None, "reps": None,
                         "note": f"rehyat_attention {variant} fwd / {c} chunks"})


def row_floor(ctx: Ctx, frames: int) -> None:
    flops = rehyat_flops(ctx, frames)
    ms = flops / (FLOOR_TFLOPS * 1e12) * 1e3
    base = ctx.baseline_ms.get((frames, "fwd"))
    ctx.rows.append({"frames": frames, "tokens": frames * ctx.args.frame_tokens,
                     "row": f"ReHyAt FLOP floor at {FLOOR_TFLOPS:.0f} TFLOP/s", "kind": "fwd", "status": "ok",
                     "ms": ms, "tflops": FLOOR_TFLOPS, "speedup": base / ms if base else None, "baseline": "fwd",
                     "peak_gib": None, "work_gib": None, "reps": None,
                     "note": f"{window_flops(ctx, frames) / 1e12:.3f} TFLOP windows + "
                             f"{linear_flops(ctx, frames) / 1e12:.3f} TFLOP linear"})


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def environment(ctx: Ctx) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
           "torch": torch.__version__, "python": sys.version.split()[0], "device": str(ctx.device)}
    if ctx.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(ctx.device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["sdpa_default"] = default_sdpa_backend(ctx)
        try:
            import triton  # lazily, only on CUDA

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device_name"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return env


def markdown(ctx: Ctx, env: dict) -> tuple[str, str]:
    """The Markdown report and the overall correctness verdict (PASS or FAIL)."""
    a = ctx.args
    lines = ["# ReHyAt attention benchmark", ""]
    lines.append(f"- command: `{env['command']}`")
    lines.append(f"- date: {env['date']}")
    dev = f"- device: {env['device_name']}; torch {env['torch']}"
    if ctx.device.type == "cuda":
        dev += (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, triton {env['triton']}; SDPA default backend for "
                f"one chunk window (what rehyat_attention uses): {env['sdpa_default']}")
    lines.append(dev)
    lines.append(f"- shapes: B={a.batch}, H={a.heads}, D={a.dim}, D'={a.feature_dim}, frame_tokens={a.frame_tokens}, "
                 f"chunk_frames={a.chunk_frames}, overlap_frames={a.overlap_frames}, {a.dtype}, causal, stabilizer lse; "
                 f"fq, fk = PolynomialFeatureMap outputs ({ctx.feature_dtype}; feature-map weights in {a.dtype})")
    timing = ("CUDA events, L2 flushed before each call" if ctx.device.type == "cuda" else "time.perf_counter")
    lines.append(f"- timing: median over repeats ({timing}), {a.sets} input sets rotated, {a.warmup} warm-up calls, "
                 f"about {a.budget} s per row (>= {a.min_reps}, <= {a.max_reps} repeats); compile: "
                 f"{'torch.compile(dynamic=False), mode default' if a.compile else 'off'}")
    lines.append("- TFLOP/s: full attention 4 N^2 D H (fwd), x3.5 for fwd+bwd; ReHyAt rows count the hybrid's own "
                 "FLOPs (softmax windows 4 n_q n_k D H per chunk + linear 2 N D' D H x2), x3.5 for fwd+bwd; "
                 "feature map 2 N H (D D' + D'^2)")
    lines.append(f"- speed-up: baseline ms / row ms, baseline = {ctx.baseline_name or 'none'} of the same frame count "
                 "and kind (fwd or fwd+bwd); peak GiB = torch.cuda.max_memory_allocated during the row "
                 "(inputs included), +GiB = the part above what was allocated when the row began")
    lines.append("")
    lines.append("## Correctness")
    lines.append("")
    lines.append("| check | rel. error | tol | result |")
    lines.append("|---|---|---|---|")
    for c in ctx.checks:
        err = "n/a" if c["rel_err"] is None else f"{c['rel_err']:.2e}"
        note = f" ({c['note']})" if c["note"] else ""
        lines.append(f"| {c['check']}{note} | {err} | {c['tol']:.0e} | {c['result']} |")
    overall = "PASS" if ctx.checks and all(c["result"] == "PASS" for c in ctx.checks) else "FAIL"
    lines.append("")
    lines.append(f"Correctness overall: **{overall}**")
    lines.append("")
    lines.append("## Timings")
    lines.append("")
    lines.append("| frames | tokens | row | kind | ms | TFLOP/s | speed-up | peak GiB | +GiB | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in ctx.rows:
        ms = fmt(r["ms"], ".3f") if r["status"] == "ok" else r["status"]
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['frames']} | {r['tokens']:,} | {r['row']} | {r['kind']} | {ms} | {fmt(r['tflops'], '.1f')} "
                     f"| {sp} | {fmt(r['peak_gib'], '.2f')} | {fmt(r['work_gib'], '.2f')} | {r['note']} |")
    return "\n".join(lines) + "\n", overall


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=None, help="latent frame counts (default 21 42 84; "
                   "--quick: 7 14)")
    p.add_argument("--frame-tokens", type=int, default=None, help="tokens per latent frame (default 1560; --quick: 64)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128, help="head dim D")
    p.add_argument("--feature-dim", type=int, default=256, help="feature dim D' of the feature map")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test (implies --no-compile "
                   "unless --compile is given)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile rows (default on)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-full-attention", action="store_true", help="skip the full-attention rows")
    p.add_argument("--check-frames", type=int, default=7, help="frames of the float64 reference check")
    p.add_argument("--check-tokens", type=int, default=None, help="tokens per frame of the reference check "
                   "(default min(390, frame_tokens))")
    p.add_argument("--sets", type=int, default=None, help="input sets rotated between calls (default 3; --quick: 2)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per row (default 1.0; "
                   "--quick: 0.05)")
    p.add_argument("--min-reps", type=int, default=None, help="default 10 (--quick: 3)")
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 2; --quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bench_attention.json and bench_attention.md")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.frames is None:
        args.frames = [7, 14] if args.quick else [21, 42, 84]
    if args.frame_tokens is None:
        args.frame_tokens = 64 if args.quick else 1560
    if args.compile is None:
        args.compile = not args.quick
    if args.budget is None:
        args.budget = 0.05 if args.quick else 1.0
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.sets is None:
        args.sets = 2 if args.quick else 3
    if args.min_reps is None:
        args.min_reps = 3 if args.quick else 10
    if args.check_tokens is None:
        args.check_tokens = min(390, args.frame_tokens)
    args.backends = ["cudnn", "flash"] + (["math"] if args.device.startswith("cpu") else [])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.compile:
        import torch._dynamo as dynamo  # one graph per frame count and grad mode: allow more than the default 8

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    ctx = Ctx(args)
    env = environment(ctx)
    log(f"{env['device_name']}, torch {env['torch']}; command: {env['command']}")
    log(f"frames {args.frames}, frame_tokens {args.frame_tokens}, H={args.heads}, D={args.dim}, "
        f"D'={args.feature_dim}, T_c={args.chunk_frames}, T_o={args.overlap_frames}, {args.dtype}, "
        f"compile {'on' if args.compile else 'off'}")

    check_small(ctx)
    for frames in args.frames:
        log(f"--- {frames} frames, {frames * args.frame_tokens:,} tokens, {num_chunks(ctx, frames)} chunks ---")
        sets = []
        try:
            sets = [make_inputs(ctx, frames, args.frame_tokens) for _ in range(args.sets)]
        except torch.OutOfMemoryError:
            log(f"  out of memory making {args.sets} input sets at {frames} frames: skipped")
            ctx.rows.append({"frames": frames, "tokens": frames * args.frame_tokens, "row": "input sets",
                             "kind": "-", "status": "OOM", "ms": None, "tflops": None, "speedup": None,
                             "baseline": None, "peak_gib": None, "work_gib": None, "reps": None,
                             "note": "out of memory allocating the inputs"})
            del sets
            free_memory(ctx.device)
            continue
        if not args.no_full_attention:
            rows_full_attention(ctx, frames, sets)
        rows_windows(ctx, frames, sets)
        fwd_ms = rows_rehyat(ctx, frames, sets)
        rows_feature_map(ctx, frames, sets)
        rows_recurrent(ctx, frames, sets, fwd_ms)
        row_floor(ctx, frames)
        del sets
        free_memory(ctx.device)

    md, overall = markdown(ctx, env)
    log(f"correctness: {overall}; total {time.perf_counter() - T0:.1f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump({"environment": env, "config": {k: v for k, v in vars(args).items()},
                       "correctness": overall, "checks": ctx.checks, "rows": ctx.rows,
                       "total_s": time.perf_counter() - T0}, f, indent=2)
        with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
            f.write(md)
        log(f"wrote {args.out}/bench_attention.json and bench_attention.md")
    print("", flush=True)
    print(md, end="", flush=True)
    return 0 if overall == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
