"""The polynomial feature map as a stateless op: a plain PyTorch reference and a fused Triton kernel (GPU, inference).

``phi(x) = [g(u_1), g(u_2)^2, ..., g(u_P)^P]`` with ``u = W2 gelu(W1 x + b1) + b2`` per head (ReHyAt section 3.3;
the positivity transform ``g`` is this library's choice, see :class:`rehyat.modules.PolynomialFeatureMap`, which
holds the weights and calls these functions).

Layout: ``x [..., H, D]`` (e.g. ``[B, N, H, D]``, diffusers' layout), weights ``w1 [H, D, hidden]``, ``b1 [H, hidden]``,
``w2 [H, hidden, D']``, ``b2 [H, D']``; output ``[..., H, D']``.

- :func:`polynomial_feature_map` is the reference: per-head ``einsum`` products in the weights' dtype (float64 when
  the input or the weights are float64), the positivity transform and the powers in float32 / float64, the result
  rounded once to bfloat16 for bfloat16 weights and returned in float32 for float16 weights (whose range the powers
  exceed; see :func:`result_dtype`). It supports autograd and every device.
- :func:`polynomial_feature_map_fused` computes the same function in one Triton kernel per call: each program
  loads a tile of tokens of one head, runs both matrix products on tensor cores with the hidden activation kept
  on chip (float32 accumulation, the hidden activation rounded to the weights' dtype between the products, as the
  reference does), then bias, positivity and powers, and writes ``phi`` once (bfloat16, or float32 for float16
  input). The reference instead writes and
  reads the permuted input, the hidden activation and ``u`` through memory (about 6 GB at 81 Wan latent frames;
  the kernel moves about 1.2 GB). Forward only: no autograd.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = [
    "POSITIVITY",
    "polynomial_feature_map",
    "polynomial_feature_map_fused",
    "fused_feature_map_available",
    "fused_feature_map_supports",
]

POSITIVITY = {
    "softplus": F.softplus,
    "exp": torch.exp,
    "relu": F.relu,
}
_POSITIVITY_CODE = {"softplus": 0, "exp": 1, "relu": 2}


def compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The weights' dtype, or float64 when the input or the weights are float64 (never downcast a float64 input)."""
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else w.dtype


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Working dtype of the positivity transform and the powers: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def result_dtype(compute: torch.dtype, work: torch.dtype) -> torch.dtype:
    """Output dtype: bfloat16 weights give a bfloat16 output (rounded once at the end), any other the working dtype
    (float32, or float64). float16 weights thus give float32 features: the powers ``g(u)^p`` leave float16's range
    (max 65504) from ``g(u) > 65504^(1/p)`` (256 for p = 2, 16 for p = 4), while bfloat16 has float32's range."""
    return compute if compute == torch.bfloat16 else work


def polynomial_feature_map(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    degree: int,
    positivity: str = "softplus",
) -> torch.Tensor:
    """Reference polynomial feature map (plain PyTorch, autograd, any device).

    Args:
        x: ``[..., H, D]``, any float dtype.
        w1, b1, w2, b2: ``[H, D, hidden]``, ``[H, hidden]``, ``[H, hidden, D']``, ``[H, D']``.
        degree: P >= 1; ``D'`` must be divisible by it.
        positivity: ``"softplus"``, ``"exp"`` or ``"relu"``.

    Returns:
        ``[..., H, D']``: float32 (float64 for float64 input or weights; bfloat16 for bfloat16 weights; float32 for
        float16 weights, see :func:`result_dtype`).

    Shapes and values are not re-checked here (the module checks them); a mismatch raises PyTorch's own error.
    """
    cdt = compute_dtype(x, w1)
    w1, b1, w2, b2 = (p.to(cdt) for p in (w1, b1, w2, b2))
    h = F.gelu(torch.einsum("...hd,hde->...he", x.to(cdt), w1) + b1)
    u = torch.einsum("...he,hef->...hf", h, w2) + b2
    u = u.to(work_dtype(u.dtype))
    g = POSITIVITY[positivity]
    parts = u.chunk(degree, dim=-1)
    phi = torch.cat([g(p) ** (i + 1) for i, p in enumerate(parts)], dim=-1)
    return phi.to(result_dtype(cdt, phi.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Fused Triton kernel (imported lazily: triton is a GPU-only dependency)
# ----------------------------------------------------------------------------------------------------------------
_MAX_TILE_WIDTH = 256  # D and D' up to this: the [tokens, D'] float32 accumulator stays in registers


_AVAILABLE: bool | None = None


@torch.compiler.assume_constant_result
def fused_feature_map_available() -> bool:
    """True when Triton imports and a CUDA device is present (the fused kernel can run at all). Checked once per
    process; ``torch.compile`` treats the answer as a constant."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _AVAILABLE = torch.cuda.is_available()
        except Exception:
            _AVAILABLE = False
    return _AVAILABLE


def _pow2(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


def fused_feature_map_supports(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, degree: int
) -> bool:
    """Whether :func:`polynomial_feature_map_fused` serves these inputs (otherwise use the reference).

    Needs: a CUDA input; input and all four weights in one 16-bit dtype (bfloat16 or float16); ``D``, ``hidden``
    and ``D'`` powers of two in [16, 256]; ``D'`` divisible by ``degree``; and no gradient wanted (grad mode off,
    or neither the input nor any weight or bias requires grad).
    """
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if any(p.dtype != x.dtype for p in (w1, b1, w2, b2)):
        return False
    D, hidden, Fd = w1.shape[1], w1.shape[2], w2.shape[2]
    if not all(_pow2(n) and n <= _MAX_TILE_WIDTH for n in (D, hidden, Fd)) or Fd % degree:
        return False
    if _grad_wanted(x, w1, b1, w2, b2):
        return False
    return fused_feature_map_available()


def _grad_wanted(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_shapes(x, w1, b1, w2, b2) -> None:
    """The weights must be ``[H, D, hidden]``, ``[H, hidden]``, ``[H, hidden, D']``, ``[H, D']`` for x ``[..., H, D]``."""
    if w1.dim() != 3 or x.dim() < 2:
        raise ValueError(f"x must be [..., H, D] and w1 [H, D, hidden]; got x {tuple(x.shape)}, w1 {tuple(w1.shape)}")
    H, D, hidden = w1.shape
    Fd = w2.shape[-1] if w2.dim() == 3 else -1
    want = {"x": (H, D), "b1": (H, hidden), "w2": (H, hidden, Fd), "b2": (H, Fd)}
    got = {"x": tuple(x.shape[-2:]), "b1": tuple(b1.shape), "w2": tuple(w2.shape), "b2": tuple(b2.shape)}
    for name in want:
        if got[name] != want[name]:
            raise ValueError(
                f"{name} has shape {got[name]}, expected {want[name]} for w1 of shape {tuple(w1.shape)} "
                "(x [..., H, D], w1 [H, D, hidden], b1 [H, hidden], w2 [H, hidden, D'], b2 [H, D'])"
            )


@functools.lru_cache(maxsize=1)
def _kernel():
    """Build (once) the autotuned Triton kernel."""
    import triton
    import triton.language as tl

    # Tile configurations: the token tile and launch settings; the hidden width is walked in tiles of
    # min(64, hidden). On an H200 at Wan2.1 shapes the autotuner picks BLOCK_N 32, 4 warps (0.57 ms for phi(q) at
    # 21 latent frames); a wider set with 32- and 128-wide hidden tiles picked 32 x 128 there, at 0.76 ms.
    configs = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((64, 4, 2), (64, 8, 2), (128, 8, 2), (64, 4, 3), (32, 4, 2))
    ]

    @triton.autotune(configs=configs, key=["D", "HID", "FD", "DEGREE", "POS"])
    @triton.jit
    def poly_fm_kernel(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        M, H, stride_xm, stride_xh,
        D: tl.constexpr, HID: tl.constexpr, FD: tl.constexpr,
        DEGREE: tl.constexpr, POS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < M
        rd = tl.arange(0, D)
        rk = tl.arange(0, BLOCK_H)
        rf = tl.arange(0, FD)
        # x tile [BLOCK_N, D] of head h
        x = tl.load(x_ptr + rows[:, None] * stride_xm + h * stride_xh + rd[None, :], mask=row_ok[:, None], other=0.0)
        acc = tl.zeros((BLOCK_N, FD), dtype=tl.float32)
        w1_head = w1_ptr + h * D * HID
        w2_head = w2_ptr + h * HID * FD
        for k0 in range(0, HID, BLOCK_H):
            w1 = tl.load(w1_head + rd[:, None] * HID + (k0 + rk)[None, :])  # [D, BLOCK_H]
            b1 = tl.load(b1_ptr + h * HID + k0 + rk).to(tl.float32)
            a = tl.dot(x, w1) + b1[None, :]  # [BLOCK_N, BLOCK_H] float32
            a = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))  # exact GELU, as F.gelu
            w2 = tl.load(w2_head + (k0 + rk)[:, None] * FD + rf[None, :])  # [BLOCK_H, FD]
            acc += tl.dot(a.to(w2.dtype), w2)
        u = acc + tl.load(b2_ptr + h * FD + rf).to(tl.float32)[None, :]
        if POS == 0:  # softplus, beta 1, threshold 20 (F.softplus); log1p(e) by its series below 1e-4
            e = tl.exp(tl.minimum(u, 20.0))
            g = tl.where(u > 20.0, u, tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e)))
        elif POS == 1:
            g = tl.exp(u)
        else:
            g = tl.maximum(u, 0.0)
        part = rf // (FD // DEGREE)  # output part p holds g ** (p + 1)
        phi = g
        for i in tl.static_range(1, DEGREE):
            phi = tl.where(part[None, :] >= i, phi * g, phi)
        out = out_ptr + rows[:, None] * (H * FD) + h * FD + rf[None, :]
        tl.store(out, phi.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    return poly_fm_kernel


def fused_kernel_config() -> str | None:
    """The tile configuration the autotuner chose on the last tuned call (for benchmark notes), or None."""
    if not fused_feature_map_available():
        return None
    cfg = getattr(_kernel(), "best_config", None)
    return None if cfg is None else f"{cfg.kwargs}, warps {cfg.num_warps}, stages {cfg.num_stages}"


def fused_result_dtype(x: torch.Tensor) -> torch.dtype:
    """Output dtype of the fused kernel for a 16-bit input (and weights) ``x``: as :func:`result_dtype`, bfloat16
    for bfloat16 and float32 for float16."""
    return result_dtype(x.dtype, torch.float32)


def _launch(x: torch.Tensor, w1, b1, w2, b2, degree: int, positivity: str, block_n: int | None = None) -> torch.Tensor:
    """Run the kernel; ``block_n`` fixes the token tile instead of autotuning (tests; Triton's CPU interpreter)."""
    H, D = x.shape[-2], x.shape[-1]
    hidden, Fd = w1.shape[2], w2.shape[2]
    x2 = x.reshape(-1, H, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, H, Fd, device=x.device, dtype=fused_result_dtype(x))  # the kernel casts on store
    if M == 0:
        return out.reshape(*x.shape[:-1], Fd)
    w1, b1, w2, b2 = (p.contiguous() for p in (w1, b1, w2, b2))
    kernel, extra = _kernel(), {}
    if block_n is not None:
        kernel, extra = kernel.fn, {"BLOCK_N": block_n}

    def grid(meta):
        return ((M + meta["BLOCK_N"] - 1) // meta["BLOCK_N"], H)

    # launch on x's device (Triton uses the current one); the CPU branch serves Triton's interpreter
    # (TRITON_INTERPRET=1)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x2, w1, b1, w2, b2, out, M, H, x2.stride(0), x2.stride(1),
            D=D, HID=hidden, FD=Fd, DEGREE=degree, POS=_POSITIVITY_CODE[positivity], BLOCK_H=min(64, hidden),
            **extra,
        )
    return out.reshape(*x.shape[:-1], Fd)


@torch.library.custom_op("rehyat::polynomial_feature_map_fused", mutates_args=(), device_types="cuda")
def _fused_op(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, degree: int,
    positivity: str,
) -> torch.Tensor:
    return _launch(x, w1, b1, w2, b2, degree, positivity)


@_fused_op.register_fake
def _(x, w1, b1, w2, b2, degree, positivity):
    return x.new_empty(*x.shape[:-1], w2.shape[2], dtype=fused_result_dtype(x))


def polynomial_feature_map_fused(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    degree: int,
    positivity: str = "softplus",
) -> torch.Tensor:
    """The polynomial feature map in one fused Triton kernel (CUDA, bfloat16 / float16, forward only).

    Same arguments and result as :func:`polynomial_feature_map` (output bfloat16 for bfloat16, float32 for float16:
    :func:`fused_result_dtype`). A ``torch.library`` custom op
    (``rehyat::polynomial_feature_map_fused``), so ``torch.compile`` keeps it as one opaque call. The first call
    per shape family autotunes the tile size (a few seconds).

    Raises:
        ValueError: when the shapes do not fit together, when :func:`fused_feature_map_supports` is False for
            these inputs (wrong device or dtype, unsupported widths, a gradient wanted, or no Triton), or when
            ``positivity`` is unknown.
    """
    if positivity not in _POSITIVITY_CODE:
        raise ValueError(f"positivity must be one of {sorted(_POSITIVITY_CODE)}, got {positivity!r}")
    _check_shapes(x, w1, b1, w2, b2)
    if not fused_feature_map_supports(x, w1, b1, w2, b2, degree):
        raise ValueError(
            "polynomial_feature_map_fused needs a CUDA input, the input and all weights in one 16-bit dtype, D, "
            f"hidden and D' powers of two in [16, {_MAX_TILE_WIDTH}], D' divisible by degree, no gradient and "
            f"Triton; got x {tuple(x.shape)} {x.dtype} on {x.device}, w1 {tuple(w1.shape)} {w1.dtype}, b1 "
            f"{b1.dtype}, w2 {tuple(w2.shape)} {w2.dtype}, b2 {b2.dtype}, degree {degree}, gradient wanted "
            f"{_grad_wanted(x, w1, b1, w2, b2)}"
        )
    return _fused_op(x, w1, b1, w2, b2, degree, positivity)
