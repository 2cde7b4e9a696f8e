"""Evaluation that needs no downloaded network: attention error, student-vs-teacher video similarity, the world's
ground-truth checks, and time / peak memory against video length.

Everything here works on any model folder that :class:`rehyat.pipelines.ReHyAtVideoPipeline` loads; the world
checks (:func:`rehyat.world.check_video`) only make sense for models trained on the project's video world.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PeakMemory",
    "video_similarity",
    "attention_errors",
    "evaluate_models",
    "time_memory_sweep_isolated",
    "results_markdown",
    "sweep_markdown",
    "plot_sweep",
]


class PeakMemory:
    """Peak memory of the code inside a ``with`` block, in bytes (``.peak_bytes``).

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensor memory). On the CPU: the process's resident
    set size sampled every ``interval`` seconds by a thread, minus its value at entry (large tensors are
    ``mmap``-ed and returned to the OS when freed, so the sampled peak tracks tensor memory; short spikes between
    samples can be missed).
    """

    def __init__(self, device="cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._rss()
        self._peak = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._rss()) - self._base


def video_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM between two uint8 videos ``[F, H, W, 3]`` (scikit-image's SSIM, averaged over frames).

    PSNR is the whole video's: ``10 log10(255^2 / MSE)`` with the mean squared error over every frame and pixel,
    capped at 100 dB (identical videos). It is not the mean of per-frame PSNRs: a block-causal student whose first
    chunk is exactly its teacher's would get 100 dB for those frames and a frame mean far above what the other
    frames show. ``ValueError`` for videos of different shapes.
    """
    from skimage.metrics import structural_similarity

    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    psnr = 100.0 if mse == 0 else min(10.0 * np.log10(255.0**2 / mse), 100.0)
    ssim = []
    for fa, fb in zip(a, b):
        win = min(7, fa.shape[0], fa.shape[1])
        win -= 1 - win % 2
        ssim.append(structural_similarity(fa, fb, channel_axis=-1, data_range=255, win_size=win))
    return {"psnr": float(psnr), "ssim": float(np.mean(ssim))}


BLOCK_KEYS = ("rel_error", "linear_share", "teacher_share", "teacher_mass")


@torch.no_grad()
def block_diagnostics(pipe, prompt_embeds: torch.Tensor, num_frames: int, height: int, width: int, *, seed: int = 0,
                      timesteps=(900, 500, 100)) -> dict[int, dict[str, float]]:
    """Per converted block: the relative error ``||y_hybrid - y_softmax|| / ||y_softmax||`` of its attention output
    and where its joint normaliser's mass goes (:func:`rehyat.models.wan.mass_summary`: ``linear_share``, the
    linear branch's share for queries that have linear keys; ``teacher_share``, softmax's share of the same keys;
    ``teacher_mass``, the teacher's own attention on them).

    Runs the model in distillation mode (teacher forcing: each block sees the softmax model's activations) on
    noisy latents at the given timesteps (out of 1,000) and averages over them. Returns ``{block: {key: mean}}``
    (keys :data:`BLOCK_KEYS`; the shares NaN where no query has linear keys); ``ValueError`` for a model that is
    not converted.
    """
    from ..models.wan import distill_mode, get_context

    ctx = get_context(pipe.transformer)
    shape = pipe.latent_shape(num_frames, height, width)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    recs: dict[int, list[dict]] = {}
    with distill_mode(ctx, measure_mass=True):
        for t in timesteps:
            x = x0.to(pipe.device, pipe.transformer.dtype)
            pipe.transformer(x, torch.tensor([t], device=pipe.device), prompt_embeds.to(pipe.device, pipe.transformer.dtype))
            for b, rec in ctx.records.items():
                recs.setdefault(b, []).append(rec)
    ctx.records = {}
    return {b: {k: float(np.mean([r[k] for r in rs])) for k in BLOCK_KEYS} for b, rs in sorted(recs.items())}


def attention_errors(pipe, prompt_embeds: torch.Tensor, num_frames: int, height: int, width: int, *, seed: int = 0,
                     timesteps=(900, 500, 100)) -> dict[int, float]:
    """``{block index: mean relative error}`` of :func:`block_diagnostics`."""
    diag = block_diagnostics(pipe, prompt_embeds, num_frames, height, width, seed=seed, timesteps=timesteps)
    return {b: d["rel_error"] for b, d in diag.items()}


@dataclass
class _Run:
    video: np.ndarray
    seconds: float
    peak_bytes: int


def _generate(pipe, prompt, frames, height, width, steps, guidance, seed, mode) -> _Run:
    with PeakMemory(pipe.device) as mem:
        out = pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, seed=seed, mode=mode, progress=False)
    return _Run(out.video, out.seconds, mem.peak_bytes)


def evaluate_models(teacher, student, prompts: list[str], *, seeds=(0,), lengths: list[int], height: int, width: int,
                    steps: int, guidance: float, teacher_max_frames: int | None = None,
                    student_mode: str = "streaming", progress=None) -> dict:
    """Generate with teacher (parallel) and student (``student_mode``) from the same noise and prompts and score them.

    Args:
        teacher, student: :class:`ReHyAtVideoPipeline` (either may be ``None`` to evaluate one model alone).
        prompts: world captions (the ground-truth checks parse them). seeds: one video per prompt and seed.
        lengths: video frame counts to evaluate (e.g. 1x, 4x, 16x the training length).
        teacher_max_frames: skip teacher runs longer than this (full attention grows quadratically).

    Returns:
        ``{"rows": [...], "attention": {...}}``: one row per (model, length) with the mean world checks, time per
        video, peak memory (on CUDA only: on the CPU a process's resident memory after earlier runs says nothing
        about one run; see :func:`time_memory_sweep_isolated`) and, where both models ran, PSNR/SSIM of student
        vs teacher.
    """
    from ..world import check_video, summarise

    rows = []
    for frames in lengths:
        per_model: dict[str, list] = {}
        for name, pipe, mode in (("teacher", teacher, "parallel"), ("rehyat", student, student_mode)):
            if pipe is None or (name == "teacher" and teacher_max_frames is not None and frames > teacher_max_frames):
                continue
            runs = []
            for prompt in prompts:
                for seed in seeds:
                    if progress:
                        progress(f"{name} {frames} frames: {prompt!r} seed {seed}")
                    r = _generate(pipe, prompt, frames, height, width, steps, guidance, seed, mode)
                    runs.append((prompt, seed, r, check_video(r.video, prompt)))
            per_model[name] = runs
            summary = summarise([c for *_, c in runs])
            rows.append({
                "model": name, "frames": frames, "mode": mode, "videos": len(runs),
                "seconds_per_video": float(np.mean([r.seconds for _, _, r, _ in runs])),
                **({"peak_memory_mb": float(max(r.peak_bytes for _, _, r, _ in runs)) / 2**20}
                   if pipe.device.type == "cuda" else {}),
                **{k: summary[k] for k in ("colour_present", "shape_correct", "direction_correct", "persistence",
                                           "background_correct", "flicker", "speed") if k in summary},
            })
        if "teacher" in per_model and "rehyat" in per_model:
            sims = [video_similarity(s[2].video, t[2].video) for s, t in zip(per_model["rehyat"], per_model["teacher"])]
            rows[-1]["psnr_vs_teacher"] = float(np.mean([s["psnr"] for s in sims]))
            rows[-1]["ssim_vs_teacher"] = float(np.mean([s["ssim"] for s in sims]))
    result = {"rows": rows}
    if student is not None and prompts:
        emb = student.encode_prompt([prompts[0]])
        result["attention"] = {str(b): d for b, d in block_diagnostics(student, emb, lengths[0], height, width).items()}
    return result


_COLUMNS = [
    ("model", "model", "{}"), ("frames", "frames", "{}"), ("mode", "mode", "{}"), ("videos", "videos", "{}"),
    ("colour_present", "colour", "{:.2f}"), ("shape_correct", "shape", "{:.2f}"),
    ("direction_correct", "direction", "{:.2f}"), ("persistence", "persistence", "{:.2f}"),
    ("background_correct", "background", "{:.2f}"), ("flicker", "flicker", "{:.3f}"),
    ("speed", "speed (px/frame)", "{:.2f}"),
    ("psnr_vs_teacher", "PSNR vs teacher (dB)", "{:.1f}"), ("ssim_vs_teacher", "SSIM vs teacher", "{:.3f}"),
    ("seconds_per_video", "s / video", "{:.1f}"), ("peak_memory_mb", "peak MB (CUDA)", "{:.0f}"),
]


def _table(rows: list[dict], columns) -> str:
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "" for c in cols) + " |")
    return "\n".join(lines)


def results_markdown(result: dict) -> str:
    """Markdown of :func:`evaluate_models`' result: the world-check table and the per-block diagnostics."""
    from ..models.wan import mass_warnings

    out = [_table(result["rows"], _COLUMNS)]
    if any(r.get("speed") is not None for r in result["rows"]):
        out += ["", "speed: the object's mean motion along the prompted direction; the world's videos move 2.0-2.5 "
                "px/frame (negative: the wrong way)."]
    if result.get("attention"):
        att = result["attention"]
        rows = [("rel. error", "rel_error"), ("linear share", "linear_share"), ("softmax share", "teacher_share"),
                ("teacher mass", "teacher_mass")]
        out += ["", "Per converted block of the ReHyAt model, teacher-forced on its own q, k, v at noisy latents: the "
                "relative error of its hybrid attention against the teacher's softmax attention; the linear branch's "
                "share of the joint normaliser for queries that have linear keys, softmax's share of the same keys, "
                "and the teacher's own attention on them:", "",
                "| block | " + " | ".join(att) + " |", "|---|" + "---|" * len(att)]
        out += ["| " + label + " | " + " | ".join(f"{v[k]:.3f}" for v in att.values()) + " |" for label, k in rows]
        out += [f"- warning: {w}" for w in mass_warnings({b: v for b, v in att.items()})]
    return "\n".join(out)


def _step_inputs(pipe, frames: int, height: int, width: int):
    """CFG-batched inputs of one denoising step: noise ``[2, C, F, H, W]``, timesteps ``[2]``, text ``[2, L, D]``."""
    from ..pipelines.video import initial_noise

    shape = pipe.latent_shape(frames, height, width)
    x = initial_noise(0, shape, 0, pipe.device).to(pipe.transformer.dtype)
    emb = torch.zeros(2, pipe.max_sequence_length, pipe.transformer.config.text_dim, device=pipe.device,
                      dtype=pipe.transformer.dtype)
    p = pipe.transformer.config.patch_size
    tokens = shape[2] * (shape[3] // p[1]) * (shape[4] // p[2])
    return torch.cat([x, x]), torch.tensor([500, 500], device=pipe.device), emb, tokens


def _one_step(pipe, mode, x, t, emb) -> None:
    from ..models.runner import recurrent_forward

    if mode == "parallel":
        pipe.transformer(x, t, emb, return_dict=False)
    else:
        recurrent_forward(pipe.transformer, x, t, emb)


@torch.no_grad()
def _sweep_child(task: dict) -> dict:
    """In a fresh process: load the model folder, warm up on the shortest length, time one step, read peak RSS."""
    from ..pipelines import ReHyAtVideoPipeline
    from .isolation import peak_rss, proc_status, reset_peak_rss

    torch.set_num_threads(task["threads"])
    pipe = ReHyAtVideoPipeline.from_pretrained(task["folder"], torch_dtype=torch.float32)
    x, t, emb, _ = _step_inputs(pipe, task["warmup_frames"], task["height"], task["width"])
    _one_step(pipe, task["mode"], x, t, emb)
    x, t, emb, tokens = _step_inputs(pipe, task["frames"], task["height"], task["width"])
    secs, peaks = [], []
    for _ in range(task.get("repeats", 1)):
        base = proc_status("VmRSS")
        reset_peak_rss()
        t0 = time.perf_counter()
        _one_step(pipe, task["mode"], x, t, emb)
        secs.append(time.perf_counter() - t0)
        peaks.append((peak_rss() - base) / 2**20)
    return {"status": "ok", "seconds": float(np.median(secs)), "peak_mb": float(np.median(peaks)), "tokens": tokens,
            "samples": len(secs)}


def time_memory_sweep_isolated(models: dict, lengths: list[int], height: int, width: int, *, threads: int = 1,
                               max_seconds: float = 120.0, repeats: int = 1, progress=None) -> list[dict]:
    """Time and peak memory of one CFG denoising step against video length, one fresh process per measurement.

    ``models``: ``{label: (model folder, mode)}``. Each row runs in a child process that loads the folder, warms up
    on the shortest length, then times one CFG denoising step ``repeats`` times and reports the median time and
    the median peak resident memory above the resident memory before the step (``/proc/self`` ``VmHWM``). After a row that took longer than
    ``max_seconds / 2``, longer lengths of that model are skipped. Returns rows ``{model, mode, frames, tokens,
    seconds, peak_mb}`` (``skipped`` and ``error`` for rows not run). CPU only (resident memory via ``/proc``).
    """
    from .isolation import isolated_context, run_isolated

    ctx = isolated_context()
    rows = []
    for label, (folder, mode) in models.items():
        skip = False
        for frames in lengths:
            row = {"model": label, "mode": mode, "frames": frames}
            if skip:
                rows.append({**row, "tokens": None, "skipped": True})
                continue
            if progress:
                progress(f"{label}: {frames} frames")
            task = {"folder": str(folder), "mode": mode, "frames": frames, "warmup_frames": min(lengths),
                    "height": height, "width": width, "threads": threads, "repeats": repeats}
            res = run_isolated(ctx, _sweep_child, task, max_seconds)
            if res.get("status") != "ok":
                rows.append({**row, "tokens": None, "skipped": True, "error": res.get("note", "failed")[:120]})
                skip = True
                continue
            rows.append({**row, "tokens": res["tokens"], "seconds": res["seconds"], "peak_mb": res["peak_mb"],
                         "samples": res["samples"]})
            skip = res["seconds"] * repeats > max_seconds / 2
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`time_memory_sweep_isolated` rows."""
    lines = ["| model | mode | frames | tokens | s / step | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            why = r.get("error", "skipped")
            lines.append(f"| {r['model']} | {r['mode']} | {r['frames']} | {r['tokens'] or ''} | {why} | |")
        else:
            lines.append(f"| {r['model']} | {r['mode']} | {r['frames']} | {r['tokens']} | {r['seconds']:.2f} | "
                         f"{max(r['peak_mb'], 0.0):.0f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path, title: str = "") -> None:
    """Two panels, time per denoising step and peak memory against video frames, one line per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == label and not r.get("skipped")]
        f = [r["frames"] for r in rs]
        axes[0].plot(f, [r["seconds"] for r in rs], "o-", label=label)
        axes[1].plot(f, [r["peak_mb"] for r in rs], "o-", label=label)
    axes[0].set(xlabel="video frames", ylabel="seconds per denoising step (CFG)", title="time")
    axes[1].set(xlabel="video frames", ylabel="peak memory during the step (MB)", title="memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
