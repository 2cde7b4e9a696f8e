"""Argument validation shared by every ReHyAt attention path.

All checks run before any compute and raise ``ValueError`` naming the argument and the expected value.
"""

from __future__ import annotations

import torch

STABILIZERS = ("lse", "max")


def check_settings(*, frame_tokens: int, chunk_frames: int | None, overlap_frames: int, stabilizer: str) -> None:
    """Validate the scalar settings of the hybrid operator (design section 2 and 3)."""
    if not isinstance(frame_tokens, int) or isinstance(frame_tokens, bool) or frame_tokens < 1:
        raise ValueError(f"frame_tokens must be a positive int (tokens per latent frame), got {frame_tokens!r}")
    if chunk_frames is not None and (
        not isinstance(chunk_frames, int) or isinstance(chunk_frames, bool) or chunk_frames < 1
    ):
        raise ValueError(f"chunk_frames must be an int >= 1, got {chunk_frames!r}")
    if not isinstance(overlap_frames, int) or isinstance(overlap_frames, bool) or overlap_frames < 0:
        raise ValueError(f"overlap_frames must be an int >= 0, got {overlap_frames!r}")
    if stabilizer not in STABILIZERS:
        raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")


def check_linear_norm_frames(linear_norm_frames: int | None, causal: bool = True) -> None:
    """Validate ``linear_norm_frames`` (design section 3): ``None`` or an int >= 1, and only for the causal
    variant (the bidirectional one's linear keys are not a growing past)."""
    if linear_norm_frames is None:
        return
    if not isinstance(linear_norm_frames, int) or isinstance(linear_norm_frames, bool) or linear_norm_frames < 1:
        raise ValueError(f"linear_norm_frames must be None or an int >= 1 (latent frames), got {linear_norm_frames!r}")
    if not causal:
        raise ValueError("linear_norm_frames needs causal=True: it bounds the mass of the past frames, and the "
                         "bidirectional variant's linear keys include future ones")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor) -> None:
    """Check layouts ``[B, N, H, D]`` (q, k, v) and ``[B, N, H, D']`` (fq, fk), dtypes and devices."""
    named = {"q": q, "k": k, "v": v, "fq": fq, "fk": fk}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, N, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected the device of q ({q.device})")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, N, H, Dv] = {tuple(q.shape[:3])} + (Dv,), got {tuple(v.shape)}")
    if fq.shape[:3] != q.shape[:3]:
        raise ValueError(f"fq must have shape [B, N, H, D'] with [B, N, H] = {tuple(q.shape[:3])}, got {tuple(fq.shape)}")
    if fk.shape != fq.shape:
        raise ValueError(f"fk must have the shape of fq {tuple(fq.shape)}, got {tuple(fk.shape)}")
    for name in ("k", "v"):
        if named[name].dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {named[name].dtype}")
    if fk.dtype != fq.dtype:
        raise ValueError(f"fk must have the dtype of fq ({fq.dtype}), got {fk.dtype}")


def check_frames(n_tokens: int, frame_tokens: int, arg: str = "q") -> int:
    """Return the number of frames ``N // frame_tokens``; raise if ``N`` is not a positive multiple."""
    if n_tokens < 1 or n_tokens % frame_tokens != 0:
        raise ValueError(
            f"{arg}.shape[1] (N = {n_tokens} tokens) must be a positive multiple of frame_tokens ({frame_tokens})"
        )
    return n_tokens // frame_tokens
