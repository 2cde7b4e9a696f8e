"""Peak memory and time per denoising step of ReHyAt generation against the video length.

Usage (from the repository root):

    python benchmarks/bench_memory.py [--out DIR] [--frames 81 321 1281] [--steps 2] [--max-seconds 60] [--cfg]
    python benchmarks/bench_memory.py --device cpu [--out DIR]        # tiny model, one subprocess per row, ~1 min
    python benchmarks/bench_memory.py --device cpu --smoke            # the GPU code path, tiny model (a script check)
    python benchmarks/bench_memory.py --geometry wan2.2-5b [--out DIR] # Wan2.2-TI2V-5B geometry, 704x1280
    python benchmarks/bench_memory.py --compile --steps 3 --frames 81 321 [--out DIR]  # blocks compiled (CUDA default)

On an H200 the default GPU run takes about 2-3 minutes (one measured run of an earlier version: 2 steps,
teacher 0.63 / 6.2 s per step at 21 / 81 latent frames, teacher at 321 latent frames skipped, est. ~200 s).

Claim under test: with every block converted, the peak memory of recurrent and streaming generation does not
grow with the number of frames, while parallel generation (teacher or ReHyAt) grows with it.

GPU mode (default when CUDA is available): a Wan2.1-T2V-1.3B-geometry ``WanTransformer3DModel`` (30 blocks,
12 heads x 128, FFN 8960, text_dim 4096) with random weights in bfloat16, at 480x832 (latents 60x104, 1,560 tokens
per latent frame), videos of 81 / 321 / 1,281 frames = 21 / 81 / 321 latent frames. No VAE and no text encoder at
this scale: the pipeline (``ReHyAtVideoPipeline`` with ``vae=None``, ``output_type="latent"``,
``keep_video=False``) generates latents from random text embeddings ``[1, 512, 4096]``; by default with guidance
off (batch 1), with ``--cfg`` with classifier-free guidance 5.0 (batch 2, as the pipeline runs it). Rows:

* teacher parallel: the unconverted model (full softmax attention, diffusers' processor);
* ReHyAt parallel / recurrent / streaming: the same weights after ``convert_wan(blocks="all", chunk_frames=3,
  overlap_frames=1)`` (random feature maps), run through the pipeline's three modes.

Each row generates with ``--steps`` denoising steps (default 2; 50 would take far too long). Peak memory is
``torch.cuda.max_memory_allocated`` over the whole generation (reset per row); "above weights" subtracts what was
allocated before the row (weights, embeddings). Time per step is the transformer's forward time of one denoising
step (CUDA events in forward hooks; mean of the steps after the first, which carry first-call costs); time per
latent frame divides it by the latent frames. Columns marked "est." are extrapolations, never measurements:
"est. 50 steps" multiplies the time per step by 50, and a row whose predicted run time (from the previous length
of the same mode: quadratic in tokens for the teacher, linear for ReHyAt) exceeds ``--max-seconds`` is not run
and reads "skipped (est. X s)". Out-of-memory rows (and any other failure) become the row's status and the run
goes on. Streaming keeps one transformer state per denoising step (constant in frames); the last column gives the
bytes a state's tensors cover (``TransformerState.nbytes()``) and the bytes their storages hold (a slice of a
bigger buffer keeps all of it alive), the notes the streaming total for 50 steps (est.). ``--keep-fp32-modules``
casts like ``from_pretrained(torch_dtype=torch.bfloat16)`` instead of ``.to(torch.bfloat16)``.

``--geometry wan2.2-5b``: the same rows on Wan2.2-TI2V-5B's transformer (24 heads x 128, FFN 14336, 48 latent
channels, 5.0B parameters, random weights, text_dim 4096) at 704x1280 (its VAE compresses 16x: latents 44x80, 880
tokens per latent frame), videos of 121 / 481 / 1,921 frames = 31 / 121 / 481 latent frames (27,280 / 106,480 /
423,280 tokens), the teacher beside it. In CPU mode and with ``--smoke`` it takes the tiny models of that
geometry (48 latent channels; in CPU mode the tiny Wan2.2-style VAE, 16x).

CPU mode (``--device cpu``): the tiny Wan transformer of ``rehyat.testing`` (2 blocks, all converted, chunk 2,
overlap 1) with the tiny causal VAE, at 64x64 pixels, videos of 17 / 65 / 257 / 1,025 frames. Resident memory
peaks are process-wide, so each (mode, length, phase) runs in its own child process (forked from a server that
has already imported torch and diffusers), which resets its peak (``/proc/self/clear_refs``), builds the model,
warms up on a 1-frame video, then generates and reads ``VmHWM``. Two phases per row: "denoise" (latents only,
``output_type="latent"``) and "generate" (the VAE decodes too, ``keep_video=False`` with an ``on_frames``
callback: only streaming decodes chunk by chunk; parallel and recurrent decode the whole video at the end).

The Markdown table is printed last, after the device, torch version, date and command line; ``--out DIR`` writes
``DIR/bench_memory.json`` and ``DIR/bench_memory.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shlex
import sys
import time

import torch

from wan_bench_common import (  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
    GEOMETRIES, add_geometry_argument, build_model, device_name, feature_map_dtype, free_memory, gib, latent_frames,
    log, probe_sdpa, sdpa_context,
)

from rehyat.evaluation.isolation import isolated_context, peak_rss, proc_status, reset_peak_rss, run_isolated

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("teacher parallel", "ReHyAt parallel", "ReHyAt recurrent", "ReHyAt streaming")
PIPELINE_MODE = {"teacher parallel": "parallel", "ReHyAt parallel": "parallel", "ReHyAt recurrent": "recurrent",
                 "ReHyAt streaming": "streaming"}
FULL_STEPS = 50
# --smoke: the GPU code path with a tiny model (runs on the CPU in seconds; checks the script, measures nothing).
SMOKE_OVERRIDES = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=64,
                       freq_dim=32)


def mib(n: float) -> float:
    return n / 2**20


# ----------------------------------------------------------------------------------------------------------------
# Per-call timing of the transformer (forward hooks)
# ----------------------------------------------------------------------------------------------------------------
def held_bytes(states) -> int:
    """Bytes of the distinct storages behind the recurrent states' tensors."""
    storages = {}
    for st in states:
        for t in (st.s, st.z, st.k, st.v, st.fk):
            u = t.untyped_storage()
            storages[(u.device.type, u.data_ptr())] = u.nbytes()
    return sum(storages.values())


class CallTimer:
    """Times every forward call of ``module`` (CUDA events or perf_counter) and records recurrent state sizes."""

    def __init__(self, module, cuda: bool):
        self.module, self.cuda = module, cuda
        self.marks: list = []
        self.state_bytes = 0  # what the states' tensors cover (TransformerState.nbytes())
        self.state_held = 0  # what their storages hold (a view into a bigger buffer keeps all of it alive)
        self._start = None
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, module, args):
        self._start = self._now()

    def _post(self, module, args, output):
        self.marks.append((self._start, self._now()))
        ctx = getattr(module, "_rehyat_context", None)
        if ctx is not None and ctx.mode == "recurrent":
            self.state_bytes = max(self.state_bytes, sum(s.nbytes() for s in ctx.states.values()))
            self.state_held = max(self.state_held, held_bytes(ctx.states.values()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def per_step_seconds(calls: list[float], mode: str, steps: int, n_chunks: int) -> list[float]:
    """Group transformer calls into denoising steps (order of the pipeline's loops)."""
    if mode == "parallel":
        groups = [calls[i : i + 1] for i in range(steps)]
    elif mode == "recurrent":
        groups = [calls[i * n_chunks : (i + 1) * n_chunks] for i in range(steps)]
    else:  # streaming: chunk 0 steps 0..S-1, chunk 1 steps 0..S-1, ...
        groups = [calls[i::steps] for i in range(steps)]
    return [sum(g) for g in groups]


def steady_step(step_s: list[float]) -> float:
    """Mean time of the steps after the first (the first carries first-call costs); the only step if just one."""
    rest = step_s[1:] if len(step_s) > 1 else step_s
    return sum(rest) / len(rest)


def generate(pipe, mode: str, num_frames: int, height: int, width: int, embeds, steps: int, guidance: float,
             output_type: str = "latent") -> int:
    """One pipeline generation (sizes in the pipeline's input space: latents when it has no VAE); returns the
    number of frames handed to ``on_frames``."""
    count = [0]

    def on_frames(frames):
        count[0] += frames.shape[0]

    pipe(prompt_embeds=embeds, num_frames=num_frames, height=height, width=width,
         num_inference_steps=steps, guidance_scale=guidance, seed=0, mode=mode, output_type=output_type,
         on_frames=on_frames, keep_video=False, progress=False)
    return count[0]


# ----------------------------------------------------------------------------------------------------------------
# GPU mode
# ----------------------------------------------------------------------------------------------------------------
def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def gpu_row(pipe, label: str, video_frames: int, args, embeds, geometry) -> dict:
    """Measure one (mode, length) generation (GPU mode; on the CPU only with --smoke, without memory columns)."""
    device = pipe.device
    cuda = _cuda(device)
    lat_h, lat_w, frame_tokens, chunk = geometry
    T = latent_frames(video_frames)
    mode = PIPELINE_MODE[label]
    row = {"mode": label, "video_frames": video_frames, "latent_frames": T, "tokens": T * frame_tokens,
           "status": "ok", "note": ""}
    free_memory(device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    timer = CallTimer(pipe.transformer, cuda=cuda)
    failure = None
    t = time.perf_counter()
    try:
        with sdpa_context(args.sdpa, device):
            generate(pipe, mode, T, lat_h, lat_w, embeds, args.steps, args.guidance)
        if cuda:
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        failure = ("OOM", "out of memory")
    except Exception as exc:  # noqa: BLE001 - any failure becomes the row's status; the run goes on
        failure = ("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}")
    wall = time.perf_counter() - t
    timer.close()
    if failure:  # handled outside the except block, so the traceback no longer holds the tensors
        timer.marks.clear()
        free_memory(device)
        row.update(status=failure[0], note=failure[1], wall_s=None)
        log(f"  {label} {video_frames} frames: {failure[0]} {failure[1]}")
        return row
    calls = timer.seconds()
    step_s = per_step_seconds(calls, mode, args.steps, math.ceil(T / chunk))
    step = steady_step(step_s)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    row.update(
        peak_gib=None if peak is None else gib(peak), above_gib=None if peak is None else gib(peak - before),
        reserved_gib=gib(torch.cuda.max_memory_reserved(device)) if cuda else None,
        step_s=step, step_s_all=step_s, frame_ms=step / T * 1e3, est_full_s=step * FULL_STEPS, wall_s=wall,
        state_mib=mib(timer.state_bytes) if timer.state_bytes else None,
        state_held_mib=mib(timer.state_held) if timer.state_held else None, calls=len(calls),
    )
    mem = f"peak {gib(peak):.2f} GiB (+{gib(peak - before):.2f} above weights), " if peak is not None else ""
    log(f"  {label} {video_frames} frames ({T} latent, {T * frame_tokens:,} tokens): {mem}{step:.3f} s/step, "
        f"wall {wall:.1f} s")
    free_memory(device)
    return row


def run_gpu(args) -> tuple[list[dict], dict, list[str]]:
    from rehyat.models import compile_blocks, convert_wan
    from rehyat.pipelines import ReHyAtVideoPipeline

    device = torch.device(args.device)
    dtype = torch.bfloat16
    geo = GEOMETRIES[args.geometry]
    config = dict(geo.config, **SMOKE_OVERRIDES) if args.smoke else geo.config
    text_len = 16 if args.smoke else 512
    height, width = args.height, args.width
    lat_h, lat_w = geo.latent_size(height, width)
    frame_tokens = (lat_h // 2) * (lat_w // 2)
    chunk = args.chunk_frames
    args.sdpa = probe_sdpa(args.sdpa, device)

    what = "tiny smoke-test" if args.smoke else f"{geo.name}-geometry"
    log(f"building the {what} transformer (random weights, {dtype}) on {device}")
    model = build_model(config, device, dtype, args.seed, args.keep_fp32_modules)
    if args.compile:  # as rehyat generate's default on CUDA; again after the conversion below (its attention step)
        compile_blocks(model)
    n_params = sum(p.numel() for p in model.parameters())
    alloc = f", {gib(torch.cuda.memory_allocated(device)):.2f} GiB allocated" if _cuda(device) else ""
    log(f"  {n_params / 1e6:,.1f}M parameters, dtype {model.dtype}{alloc}")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    embeds = torch.randn(1, text_len, config["text_dim"], generator=g).to(device, dtype)
    pipe = ReHyAtVideoPipeline(model, vae=None, max_sequence_length=text_len)
    geometry = (lat_h, lat_w, frame_tokens, chunk)

    rows: list[dict] = []
    fm_dtype = "-"
    for label in MODES:
        if label == "ReHyAt parallel":
            log(f"converting all {config['num_layers']} blocks (chunk_frames={chunk}, "
                f"overlap_frames={args.overlap_frames})")
            convert_wan(model, blocks="all", chunk_frames=chunk, overlap_frames=args.overlap_frames)
            if args.compile:
                compile_blocks(model)
            fm_dtype = feature_map_dtype(model)
            alloc = f", {gib(torch.cuda.memory_allocated(device)):.2f} GiB allocated" if _cuda(device) else ""
            log(f"  feature maps in {fm_dtype}{alloc}")
        mode = PIPELINE_MODE[label]
        log(f"{label}: warm-up on {chunk} latent frames")
        try:
            with sdpa_context(args.sdpa, device):
                generate(pipe, mode, chunk, lat_h, lat_w, embeds, 1, args.guidance)
            if _cuda(device):
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - the measured rows report their own failures
            log(f"  warm-up failed: {type(exc).__name__}: {exc}")
        free_memory(device)
        prev = None
        for vf in sorted(args.frames):
            T = latent_frames(vf)
            if prev is not None:
                # Predicted run time from the previous length of this mode: full attention is quadratic in tokens,
                # everything else (and ReHyAt) linear; quadratic over-estimates the teacher, on purpose.
                ratio = (T / prev["latent_frames"]) ** (2 if label == "teacher parallel" else 1)
                est = prev["wall_s"] * ratio
                if est > args.max_seconds:
                    rows.append({"mode": label, "video_frames": vf, "latent_frames": T, "tokens": T * frame_tokens,
                                 "status": "skipped", "est_s": est,
                                 "note": f"skipped (est. {est:.0f} s > --max-seconds {args.max_seconds:g})"})
                    log(f"  {label} {vf} frames: skipped (est. {est:.0f} s > --max-seconds {args.max_seconds:g})")
                    continue
            row = gpu_row(pipe, label, vf, args, embeds, geometry)
            rows.append(row)
            if row["status"] == "ok":
                prev = row

    meta = {"geometry": f"{height}x{width} pixels -> latents {lat_h}x{lat_w}, {frame_tokens} tokens per latent frame",
            "model": f"{what}, random weights, {n_params / 1e6:,.1f}M parameters, "
                     + ("bfloat16, float32 where from_pretrained keeps it (--keep-fp32-modules)" if args.keep_fp32_modules
                        else "all bfloat16 (.to(bfloat16))")
                     + (f" (--smoke: NOT the {geo.name} geometry, its {config['in_channels']} latent channels)"
                        if args.smoke else ""),
            "conversion": f"all {config['num_layers']} blocks, chunk_frames={chunk}, "
                          f"overlap_frames={args.overlap_frames}, causal, polynomial feature maps (random, {fm_dtype})",
            "text embeddings": f"random [1, {text_len}, {config['text_dim']}]",
            "guidance": ("CFG 5.0, batch 2" if args.cfg else "guidance off, batch 1"),
            "steps": args.steps, "sdpa": args.sdpa,
            "compiled": ("every block under torch.compile (rehyat.models.compile_blocks), teacher and ReHyAt"
                         if args.compile else "no (eager)")}
    notes = gpu_notes(rows, args)
    return rows, meta, notes


def gpu_notes(rows: list[dict], args) -> list[str]:
    notes = [
        f"Each row generated {args.steps} denoising step(s) through ReHyAtVideoPipeline (no VAE: latents out, "
        f"{'CFG 5.0, batch 2' if args.cfg else 'guidance off, batch 1'}); time/step = transformer forward time of "
        "one step (CUDA events), mean of the steps after the first.",
        f"'est. {FULL_STEPS} steps' = time/step x {FULL_STEPS}: an extrapolation, not a measurement.",
        "Peak = torch.cuda.max_memory_allocated during the generation; 'above weights' subtracts what was "
        "allocated before it (weights, feature maps, text embeddings).",
    ]
    notes += state_notes(rows, args.steps)
    return notes


def state_notes(rows: list[dict], steps: int) -> list[str]:
    """What the recurrent states cover and hold, and the streaming extrapolation to 50 steps."""
    states = [r for r in rows if r["mode"] == "ReHyAt streaming" and r.get("state_mib")]
    if not states:
        return []
    nominal, held = states[-1]["state_mib"], states[-1].get("state_held_mib") or states[-1]["state_mib"]
    out = [f"Streaming keeps one transformer state per denoising step: its tensors cover {nominal:,.1f} MiB "
           f"(TransformerState.nbytes()) and their storages hold {held:,.1f} MiB, the same at every length; with "
           f"{FULL_STEPS} steps that is {held * FULL_STEPS / 1024:,.2f} GiB held (est.; {nominal * FULL_STEPS / 1024:,.2f} "
           f"GiB if the states held only what they cover), constant in the number of frames; this run kept {steps}."]
    if held > 1.05 * nominal:
        out.append(f"The states hold {held / nominal:.1f}x what they cover: RecurrentState.k / v / fk are slices "
                   "(views) of the per-chunk window buffers torch.cat([state.k, k]) etc. in rehyat_attention_step, so "
                   "each keeps the whole window (overlap + chunk frames) alive; the recurrent and streaming peaks "
                   "above include that (the recurrent form holds the old and the new state during a chunk).")
    return out


# ----------------------------------------------------------------------------------------------------------------
# CPU mode: one child process per (mode, length, phase)
# ----------------------------------------------------------------------------------------------------------------
def _cpu_child(task: dict) -> dict:
    torch.set_num_threads(task["threads"])
    reset_ok = reset_peak_rss()
    from rehyat.models import convert_wan
    from rehyat.pipelines import ReHyAtVideoPipeline
    from rehyat.testing import tiny_vae, tiny_wan_transformer

    label, phase = task["mode"], task["phase"]
    vae = tiny_vae(task["tiny_geometry"], seed=task["seed"])
    # rope_max_seq_len=1024: the teacher's RoPE table must cover the longest video (converted models compute RoPE).
    model = tiny_wan_transformer(seed=task["seed"], rope_max_seq_len=1024, in_channels=vae.config.z_dim)
    if label != "teacher parallel":
        convert_wan(model, blocks="all", chunk_frames=task["chunk_frames"], overlap_frames=task["overlap_frames"])
    pipe = ReHyAtVideoPipeline(model, vae=vae, max_sequence_length=16)
    g = torch.Generator().manual_seed(task["seed"])
    embeds = torch.randn(1, 16, model.config.text_dim, generator=g)
    mode = PIPELINE_MODE[label]
    output_type = "latent" if phase == "denoise" else "np"
    size = task["size"]
    generate(pipe, mode, 1, size, size, embeds, 1, task["guidance"], output_type)  # warm-up: a 1-frame video
    gc.collect()
    base = proc_status("VmRSS")
    reset_peak_rss()
    timer = CallTimer(pipe.transformer, cuda=False)
    t = time.perf_counter()
    decoded = generate(pipe, mode, task["video_frames"], size, size, embeds, task["steps"], task["guidance"],
                       output_type)
    wall = time.perf_counter() - t
    peak = peak_rss()
    timer.close()
    T = task["latent_frames"]
    step_s = per_step_seconds(timer.seconds(), mode, task["steps"], math.ceil(T / task["chunk_frames"]))
    step = steady_step(step_s)
    return {"status": "ok", "peak_mib": mib(peak), "base_mib": mib(base), "above_mib": mib(peak - base),
            "step_s": step, "frame_ms": step / T * 1e3, "wall_s": wall,
            "wall_per_frame_ms": wall / task["video_frames"] * 1e3, "decoded_frames": decoded,
            "state_mib": mib(timer.state_bytes) if timer.state_bytes else None,
            "state_held_mib": mib(timer.state_held) if timer.state_held else None, "peak_reset": reset_ok}


def run_cpu(args) -> tuple[list[dict], dict, list[str]]:
    size, geo = args.size, GEOMETRIES[args.geometry]
    lat = geo.latent_size(size, size)[0]
    frame_tokens = (lat // 2) * (lat // 2)
    ctx = isolated_context(["rehyat.testing"])
    rows = []
    phases = ("denoise", "generate")
    for label in MODES:
        for vf in sorted(args.frames):
            T = latent_frames(vf)
            for phase in phases:
                task = {"mode": label, "phase": phase, "video_frames": vf, "latent_frames": T, "size": size,
                        "steps": args.steps, "guidance": args.guidance, "chunk_frames": args.chunk_frames,
                        "overlap_frames": args.overlap_frames, "seed": args.seed, "threads": args.threads,
                        "tiny_geometry": geo.tiny}
                res = run_isolated(ctx, _cpu_child, task, args.max_seconds)
                row = {"mode": label, "phase": phase, "video_frames": vf, "latent_frames": T,
                       "tokens": T * frame_tokens, "note": "", **res}
                rows.append(row)
                if row["status"] == "ok":
                    log(f"  {label} {vf} frames [{phase}]: peak RSS {row['peak_mib']:.0f} MiB "
                        f"(+{row['above_mib']:.1f} over baseline), {row['step_s'] * 1e3:.1f} ms/step, "
                        f"wall {row['wall_s']:.2f} s")
                else:
                    log(f"  {label} {vf} frames [{phase}]: {row['status']} {row['note']}")
    meta = {"geometry": f"{size}x{size} pixels -> latents {lat}x{lat}, {frame_tokens} tokens per latent frame",
            "model": f"rehyat.testing tiny Wan transformer (2 blocks, 2 heads x 32, FFN 128) + tiny causal Wan VAE "
                     f"of the {geo.tiny} geometry (tiny_vae('{geo.tiny}'), {geo.spatial}x spatial), float32",
            "conversion": f"all blocks, chunk_frames={args.chunk_frames}, overlap_frames={args.overlap_frames}",
            "guidance": "CFG 5.0, batch 2" if args.cfg else "guidance off, batch 1",
            "steps": args.steps, "threads": args.threads}
    notes = [
        "One child process per row (forked from a server that preloaded torch and diffusers); it resets its peak RSS "
        "(/proc/self/clear_refs), builds the model, warms up on a 1-frame video, records its RSS (baseline), "
        "generates, and reads VmHWM. 'over baseline' = peak - baseline.",
        "Phase 'denoise': latents only (output_type='latent'). Phase 'generate': the tiny VAE decodes too "
        "(keep_video=False, on_frames): streaming decodes chunk by chunk, parallel and recurrent decode the whole "
        "video once at the end, so their peak includes the decoded video.",
        f"time/step = transformer forward time of one denoising step (mean of steps after the first; {args.steps} "
        "steps); wall/frame = wall time of the generation / video frames.",
    ] + state_notes([r for r in rows if r.get("phase") == "denoise"], args.steps)
    return rows, meta, notes


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def growth_notes(rows: list[dict], cpu: bool) -> list[str]:
    """Per mode (and phase): the peak memory of the longest measured video against the shortest."""
    key, unit, scale = ("above_mib", "MiB", 1.0) if cpu else ("above_gib", "GiB", 1.0)
    groups: dict = {}
    for r in rows:
        if r["status"] == "ok" and r.get(key) is not None:
            groups.setdefault((r["mode"], r.get("phase")), []).append(r)
    out = []
    for (mode, phase), rs in groups.items():
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        name = f"{mode} [{phase}]" if phase else mode
        out.append(f"{name}: {a['video_frames']} -> {b['video_frames']} frames ({b['latent_frames'] / a['latent_frames']:.0f}x "
                   f"the latent frames): peak above baseline {a[key] * scale:.2f} -> {b[key] * scale:.2f} {unit} "
                   f"({b[key] - a[key]:+.2f} {unit})")
    return out


def state_cell(r: dict) -> str:
    if not r.get("state_mib"):
        return "-"
    a, b = r["state_mib"], r.get("state_held_mib") or r["state_mib"]
    spec = ",.0f" if a >= 100 else ".2f"
    return f"{a:{spec}} / {b:{spec}}"


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown_table(rows: list[dict], cpu: bool) -> str:
    if cpu:
        head = ("| mode | phase | video frames | latent frames | tokens | peak RSS (MiB) | over baseline (MiB) "
                "| time/step (ms) | time/latent frame/step (ms) | wall/video frame (ms) |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if r["status"] != "ok":
                cells = [r["mode"], r["phase"], str(r["video_frames"]), str(r["latent_frames"]), f"{r['tokens']:,}",
                         r["status"] + (f": {r['note']}" if r["note"] else ""), "", "", "", ""]
            else:
                cells = [r["mode"], r["phase"], str(r["video_frames"]), str(r["latent_frames"]), f"{r['tokens']:,}",
                         f"{r['peak_mib']:.0f}", f"{r['above_mib']:+.1f}", f"{r['step_s'] * 1e3:.1f}",
                         f"{r['frame_ms']:.2f}", f"{r['wall_per_frame_ms']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    head = ("| mode | video frames | latent frames | tokens | peak memory (GiB) | above weights (GiB) | time/step (s) "
            "| time/latent frame/step (ms) | est. 50 steps (s) | state/step (MiB): covered / held |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = [r["mode"], str(r["video_frames"]), str(r["latent_frames"]), f"{r['tokens']:,}"]
        if r["status"] == "ok":
            cells = base + [fmt(r["peak_gib"], ".2f"), fmt(r["above_gib"], ".2f"), f"{r['step_s']:.3f}",
                            f"{r['frame_ms']:.1f}", f"{r['est_full_s']:.0f} (est.)", state_cell(r)]
        elif r["status"] == "skipped":
            cells = base + [f"skipped (est. {r['est_s']:.0f} s)", "", "", "", "", ""]
        else:
            cells = base + [r["status"] if r["status"] == "OOM" else f"{r['status']}: {r['note']}", "", "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="video frame counts, 4k+1 (default GPU: 81 321 1281; CPU: 17 65 257 1025)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per generation (default 2)")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance 5.0 (batch 2); default off (batch 1)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip a row whose predicted run time exceeds this (GPU, default 60); CPU: per-child limit "
                        "(default 120)")
    add_geometry_argument(p)
    p.add_argument("--height", type=int, default=None, help="GPU: pixels (default 480, wan2.2-5b: 704; --smoke: 64)")
    p.add_argument("--width", type=int, default=None, help="GPU: pixels (default 832, wan2.2-5b: 1280; --smoke: 64)")
    p.add_argument("--size", type=int, default=64, help="CPU mode: square video size in pixels (default 64)")
    p.add_argument("--chunk-frames", type=int, default=None, help="T_c (default GPU 3, CPU 2)")
    p.add_argument("--overlap-frames", type=int, default=1)
    p.add_argument("--sdpa", default="cudnn", choices=["cudnn", "flash", "auto"],
                   help="SDPA backend preferred for every attention call (GPU; others stay as fallbacks)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU mode: torch threads per child (default 1: the tiny model's ops are too small to gain "
                        "from more, and a busy core makes OpenMP waits very slow)")
    p.add_argument("--smoke", action="store_true",
                   help="run the GPU code path with a tiny model (works on the CPU; a script check, not a benchmark)")
    p.add_argument("--keep-fp32-modules", action="store_true",
                   help="cast as from_pretrained(torch_dtype=bfloat16) does (rope, time_embedder, scale_shift_table, "
                        "norm1-3 stay float32) instead of .to(bfloat16) of everything (the default)")
    p.add_argument("--compile", action="store_true",
                   help="GPU: every transformer block under torch.compile (rehyat.models.compile_blocks), the "
                        "teacher's and ReHyAt's, as rehyat generate runs on CUDA by default; use --steps 3 or more "
                        "(the first step of each length carries the compilation and is not counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bench_memory.json and bench_memory.md")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = torch.device(args.device).type == "cpu" and not args.smoke
    geo = GEOMETRIES[args.geometry]
    args.height = args.height or (64 if args.smoke else geo.height)
    args.width = args.width or (64 if args.smoke else geo.width)
    geo.latent_size(*((args.size, args.size) if cpu else (args.height, args.width)))  # SystemExit for a bad size
    if args.frames is None:
        args.frames = [17, 65, 257, 1025] if cpu else [9, 17, 33] if args.smoke else list(geo.memory_frames)
    for f in args.frames:
        latent_frames(f)
    if args.max_seconds is None:
        args.max_seconds = 120.0 if cpu else 60.0
    if args.chunk_frames is None:
        args.chunk_frames = 2 if cpu else 3
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.compile and cpu:
        raise SystemExit("--compile: GPU mode only (the CPU rows run in child processes, eager)")
    args.guidance = 5.0 if args.cfg else 1.0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} requested but CUDA is not available")

    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    log(f"bench_memory: device {args.device}, frames {args.frames}, steps {args.steps}, "
        f"{'CFG 5.0 (batch 2)' if args.cfg else 'guidance off (batch 1)'}")
    rows, meta, notes = run_cpu(args) if cpu else run_gpu(args)

    import diffusers

    info = {
        "benchmark": "bench_memory",
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        **meta,
    }
    notes = notes + [f"Growth, {g}" for g in growth_notes(rows, cpu)]
    table = markdown_table(rows, cpu)
    header = [f"# bench_memory: peak memory and time per denoising step vs video length", ""]
    header += [f"- {k}: {v}" for k, v in info.items() if k != "benchmark"]
    header += [""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(header) + "\n" + table + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_memory.json"), "w") as f:
            json.dump({"info": info, "notes": notes, "rows": rows}, f, indent=2, default=str)
        with open(os.path.join(args.out, "bench_memory.md"), "w") as f:
            f.write(text)
        log(f"wrote {os.path.join(args.out, 'bench_memory.json')} and bench_memory.md")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
