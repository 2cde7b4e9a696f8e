"""Helpers shared by the benchmark scripts: those that build a Wan-geometry transformer (bench_memory,
bench_end_to_end: Wan2.1-T2V-1.3B's or, with ``--geometry wan2.2-5b``, Wan2.2-TI2V-5B's) and, for
:func:`timed_call`, the operator benchmarks and A/B scripts.

Not part of the library: logging with elapsed time, device description, SDPA backend preference, building a
randomly initialised ``WanTransformer3DModel`` directly on the GPU, and timing one call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import time
from dataclasses import dataclass

import torch

T0 = time.perf_counter()
VAE_T = 4  # Wan VAE temporal stride (Wan2.1 and Wan2.2): 4k+1 frames -> k+1 latent frames; spatial: Geometry.spatial
# Wan2.1-T2V-1.3B transformer config (diffusers' Wan2.1-T2V-1.3B-Diffusers transformer/config.json).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# Wan2.2-TI2V-5B's transformer as a diffusers WanTransformer3DModel config (Wan's wan/configs/wan_ti2v_5B.py: dim
# 3072 = 24 heads x 128, ffn_dim 14336, freq_dim 256, 30 layers, text_dim 4096, in_dim 48, patch (1, 2, 2)): 5.0B
# parameters. Its VAE (z_dim 48, a 2x2 pixel patch) compresses 16x in space, 4x in time.
WAN_2_2_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                  out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


@dataclass(frozen=True)
class Geometry:
    """A model geometry of ``--geometry``: the transformer config, the VAE's spatial compression (``spatial``; the
    temporal one is 4 for both) and the default size and lengths (``frames``: bench_end_to_end; ``memory_frames``:
    bench_memory), the 5B's chosen to give about the 1.3B's token counts."""

    name: str
    config: dict
    spatial: int
    tiny: str  # the tiny geometry of rehyat.testing with this VAE compression and these latent channels
    height: int
    width: int
    frames: tuple[int, ...]
    memory_frames: tuple[int, ...]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, columns)`` of latents of ``height x width`` pixels; ``SystemExit`` for a size that is not a
        multiple of VAE stride x patch (16 for Wan2.1, 32 for Wan2.2-TI2V-5B)."""
        mult = self.spatial * self.config["patch_size"][1]
        for name, val in (("--height", height), ("--width", width)):
            if val < mult or val % mult:
                raise SystemExit(f"{name} must be a positive multiple of {mult} for the {self.name} geometry "
                                 f"(VAE stride {self.spatial} x patch {self.config['patch_size'][1]}), got {val}")
        return height // self.spatial, width // self.spatial


# 1.3B: 480x832, 1,560 tokens per latent frame, 81 / 321 / 1,281 frames = 21 / 81 / 321 latent frames.
# 5B: 704x1280 (Wan2.2-TI2V-5B's 720p size), 880 tokens per latent frame; 121 frames (its default, 31 latent frames,
# 27,280 tokens), 481 (121 latent frames, 106,480 tokens) and 1,921 (481 latent frames, 423,280 tokens).
GEOMETRIES = {
    "wan2.1-1.3b": Geometry("Wan2.1-T2V-1.3B", WAN_1_3B, 8, "wan2.1", 480, 832, (81, 321), (81, 321, 1281)),
    "wan2.2-5b": Geometry("Wan2.2-TI2V-5B", WAN_2_2_5B, 16, "wan2.2", 704, 1280, (121, 481), (121, 481, 1921)),
}


def add_geometry_argument(parser) -> None:
    """``--geometry`` (default ``wan2.1-1.3b``): which model's transformer config, VAE compression, size and lengths."""
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="wan2.1-1.3b",
                        help="model geometry, random weights: wan2.1-1.3b (Wan2.1-T2V-1.3B, 16 latent channels, VAE "
                             "8x, default 480x832) or wan2.2-5b (Wan2.2-TI2V-5B, 48 latent channels, VAE 16x, default "
                             "704x1280, frames 121 / 481 (/ 1921 in bench_memory))")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def gib(n: float) -> float:
    return n / 2**30


def short(exc: BaseException, n: int = 140) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= n else text[: n - 3] + "..."


def timed_call(fn, cuda: bool):
    """Time one call of ``fn()``: returns ``(milliseconds, fn's return value)``.

    ``cuda``: a pair of CUDA events recorded around the call, the host waiting on the end event (work queued before
    the call is not counted, work the call queues is); otherwise ``time.perf_counter`` around the call.
    """
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1e3, out


def latent_frames(video_frames: int) -> int:
    if (video_frames - 1) % VAE_T:
        raise SystemExit(f"--frames must be 4k+1 (Wan's causal VAE), got {video_frames}")
    return (video_frames - 1) // VAE_T + 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def sdpa_context(name: str, device: torch.device):
    """SDPA backend preference: ``cudnn`` or ``flash`` first with the others as fallback, or PyTorch's default."""
    if name == "auto" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    order = [first] + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def probe_sdpa(name: str, device: torch.device) -> str:
    """Check the chosen SDPA preference on a window-sized problem; fall back to ``auto`` if it fails."""
    if name == "auto" or device.type != "cuda":
        return "auto"
    try:
        q = torch.randn(2, 12, 4680, 128, device=device, dtype=torch.bfloat16)
        k = torch.randn(2, 12, 6240, 128, device=device, dtype=torch.bfloat16)
        with sdpa_context(name, device):
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
        torch.cuda.synchronize(device)
        return name
    except Exception as exc:  # noqa: BLE001
        log(f"SDPA preference {name!r} failed ({short(exc)}); using PyTorch's default order")
        return "auto"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cast_like_from_pretrained(model, dtype: torch.dtype):
    """Cast to ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` does: parameters of the model's
    ``_keep_in_fp32_modules`` (Wan: rope, time_embedder, scale_shift_table, norm1-3) stay float32."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not any(k in name.split(".") for k in keep):
            t.data = t.data.to(dtype)
    return model


def build_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int, keep_fp32: bool = False):
    """A ``WanTransformer3DModel`` with random weights, initialised directly on ``device`` (on an H200 the 1.3B
    model takes seconds this way; ``torch.nn.init`` on the CPU would take minutes), then cast to ``dtype``: all of
    it (``.to(dtype)``), or as ``from_pretrained(torch_dtype=dtype)`` does with ``keep_fp32``."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    if keep_fp32:
        model = cast_like_from_pretrained(model.to(device), dtype)
    else:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its note on _keep_in_fp32_modules: casting all is the intent here
        try:
            model = model.to(device=device, dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(level)
    model = model.eval().requires_grad_(False)
    free_memory(device)
    return model


def feature_map_dtype(model) -> str:
    """dtype of the first converted block's feature-map weights ("-" for an unconverted model)."""
    for block in model.blocks:
        fm = getattr(block.attn1.processor, "feature_map_q", None)
        if fm is not None:
            return str(next(fm.parameters()).dtype).replace("torch.", "")
    return "-"
