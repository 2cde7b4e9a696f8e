"""End-to-end speed of one denoising forward: the Wan2.1-1.3B-geometry teacher against ReHyAt conversions.

Usage (from the repository root):

    python benchmarks/bench_end_to_end.py [--out DIR] [--frames 81 321] [--repeats 3] [--compile] [--sdpa cudnn]
    python benchmarks/bench_end_to_end.py --geometry wan2.2-5b [--out DIR]     # Wan2.2-TI2V-5B, 704x1280
    python benchmarks/bench_end_to_end.py --device cpu --quick [--out DIR]     # tiny model, CPU smoke test, seconds

``--geometry wan2.2-5b``: the same rows on Wan2.2-TI2V-5B's transformer (24 heads x 128, FFN 14336, 48 latent
channels, 5.0B parameters, random weights) at 704x1280 (its VAE compresses 16x: latents 44x80, 880 tokens per latent
frame), 121 and 481 frames (31 and 121 latent frames, 27,280 and 106,480 tokens), the teacher beside it in the same
run; no speed-up targets (the claim below is the 1.3B's). With ``--quick`` it builds a tiny model of the 5B's channels
and VAE compression instead.

On an H200 the default run (eager, 81 and 321 frames) should take about 2 minutes: the teacher forward is about
0.6 s at 21 latent frames and 6.2 s at 81 (measured by bench_memory.py), 4 forwards per row. ``--compile`` adds
the compilation of each model at each length (minutes): run it as a call of its own.

Claim under test: on a Wan2.1-1.3B-geometry transformer (random weights, 480x832, bfloat16), with all 30 blocks
converted one denoising forward is >= 2.5x faster than the teacher at 81 frames and >= 8x at 321 frames; with 15
blocks converted >= 1.5x at 81 frames. Tokens per second and peak memory are reported.

One forward = ``transformer(latents [1, 16, T, 60, 104], timestep [500], text embeddings [1, 512, 4096])``, batch 1
(one branch of classifier-free guidance). Videos of 81 and 321 frames are 21 and 81 latent frames (32,760 and
126,360 tokens). Rows, all from one set of random weights (bfloat16, float32 where ``from_pretrained`` keeps it):

* teacher: the unconverted model, full softmax attention through diffusers' default processor (SDPA);
* ReHyAt 30/30 parallel: ``convert_wan(blocks="all", chunk_frames=3, overlap_frames=1)``, the parallel form;
* ReHyAt 30/30 recurrent: the same model through ``rehyat.models.recurrent_forward`` (chunk by chunk, constant
  state);
* ReHyAt 15/30 parallel: every other block converted (blocks 0, 2, ..., 28; ``--half`` picks another half), the
  other 15 keep the teacher's full softmax attention;
* with ``--compile``: the parallel rows (and the 30/30 recurrent row) again with every transformer block under
  ``torch.compile`` (regional compilation, ``rehyat.models.compile_blocks``; in the recurrent form the attention
  step is compiled on its own, outside the blocks' graphs; compile failures are reported in the row, not fatal),
  speed-up against the compiled teacher.

Timing: CUDA events around each forward, ``--warmup`` untimed forwards first (at least 2 for compiled rows; they
include cuDNN plan building and compilation), median of ``--repeats`` (fewer when one forward exceeds ``--budget`` / repeats). Peak memory:
``torch.cuda.max_memory_allocated`` over the timed forwards; "above weights" subtracts what was allocated before.
All attention calls prefer the ``--sdpa`` backend (default cuDNN, the fastest full attention on an H200; the
other backends stay as fallbacks), for the teacher and for ReHyAt alike.

Correctness in the same run: a ReHyAt model with ``chunk_frames`` >= the frames (one chunk: exactly full softmax
attention) must equal the teacher on a short input (relative error <= 1e-2 in bfloat16; exit status 1 otherwise);
and the recurrent form must match the parallel form of the 30/30 model on the first length (reported, tolerance
5e-2 after 30 random bfloat16 blocks).

The Markdown table is printed last, after device, torch version, date, command line and the verdicts;
``--out DIR`` writes ``DIR/bench_end_to_end.json`` and ``DIR/bench_end_to_end.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import statistics
import sys

import torch

from wan_bench_common import (  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
    GEOMETRIES, add_geometry_argument, build_model, device_name, feature_map_dtype, free_memory, gib, latent_frames,
    log, probe_sdpa, sdpa_context, short, timed_call,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# --quick: a tiny model of the same family (4 blocks, so "half" is 2 of 4) for a CPU smoke test.
QUICK_OVERRIDES = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=4, text_dim=64,
                       freq_dim=32)
CHECK_TOL = 1e-2  # chunk_frames >= frames must equal the teacher
RECURRENT_TOL = 5e-2  # recurrent vs parallel of the 30/30 model, after 30 random bfloat16 blocks
# (variant, video frames) -> minimum speed-up against the teacher (the targets, for the 1.3B geometry)
TARGETS = {("ReHyAt 30/30", 81): 2.5, ("ReHyAt 30/30", 321): 8.0, ("ReHyAt 15/30", 81): 1.5}


def targets_of(geometry: str) -> dict:
    """The speed-up targets of a ``--geometry``: the 1.3B's claims, none for another geometry."""
    return TARGETS if geometry == "wan2.1-1.3b" else {}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, device: torch.device, config: dict, dtype: torch.dtype):
        self.args, self.device, self.config, self.dtype = args, device, config, dtype
        self.cuda = device.type == "cuda"
        self.lat_h, self.lat_w = GEOMETRIES[args.geometry].latent_size(args.height, args.width)
        self.frame_tokens = (self.lat_h // 2) * (self.lat_w // 2)
        g = torch.Generator().manual_seed(args.seed + 1)
        self.embeds = torch.randn(1, args.text_len, config["text_dim"], generator=g).to(device, dtype)
        self.timestep = torch.tensor([500.0], device=device)
        self.rows: list[dict] = []
        self.outputs: dict = {}  # (variant, form, compiled, video frames) -> output on the first length

    def latents(self, T: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.args.seed + 2)
        x = torch.randn(1, self.config["in_channels"], T, self.lat_h, self.lat_w, generator=g)
        return x.to(self.device, self.dtype)

    def forward_fn(self, model, form: str, x):
        from rehyat.models import recurrent_forward

        e, t = self.embeds, self.timestep
        if form == "recurrent":
            return lambda: recurrent_forward(model, x, t, e)
        return lambda: model(x, t, e, return_dict=False)[0]

    def _time_once(self, fn) -> tuple[float, torch.Tensor]:
        return timed_call(fn, self.cuda)

    def row(self, variant: str, form: str, compiled: bool, model, video_frames: int, keep_output: bool = False):
        args, device = self.args, self.device
        T = latent_frames(video_frames)
        tokens = T * self.frame_tokens
        row = {"variant": variant, "form": form, "compiled": compiled, "video_frames": video_frames,
               "latent_frames": T, "tokens": tokens, "status": "ok", "note": "", "ms": None}
        name = f"{variant} {form}{' (compiled)' if compiled else ''} @ {video_frames} frames ({T} latent, {tokens:,} tokens)"
        free_memory(device)
        x = self.latents(T)
        before = torch.cuda.memory_allocated(device) if self.cuda else 0
        fn = self.forward_fn(model, form, x)
        out = None
        try:
            with torch.no_grad(), sdpa_context(args.sdpa, device):
                warm = []
                for _ in range(max(args.warmup, 2) if compiled else args.warmup):
                    ms, out = self._time_once(fn)
                    warm.append(ms)
                    out = None
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                reps = args.repeats
                if warm and warm[-1] * args.repeats > args.budget * 1e3:
                    reps = max(1, int(args.budget * 1e3 // warm[-1]))
                times = []
                for _ in range(reps):
                    out = None
                    ms, out = self._time_once(fn)
                    times.append(ms)
            row.update(ms=statistics.median(times), min_ms=min(times), reps=reps, warmup_ms=warm,
                       tokens_per_s=tokens / (statistics.median(times) / 1e3))
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(device)
                row.update(peak_gib=gib(peak), above_gib=gib(peak - before))
            if keep_output:
                self.outputs[(variant, form, compiled, video_frames)] = out.detach().clone()
        except torch.OutOfMemoryError:
            row.update(status="OOM", note="out of memory")
        except Exception as exc:  # noqa: BLE001 - reported in the table (compile failures above all)
            row.update(status="error", note=short(exc))
        out = x = fn = None
        free_memory(device)
        if row["status"] == "ok":
            mem = f", peak {row['peak_gib']:.2f} GiB (+{row['above_gib']:.2f})" if self.cuda else ""
            first = f", first call {row['warmup_ms'][0] / 1e3:.1f} s" if row["warmup_ms"] else ""
            log(f"  {name}: {row['ms']:.1f} ms (median of {row['reps']}){mem}{first}")
        else:
            log(f"  {name}: {row['status']} {row['note']}")
        self.rows.append(row)
        return row


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def half_blocks(n: int, which: str) -> list[int]:
    return {"even": list(range(0, n, 2)), "odd": list(range(1, n, 2)), "first": list(range(n // 2)),
            "last": list(range(n - n // 2, n))}[which]


def run(args) -> tuple[dict, list[dict], list[dict], list[str]]:
    from rehyat.models import convert_wan

    device = torch.device(args.device)
    geometry = GEOMETRIES[args.geometry]
    config = dict(geometry.config, **QUICK_OVERRIDES) if args.quick else geometry.config
    targets = targets_of(args.geometry)
    dtype = getattr(torch, args.dtype)
    n_blocks = config["num_layers"]
    args.sdpa = probe_sdpa(args.sdpa, device)
    log(f"building the {'tiny (--quick)' if args.quick else geometry.name + '-geometry'} transformer "
        f"(random weights, {dtype}) on {device}")
    teacher = build_model(config, device, dtype, args.seed, args.keep_fp32_modules)
    n_params = sum(p.numel() for p in teacher.parameters())
    log(f"  {n_params / 1e6:,.1f}M parameters, dtype {teacher.dtype}")
    bench = Bench(args, device, config, dtype)
    frames = sorted(args.frames)
    checks: list[dict] = []
    all_name, half_name = f"ReHyAt {n_blocks}/{n_blocks}", f"ReHyAt {n_blocks // 2}/{n_blocks}"
    half = half_blocks(n_blocks, args.half)
    conv = dict(chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames)

    # 1. Sanity check: one chunk covering every frame is exactly full softmax attention.
    Tc = args.check_frames
    log(f"check: ReHyAt with chunk_frames={Tc} >= {Tc} latent frames vs the teacher")
    try:
        one_chunk = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=Tc,
                                overlap_frames=args.overlap_frames)
        x = bench.latents(Tc)
        with torch.no_grad(), sdpa_context(args.sdpa, device):
            ref = teacher(x, bench.timestep, bench.embeds, return_dict=False)[0]
            got = one_chunk(x, bench.timestep, bench.embeds, return_dict=False)[0]
        err = rel_error(got, ref)
        finite = bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())
        checks.append({"check": f"ReHyAt all blocks, chunk_frames={Tc} >= frames == teacher ({Tc} latent frames, "
                                f"{Tc * bench.frame_tokens:,} tokens)", "rel_error": err, "tol": CHECK_TOL,
                       "result": ("PASS" if err <= CHECK_TOL else "FAIL") if finite else "FAIL (non-finite output)",
                       "required": True})
        del one_chunk, x, ref, got
    except Exception as exc:  # noqa: BLE001
        checks.append({"check": "ReHyAt chunk_frames >= frames == teacher", "rel_error": None, "tol": CHECK_TOL,
                       "result": f"FAIL ({short(exc)})", "required": True})
    log(f"  {checks[-1]['result']} (relative error {checks[-1]['rel_error']})")
    free_memory(device)

    # 2. Teacher.
    log("teacher (full softmax attention, diffusers' processor)")
    for vf in frames:
        bench.row("teacher", "parallel", False, teacher, vf)

    # 3. All blocks converted: parallel and recurrent forms.
    log(f"{all_name}: convert_wan(blocks='all', chunk_frames={args.chunk_frames}, "
        f"overlap_frames={args.overlap_frames})")
    torch.manual_seed(args.seed + 3)
    model = convert_wan(copy.deepcopy(teacher), blocks="all", **conv)
    fm_dtype = feature_map_dtype(model)
    log(f"  feature maps in {fm_dtype}")
    for vf in frames:
        bench.row(all_name, "parallel", False, model, vf, keep_output=vf == frames[0])
        bench.row(all_name, "recurrent", False, model, vf, keep_output=vf == frames[0])
    a = bench.outputs.get((all_name, "parallel", False, frames[0]))
    b = bench.outputs.get((all_name, "recurrent", False, frames[0]))
    if a is not None and b is not None:
        err = rel_error(b, a)
        checks.append({"check": f"{all_name} recurrent == parallel ({latent_frames(frames[0])} latent frames)",
                       "rel_error": err, "tol": RECURRENT_TOL, "result": "PASS" if err <= RECURRENT_TOL else "FAIL",
                       "required": False})
        log(f"  check recurrent vs parallel: {checks[-1]['result']} (relative error {err:.2e})")
    bench.outputs.clear()
    del model, a, b
    free_memory(device)

    # 4. Half of the blocks converted.
    log(f"{half_name}: convert_wan(blocks={half}, ...); the other blocks keep full softmax attention")
    torch.manual_seed(args.seed + 4)
    model = convert_wan(copy.deepcopy(teacher), blocks=half, **conv)
    for vf in frames:
        bench.row(half_name, "parallel", False, model, vf)
    del model
    free_memory(device)

    # 5. Compiled rows, after every eager row (compilation leaves worker processes and caches behind). The
    # converted copies are made before the teacher itself is compiled, in place, last.
    if args.compile:
        for name, blocks, seed in ((all_name, "all", args.seed + 3), (half_name, half, args.seed + 4)):
            torch.manual_seed(seed)
            model = convert_wan(copy.deepcopy(teacher), blocks=blocks, **conv)
            compiled_rows(bench, name, model, frames, recurrent=blocks == "all")
            del model
            free_memory(device)
        compiled_rows(bench, "teacher", teacher, frames)

    speedups(bench.rows, all_name, half_name, args.quick, targets)
    quick = f"tiny (--quick): NOT the {geometry.name} geometry, its {config['in_channels']} latent channels"
    meta = {
        "model": f"{quick if args.quick else geometry.name + ' geometry'}, random "
                 f"weights, {n_params / 1e6:,.1f}M parameters, "
                 + (f"{args.dtype}, float32 where from_pretrained keeps it (--keep-fp32-modules)"
                    if args.keep_fp32_modules else f"all {args.dtype} (.to({args.dtype}))"),
        "geometry": f"{args.height}x{args.width} pixels -> latents {bench.lat_h}x{bench.lat_w}, "
                    f"{bench.frame_tokens} tokens per latent frame",
        "forward": f"batch 1, timestep [500], text embeddings [1, {args.text_len}, {config['text_dim']}]",
        "conversion": f"chunk_frames={args.chunk_frames}, overlap_frames={args.overlap_frames}, causal, polynomial "
                      f"feature maps (random, {fm_dtype}; the fused Triton kernel where it applies: CUDA, 16-bit, no "
                      f"grad; '(reference feature maps)' rows force the PyTorch reference); {half_name} = blocks "
                      f"{half} ({args.half})",
        "sdpa": args.sdpa, "timing": f"CUDA events, {args.warmup} warm-up, median of {args.repeats}"
        if bench.cuda else f"perf_counter, {args.warmup} warm-up, median of {args.repeats}",
    }
    return meta, bench.rows, checks, verdicts(bench.rows, all_name, half_name, args.quick, targets)


def compiled_rows(bench: Bench, variant: str, model, frames: list[int], recurrent: bool = False) -> None:
    """The compiled rows of one model: parallel form, and with ``recurrent`` the chunk-by-chunk form too (its
    attention step compiled on its own: ``rehyat.models.compile_blocks``)."""
    from rehyat.models import compile_blocks

    log(f"{variant}: torch.compile of every block")
    try:
        compile_blocks(model)
    except Exception as exc:  # noqa: BLE001
        for vf in frames:
            bench.rows.append({"variant": variant, "form": "parallel", "compiled": True, "video_frames": vf,
                               "latent_frames": latent_frames(vf), "tokens": latent_frames(vf) * bench.frame_tokens,
                               "status": "error", "note": short(exc), "ms": None})
        log(f"  compile failed: {short(exc)}")
        return
    for vf in frames:
        bench.row(variant, "parallel", True, model, vf)
        if recurrent:
            bench.row(variant, "recurrent", True, model, vf)
    if recurrent and bench.cuda:
        # A/B of the feature maps, same model: the rows above take the fused Triton kernel where it applies
        # (CUDA, 16-bit, no grad); this one forces the PyTorch reference (compiled with the rest of the block).
        from rehyat.modules import set_fused_feature_maps

        if set_fused_feature_maps(model, False):
            for vf in frames:
                bench.row(f"{variant} (reference feature maps)", "parallel", True, model, vf)
            set_fused_feature_maps(model, True)


def target_frames(frames: list[int], quick: bool) -> dict[int, int]:
    """Measured video frames -> the frames of the target they stand for (--quick: the first two lengths stand for
    81 and 321, so the verdict code runs; its verdicts read n/a)."""
    if quick:
        return dict(zip(sorted(frames), (81, 321)))
    return {f: f for f in frames}


def speedups(rows: list[dict], all_name: str, half_name: str, quick: bool, targets: dict) -> None:
    tf = target_frames(sorted({r["video_frames"] for r in rows}), quick)
    teacher = {(r["compiled"], r["video_frames"]): r["ms"] for r in rows
               if r["variant"] == "teacher" and r["ms"] is not None}
    for r in rows:
        base = teacher.get((r["compiled"], r["video_frames"]))
        r["speedup"] = base / r["ms"] if base and r["ms"] and r["variant"] != "teacher" else None
        key = {all_name: "ReHyAt 30/30", half_name: "ReHyAt 15/30"}.get(r["variant"])
        target = targets.get((key, tf.get(r["video_frames"])))
        r["target"] = target
        if target is None or r["variant"] == "teacher":
            r["result"] = ""
        elif quick:
            r["result"] = "n/a (--quick)"
        elif r["speedup"] is None:
            r["result"] = "no data"
        else:
            r["result"] = "PASS" if r["speedup"] >= target else "FAIL"


def verdicts(rows: list[dict], all_name: str, half_name: str, quick: bool, targets: dict) -> list[str]:
    out = [] if targets else ["no speed-up targets for this geometry (the targets are the 1.3B's): speed-ups only"]
    measured = {v: k for k, v in target_frames(sorted({r["video_frames"] for r in rows}), quick).items()}
    for (key, tvf), target in targets.items():
        variant = {"ReHyAt 30/30": all_name, "ReHyAt 15/30": half_name}[key]
        vf = measured.get(tvf)
        rs = [r for r in rows if r["variant"] == variant and r["video_frames"] == vf and r.get("speedup")]
        if not rs:
            out.append(f"{key} at {tvf} frames, target >= {target:g}x: not measured")
            continue
        parts = [f"{r['form']}{' compiled' if r['compiled'] else ''} {r['speedup']:.2f}x" for r in rs]
        eager = [r for r in rs if not r["compiled"]]
        best = max(eager or rs, key=lambda r: r["speedup"])
        verdict = "n/a (--quick: tiny model)" if quick else ("PASS" if best["speedup"] >= target else "FAIL")
        stands = f" (standing for {tvf})" if vf != tvf else ""
        out.append(f"{variant} at {vf} frames{stands}, target >= {target:g}x vs the teacher: {verdict} "
                   f"(best eager form: {best['form']} {best['speedup']:.2f}x; all: {', '.join(parts)})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(rows: list[dict], checks: list[dict]) -> str:
    head = ("| variant | form | compiled | video frames | latent frames | tokens | ms / forward | tokens/s "
            "| peak (GiB) | above weights (GiB) | speed-up vs teacher | target | result |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = fmt(r["ms"], ".1f") if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        cells = [r["variant"], r["form"], "yes" if r["compiled"] else "no", str(r["video_frames"]),
                 str(r["latent_frames"]), f"{r['tokens']:,}", ms, fmt(r.get("tokens_per_s"), ",.0f"),
                 fmt(r.get("peak_gib"), ".2f"), fmt(r.get("above_gib"), ".2f"),
                 fmt(r.get("speedup"), ".2f", "-" if r["variant"] != "teacher" else "1.00 (base)"),
                 f">= {r['target']:g}x" if r.get("target") else "", r.get("result", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| check | relative error | tolerance | result |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['check']}{'' if c['required'] else ' (informative)'} | {fmt(c['rel_error'], '.2e')} "
                     f"| {c['tol']:g} | {c['result']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke test, seconds)")
    add_geometry_argument(p)
    p.add_argument("--frames", type=int, nargs="+", default=None, help="video frames, 4k+1 (default 81 321, "
                   "wan2.2-5b: 121 481; --quick: 17 33)")
    p.add_argument("--height", type=int, default=None, help="default 480, wan2.2-5b: 704 (--quick: 128)")
    p.add_argument("--width", type=int, default=None, help="default 832, wan2.2-5b: 1280 (--quick: 128)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; --quick: 16)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (--quick on the CPU: float32)")
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--half", default="even", choices=["even", "odd", "first", "last"],
                   help="which half of the blocks the 15/30 model converts (default even: 0, 2, ..., 28)")
    p.add_argument("--check-frames", type=int, default=None, help="latent frames of the one-chunk check "
                   "(default 5; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed forwards per row at most "
                   "(repeats are reduced, never below 1)")
    p.add_argument("--compile", action="store_true", help="also time the parallel rows with torch.compile'd blocks "
                   "(adds compile time: minutes)")
    p.add_argument("--sdpa", default="cudnn", choices=["cudnn", "flash", "auto"],
                   help="SDPA backend preferred for every attention call (GPU; others stay as fallbacks)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1: the tiny model's ops are "
                   "too small to gain from more, and a busy core makes OpenMP waits very slow)")
    p.add_argument("--keep-fp32-modules", action="store_true",
                   help="cast as from_pretrained(torch_dtype=bfloat16) does (rope, time_embedder, scale_shift_table, "
                        "norm1-3 stay float32) instead of .to(bfloat16) of everything (the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bench_end_to_end.json and bench_end_to_end.md")
    args = p.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available() and not args.quick:
            raise SystemExit("bench_end_to_end.py: no CUDA device, and the default sizes (a Wan2.1-1.3B- or "
                             "Wan2.2-5B-geometry model at 480x832 or 704x1280) would take hours on the CPU: pass "
                             "--quick for the CPU smoke test, or --device cpu to run them anyway")
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} requested but CUDA is not available")
    q = args.quick
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    geometry = GEOMETRIES[args.geometry]
    args.frames = args.frames or ([17, 33] if q else list(geometry.frames))
    for f in args.frames:
        latent_frames(f)
    args.height = args.height or (128 if q else geometry.height)
    args.width = args.width or (128 if q else geometry.width)
    geometry.latent_size(args.height, args.width)  # SystemExit for a size the geometry cannot take
    args.text_len = args.text_len or (16 if q else 512)
    args.dtype = args.dtype or ("float32" if q and device.type == "cpu" else "bfloat16")
    args.check_frames = args.check_frames or (3 if q else 5)
    if device.type == "cpu" and not q:
        log(f"warning: the full {geometry.name} geometry on the CPU takes hours; use --quick")

    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    log(f"bench_end_to_end: device {args.device}, frames {args.frames}, {args.dtype}")
    meta, rows, checks, verdict_lines = run(args)

    import diffusers

    info = {"device": device_name(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, **meta}
    lines = ["# bench_end_to_end: one denoising forward, teacher vs ReHyAt", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "Verdicts (speed-up = teacher ms / variant ms, same run, same compile setting):", ""]
    lines += [f"- {v}" for v in verdict_lines]
    lines += [f"- check: {c['check']}: {c['result']} (relative error {fmt(c['rel_error'], '.2e')}, "
              f"tolerance {c['tol']:g}{'' if c['required'] else ', informative'})" for c in checks]
    text = "\n".join(lines) + "\n\n" + markdown(rows, checks) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_end_to_end.json"), "w") as f:
            json.dump({"info": info, "verdicts": verdict_lines, "checks": checks, "rows": rows}, f, indent=2,
                      default=str)
        with open(os.path.join(args.out, "bench_end_to_end.md"), "w") as f:
            f.write(text)
        log(f"wrote {os.path.join(args.out, 'bench_end_to_end.json')} and bench_end_to_end.md")
    print("\n" + text, flush=True)
    failed = [c for c in checks if c["required"] and not str(c["result"]).startswith("PASS")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
