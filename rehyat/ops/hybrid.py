"""ReHyAt hybrid attention: the parallel form, the dense reference and the chunk-wise recurrent form.

Every other path in the library (the diffusers processor, the recurrent runner, distillation) calls the functions
of this module; the hybrid math lives here alone. Notation follows ``docs/design.md`` sections 2 to 5 and the
paper (Ghafoorian and Habibian, "ReHyAt", arXiv 2601.04342):

* tokens are frame-major: token ``j`` belongs to latent frame ``j // frame_tokens``;
* chunk ``c`` holds query frames ``[c*T_c, min((c+1)*T_c, T))`` (``T_c = chunk_frames``, the last chunk may be
  shorter);
* its softmax keys are the frames ``[max(c*T_c - T_o, 0), min((c+1)*T_c, T))`` (``T_o = overlap_frames``,
  bidirectional inside the window);
* its linear keys are the frames before the window (``causal=True``, Eq. 13, the form that is an RNN) or every
  frame outside the window (``causal=False``, the paper's bidirectional ablation);
* per query row and head, the two branches share one normaliser (Eq. 9-12)::

      y = (sum_S exp(s_j - c) v_j + phi_q(q) . sum_L phi_k(k_j)^T v_j)
          / (sum_S exp(s_j - c)     + phi_q(q) . sum_L phi_k(k_j)^T)

  with ``s_j = q.k_j * scale`` and the row stabiliser ``c`` = logsumexp of the window logits (``"lse"``, default:
  the softmax branch is plain softmax attention and any SDPA kernel serves) or their row maximum (``"max"``, the
  paper's "max exponent term").

Length normalisation (optional, ``linear_norm_frames`` H; design section 3): the linear sums of a query whose
linear branch holds ``n > H`` frames are scaled by ``H / n``, so that branch's mass stays what H frames give (a
mean over its frames, times H) instead of growing with the video. With ``n <= H`` nothing changes: a model whose
training clips never put more than H frames into the linear branch computes exactly what it was trained on.

Denominator guard: the linear mass ``phi_q(q) . sum_L phi_k(k_j)`` is clamped at zero before it enters the
denominator, so the denominator is at least the softmax mass (1 for ``"lse"``, >= 1 for ``"max"``) and never
reaches zero or changes sign. The library's feature maps are non-negative by construction (``rehyat.modules``), so
for them the clamp is an exact no-op; it only protects against user-supplied feature maps with negative entries.
NaN and Inf are never clamped away: ``clamp`` propagates NaN, and Inf sums give NaN outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_frames, check_linear_norm_frames, check_qkv, check_settings

__all__ = [
    "chunk_windows",
    "rehyat_attention",
    "rehyat_attention_reference",
    "RecurrentState",
    "rehyat_attention_step",
    "rehyat_attention_recurrent",
    "linear_norm_factor",
]


# ----------------------------------------------------------------------------------------------------------------
# Chunk layout
# ----------------------------------------------------------------------------------------------------------------
def chunk_windows(num_frames: int, chunk_frames: int, overlap_frames: int) -> list[tuple[int, int, int]]:
    """Frame ranges of every chunk, design section 2.

    Args:
        num_frames: T, number of latent frames (>= 1).
        chunk_frames: T_c (>= 1). ``chunk_frames >= num_frames`` gives one chunk (full softmax attention).
        overlap_frames: T_o (>= 0), may exceed ``chunk_frames``.

    Returns:
        A list with one ``(window_start, query_start, query_end)`` per chunk, in frames: the chunk's queries are
        frames ``[query_start, query_end)``, its softmax keys ``[window_start, query_end)`` and its causal linear
        keys ``[0, window_start)``.

    Raises:
        ValueError: on a non-positive ``num_frames`` or ``chunk_frames`` or a negative ``overlap_frames``.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    check_settings(frame_tokens=1, chunk_frames=chunk_frames, overlap_frames=overlap_frames, stabilizer="lse")
    out = []
    for q0 in range(0, num_frames, chunk_frames):
        out.append((max(q0 - overlap_frames, 0), q0, min(q0 + chunk_frames, num_frames)))
    return out


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when any input is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# The two branches and their merge: the only place the hybrid combination is written down
# ----------------------------------------------------------------------------------------------------------------
def _window_softmax(q, k, v, stabilizer: str, scale: float, acc: torch.dtype):
    """Softmax branch over one window per batch entry.

    q: ``[b, nq, H, D]``, k: ``[b, nk, H, D]``, v: ``[b, nk, H, Dv]``. Returns ``(o, mass)``: ``o`` the
    normalised softmax output ``[b, nq, H, Dv]`` (q's dtype for ``"lse"``, where SDPA computes it with float32
    accumulation; ``acc`` for ``"max"``) and ``mass`` = ``sum_S exp(s_j - c)`` as ``[b, nq, H, 1]`` in ``acc``
    (``None`` for ``"lse"``, where it is exactly 1).
    """
    if stabilizer == "lse":
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        o = o.transpose(1, 2)
        if q.device.type == "cpu":
            # The CPU flash kernel (pytorch/pytorch#141128) returns 0 for a query row holding NaN or Inf instead of
            # NaN: put the NaN back so a non-finite input is never silently dropped. The CUDA kernels propagate
            # NaN themselves (checked on an H200 by benchmarks/bench_attention.py), so they skip these two passes.
            q_bad = ~torch.isfinite(q).all(dim=-1, keepdim=True)
            o = torch.where(q_bad, torch.nan, o)
        return o, None
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    mass = p.sum(dim=-1, keepdim=True)  # [b, H, nq, 1]
    o = torch.einsum("bhqk,bkhd->bqhd", p, v.to(acc)) / mass.transpose(1, 2)
    return o, mass.transpose(1, 2)


def _mm_dtype(q: torch.Tensor, fq: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """dtype of the linear branch's matrix products: bfloat16 when q and the features are both bfloat16, so the
    products run on tensor cores with float32 accumulation inside each product; ``acc`` (float32 / float64)
    otherwise. Sums across frames (the state) are always kept in ``acc``.

    float16 always takes ``acc``: its range (max 65504) does not hold the products' outputs, which are sums over
    the tokens of a frame (``phi_k^T v``) or over every earlier frame (the read-out ``phi_q . z``, about 3e6 at
    Wan2.1's 21 x 1,560 tokens) and overflow to Inf, turning the rows after the first chunk into 0 or NaN.
    bfloat16 has float32's range (design section 3, precision)."""
    if q.dtype == torch.bfloat16 and fq.dtype == q.dtype:
        return q.dtype
    return acc


def _frame_sums(fk, v, frame_tokens: int, mm: torch.dtype, acc: torch.dtype):
    """Per-frame sums of the linear branch: ``kv[f] = sum_{j in f} phi_k(k_j)^T v_j`` and ``ks[f] = sum phi_k(k_j)``.

    fk: ``[B, n, H, D']``, v: ``[B, n, H, Dv]``, ``n`` a multiple of ``frame_tokens``. Each frame's product runs in
    ``mm`` (one batched matrix product over frames and heads); returns ``kv [B, n/S, H, D', Dv]`` and
    ``ks [B, n/S, H, D']`` in ``acc``. Per frame, so the parallel and the recurrent forms round identically.
    """
    B, n, H, Fd = fk.shape
    T = n // frame_tokens
    fkf = fk.view(B, T, frame_tokens, H, Fd)
    vf = v.view(B, T, frame_tokens, H, v.shape[-1])
    kv = torch.einsum("btshf,btshd->bthfd", fkf.to(mm), vf.to(mm)).to(acc)
    ks = fkf.sum(dim=2, dtype=acc)
    return kv, ks


def _readout(fq, s, z, mm: torch.dtype):
    """Linear read-out ``phi_q(q) . S`` and ``phi_q(q) . z`` in one matrix product (z rides along as a column of S).

    fq: ``[B, G, n, H, D']`` (G chunks of n queries), s: ``[B, G, H, D', Dv]``, z: ``[B, G, H, D']`` (acc).
    Returns ``(num [B, G, n, H, Dv], den [B, G, n, H, 1])`` in ``mm`` (the state is rounded to ``mm`` for the
    product when ``mm`` is bfloat16).
    """
    Dv = s.shape[-1]
    pad = (-(Dv + 1)) % 8  # keep the product's width a multiple of 8
    s_aug = torch.cat([s, z.unsqueeze(-1), s.new_zeros(*z.shape, pad)], dim=-1).to(mm)
    out = torch.einsum("bgnhf,bghfe->bgnhe", fq.to(mm), s_aug)
    return out[..., :Dv], out[..., Dv : Dv + 1]


def linear_norm_factor(linear_frames: int, linear_norm_frames: int | None) -> float:
    """The scale of the linear sums of a query whose linear branch holds ``linear_frames`` frames (design section 3).

    Args:
        linear_frames: int >= 0, latent frames in the query's linear branch.
        linear_norm_frames: ``None`` (plain sums, the paper's Eq. 13) or H, an int >= 1.

    Returns:
        ``min(1, H / linear_frames)`` as a Python float, 1.0 for ``None``. Used by every path (parallel, reference,
        recurrent, the mass diagnostic).

    Raises:
        ValueError: ``linear_frames`` not an int >= 0 or ``linear_norm_frames`` not None or an int >= 1.
    """
    check_linear_norm_frames(linear_norm_frames)
    if not isinstance(linear_frames, int) or isinstance(linear_frames, bool) or linear_frames < 0:
        raise ValueError(f"linear_frames must be an int >= 0, got {linear_frames!r}")
    return _factor(linear_frames, linear_norm_frames)


def _factor(n: int, linear_norm_frames: int | None) -> float:
    """:func:`linear_norm_factor` without its checks, for callers whose arguments are already checked."""
    return 1.0 if linear_norm_frames is None or n <= linear_norm_frames else linear_norm_frames / n


def _norm_factors(starts: list[int], linear_norm_frames: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """``[G]`` factors of :func:`linear_norm_factor` for chunks whose linear branch holds ``starts`` frames, in
    ``like``'s dtype and device; ``None`` when every factor is 1 (nothing to scale: the default, decided before
    any list or tensor is built, since the recurrent step calls this per chunk and block)."""
    if linear_norm_frames is None or max(starts) <= linear_norm_frames:
        return None
    return torch.tensor([_factor(n, linear_norm_frames) for n in starts], dtype=like.dtype, device=like.device)


def _row_norm_factors(lin: torch.Tensor, frame_tokens: int, linear_norm_frames: int | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """``[n]`` factors of query rows from their linear-key mask ``lin`` (bool ``[n, N]``: a row's linear frames are
    its linear keys over ``frame_tokens``), in ``dtype`` on ``lin``'s device; the dense paths' form of
    :func:`linear_norm_factor` (the reference, the mass diagnostic)."""
    frames = (lin.sum(-1) // frame_tokens).tolist()
    return torch.tensor([_factor(n, linear_norm_frames) for n in frames], dtype=dtype, device=lin.device)


def _merge(o, mass, num_lin, den_lin, acc: torch.dtype, out_dtype: torch.dtype):
    """Joint normalisation of the two branches (design section 3), computed in ``acc``, returned in ``out_dtype``.

    o: softmax output ``[..., H, Dv]``; mass: softmax mass ``[..., H, 1]`` or ``None`` (= 1); num_lin:
    ``phi_q . S`` ``[..., H, Dv]``; den_lin: ``phi_q . z`` ``[..., H, 1]``, clamped at 0 (the guard).
    """
    o, num_lin = o.to(acc), num_lin.to(acc)
    den_lin = den_lin.to(acc).clamp(min=0)
    if mass is None:
        return ((o + num_lin) / (1 + den_lin)).to(out_dtype)
    return ((o * mass + num_lin) / (mass + den_lin)).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Parallel form
# ----------------------------------------------------------------------------------------------------------------
def _chunk_runs(windows) -> list[tuple[int, int]]:
    """Runs ``(c0, c1)`` of consecutive chunks with the same window shape (query and key frame counts).

    Each run is computed with one SDPA call (its chunks folded into the batch) and its queries, features and
    outputs are views of consecutive tokens. (Equal shapes are always consecutive: only the windows clipped at
    frame 0 and the last, shorter chunk differ from the regular shape.)
    """
    shape = [(q1 - q0, q1 - w0) for w0, q0, q1 in windows]
    runs, c0 = [], 0
    for c in range(1, len(windows) + 1):
        if c == len(windows) or shape[c] != shape[c0]:
            runs.append((c0, c))
            c0 = c
    return runs


def _fold(x: torch.Tensor, B: int, G: int, n: int) -> torch.Tensor:
    """``[B, G*n, H, X]`` -> ``[B*G, n, H, X]`` (a view for a contiguous x with B == 1)."""
    return x.reshape(B * G, n, *x.shape[2:])


def _windows_view(x: torch.Tensor, first: int, size: int, step: int, count: int) -> torch.Tensor:
    """``count`` windows of ``size`` frames, starting at frame ``first`` and ``step`` frames apart, as a view.

    x: ``[B, T, S, H, X]`` (frames, tokens per frame, heads). Returns ``[B, count, size, S, H, X]``; windows overlap
    when ``step < size``. A view (``Tensor.unfold``): no key or value is copied (folding it to
    ``[B * count, size * S, H, X]`` stays a view for B == 1 and copies otherwise), and the backward sums the
    overlapping gradients.
    """
    w = x[:, first:].unfold(1, size, step)[:, :count]  # [B, count, S, H, X, size]
    return w.permute(0, 1, 5, 2, 3, 4)


def _parallel(q, k, v, fq, fk, windows, frame_tokens, causal, stabilizer, scale, acc, linear_norm_frames=None):
    """All chunks at once; see :func:`rehyat_attention`. Returns ``[B, N, H, Dv]`` in q's dtype."""
    B, N, H, D = q.shape
    S, Dv, Fd = frame_tokens, v.shape[-1], fq.shape[-1]
    T = N // S
    mm = _mm_dtype(q, fq, acc)
    # linear branch: per-frame sums, then prefix[e] = sum of frames [0, e) (exclusive cumulative sum, T + 1 rows)
    kv, ks = _frame_sums(fk, v, S, mm, acc)  # [B, T, H, D', Dv], [B, T, H, D']
    prefix_kv = F.pad(kv.cumsum(dim=1), (0, 0, 0, 0, 0, 0, 1, 0))
    prefix_k = F.pad(ks.cumsum(dim=1), (0, 0, 0, 0, 1, 0))
    if not causal:
        # suffix[e] = sum of frames [e, T), summed from the end so no cancellation occurs
        suffix_kv = F.pad(kv.flip(1).cumsum(dim=1).flip(1), (0, 0, 0, 0, 0, 0, 0, 1))
        suffix_k = F.pad(ks.flip(1).cumsum(dim=1).flip(1), (0, 0, 0, 0, 0, 1))
    kf = k.view(B, T, S, H, D)
    vf = v.view(B, T, S, H, Dv)
    outs = []
    for c0, c1 in _chunk_runs(windows):
        G = c1 - c0
        w0, q0, q1 = windows[c0]
        nq, nk = q1 - q0, q1 - w0
        t0, t1 = q0 * S, windows[c1 - 1][2] * S  # the run's query tokens, consecutive
        # softmax branch: the run's chunks folded into the batch of one SDPA call; the run's windows start
        # `step` frames apart and overlap, so keys and values are strided views of the frames (no copy for B == 1)
        step = windows[c0 + 1][0] - w0 if G > 1 else 1
        kg, vg = (_windows_view(x, w0, nk, step, G).reshape(B * G, nk * S, H, x.shape[-1]) for x in (kf, vf))
        o, mass = _window_softmax(_fold(q[:, t0:t1], B, G, nq * S), kg, vg, stabilizer, scale, acc)
        o = o.reshape(B, G, nq * S, H, Dv)
        mass = None if mass is None else mass.reshape(B, G, nq * S, H, 1)
        # linear branch: each chunk reads the sums of the frames before its window (and after it, bidirectional)
        starts = torch.tensor([windows[c][0] for c in range(c0, c1)], device=q.device)
        state_kv, state_k = prefix_kv[:, starts], prefix_k[:, starts]  # [B, G, H, D', Dv], [B, G, H, D']
        if not causal:
            ends = torch.tensor([windows[c][2] for c in range(c0, c1)], device=q.device)
            state_kv, state_k = state_kv + suffix_kv[:, ends], state_k + suffix_k[:, ends]
        factors = _norm_factors([windows[c][0] for c in range(c0, c1)], linear_norm_frames, state_k)
        if factors is not None:  # length normalisation (causal only): chunk g's sums times factors[g]
            state_kv, state_k = state_kv * factors[:, None, None, None], state_k * factors[:, None, None]
        num_lin, den_lin = _readout(fq[:, t0:t1].reshape(B, G, nq * S, H, Fd), state_kv, state_k, mm)
        outs.append(_merge(o, mass, num_lin, den_lin, acc, q.dtype).reshape(B, G * nq * S, H, Dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def rehyat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    frame_tokens: int,
    chunk_frames: int,
    overlap_frames: int,
    causal: bool = True,
    stabilizer: str = "lse",
    scale: float | None = None,
    linear_norm_frames: int | None = None,
) -> torch.Tensor:
    """ReHyAt hybrid attention, parallel form (all chunks at once): training and moderate-length inference.

    Softmax inside each chunk's window through ``torch.nn.functional.scaled_dot_product_attention`` (chunks of
    equal window shape folded into the batch, so any SDPA backend serves), linear attention over the earlier
    frames (or all frames outside the window) from per-frame sums ``phi_k^T v`` and an exclusive cumulative sum
    over frames, accumulated in float32 (float64 for float64 inputs), joint normalisation as in the module
    docstring (paper Eq. 9-13). When q and the features are both bfloat16, the linear branch's matrix products
    (per-frame sums, read-out) run in bfloat16 on tensor cores with float32 accumulation inside each product; in
    every other case, float16 included, they run in float32 (float64 for float64 inputs), since their outputs
    exceed float16's range (``docs/design.md`` section 3, precision). Backward goes through ordinary autograd.

    Args:
        q, k: ``[B, N, H, D]`` (diffusers layout; RoPE already applied if the model uses it), frame-major tokens,
            ``N = frames * frame_tokens``.
        v: ``[B, N, H, Dv]``, same dtype and device as q.
        fq, fk: ``[B, N, H, D']`` feature-mapped q and k (``phi_q(q)``, ``phi_k(k)``); any float dtype, one for both.
            Expected non-negative (see the denominator guard in the module docstring).
        frame_tokens: S, tokens per latent frame (``(H/2)*(W/2)`` for Wan's patch (1, 2, 2)).
        chunk_frames: T_c >= 1; ``chunk_frames >= frames`` makes this exactly full softmax attention.
        overlap_frames: T_o >= 0 earlier frames inside each softmax window; may exceed ``chunk_frames``.
        causal: linear keys are the frames before the window (True, the recurrent variant) or all frames outside
            it (False, bidirectional).
        stabilizer: ``"lse"`` (default) or ``"max"``: the row constant ``c`` subtracted from the window logits.
        scale: logit scale, default ``D ** -0.5``.
        linear_norm_frames: ``None`` (default: plain sums, Eq. 13) or H >= 1 latent frames: a chunk whose linear
            branch holds ``n > H`` frames has its linear sums scaled by ``H / n`` (module docstring; causal only).

    Returns:
        ``[B, N, H, Dv]`` in q's dtype.

    Raises:
        ValueError: mismatched shapes, dtypes or devices, ``N`` not a multiple of ``frame_tokens``,
            ``chunk_frames < 1``, ``overlap_frames < 0``, an unknown ``stabilizer``, or ``linear_norm_frames`` not
            None or an int >= 1 (or given with ``causal=False``); raised before any compute.
    """
    check_settings(
        frame_tokens=frame_tokens, chunk_frames=chunk_frames, overlap_frames=overlap_frames, stabilizer=stabilizer
    )
    check_linear_norm_frames(linear_norm_frames, causal)
    check_qkv(q, k, v, fq, fk)
    T = check_frames(q.shape[1], frame_tokens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype, fq.dtype)
    windows = chunk_windows(T, chunk_frames, overlap_frames)
    return _parallel(q, k, v, fq, fk, windows, frame_tokens, causal, stabilizer, scale, acc, linear_norm_frames)


# ----------------------------------------------------------------------------------------------------------------
# Dense reference: the definition every other path is tested against
# ----------------------------------------------------------------------------------------------------------------
def hybrid_masks(num_frames: int, frame_tokens: int, chunk_frames: int, overlap_frames: int, causal: bool, device=None):
    """Explicit token masks ``(softmax_mask, linear_mask)``, each ``[N, N]`` bool (query rows, key columns)."""
    rows = torch.arange(num_frames * frame_tokens, device=device)
    return hybrid_mask_rows(rows, num_frames, frame_tokens, chunk_frames, overlap_frames, causal)


def hybrid_mask_rows(rows: torch.Tensor, num_frames: int, frame_tokens: int, chunk_frames: int, overlap_frames: int,
                     causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The query rows ``rows`` (token indices, int64 ``[n]``) of :func:`hybrid_masks`, ``[n, N]`` bool each,
    without building the ``[N, N]`` masks."""
    frame = rows // frame_tokens
    chunk = frame // chunk_frames
    w0 = (chunk * chunk_frames - overlap_frames).clamp(min=0)
    w1 = ((chunk + 1) * chunk_frames).clamp(max=num_frames)
    kf = torch.arange(num_frames * frame_tokens, device=rows.device)[None, :] // frame_tokens
    softmax_mask = (kf >= w0[:, None]) & (kf < w1[:, None])
    linear_mask = (kf < w0[:, None]) if causal else ~softmax_mask
    return softmax_mask, linear_mask


def rehyat_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    frame_tokens: int,
    chunk_frames: int,
    overlap_frames: int,
    causal: bool = True,
    stabilizer: str = "lse",
    scale: float | None = None,
    linear_norm_frames: int | None = None,
) -> torch.Tensor:
    """Dense reference of :func:`rehyat_attention`: full ``[N, N]`` scores and explicit masks.

    Same arguments, returns and errors as :func:`rehyat_attention`. Computes in float64 when any input is float64,
    float32 otherwise; memory ``O(B H N^2)``, for tests and small sizes only.
    """
    check_settings(
        frame_tokens=frame_tokens, chunk_frames=chunk_frames, overlap_frames=overlap_frames, stabilizer=stabilizer
    )
    check_linear_norm_frames(linear_norm_frames, causal)
    check_qkv(q, k, v, fq, fk)
    T = check_frames(q.shape[1], frame_tokens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype, fq.dtype)
    soft, lin = hybrid_masks(T, frame_tokens, chunk_frames, overlap_frames, causal, device=q.device)
    row_factor = _row_norm_factors(lin, frame_tokens, linear_norm_frames, acc)  # each query row's normalisation

    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    s = s.masked_fill(~soft, float("-inf"))
    if stabilizer == "lse":
        c = torch.logsumexp(s, dim=-1, keepdim=True)
    else:
        c = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - c)  # zero outside the window
    kernel = torch.einsum("bqhf,bkhf->bhqk", fq.to(acc), fk.to(acc)) * lin * row_factor[:, None]
    va = v.to(acc)
    num = torch.einsum("bhqk,bkhd->bqhd", p + kernel, va)
    den = p.sum(-1) + kernel.sum(-1).clamp(min=0)  # [B, H, N]
    return (num / den.transpose(1, 2).unsqueeze(-1)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Recurrent form (design section 5)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RecurrentState:
    """State of one ReHyAt attention layer between chunks (constant size once ``overlap_frames`` are cached).

    Attributes:
        s: ``[B, H, D', Dv]`` sum of ``phi_k(k_j)^T v_j`` over the frames already moved out of the softmax window
            (float32, float64 for float64 inputs).
        z: ``[B, H, D']`` sum of ``phi_k(k_j)`` over the same frames, same dtype as ``s``.
        k, v, fk: ``[B, n, H, D]``, ``[B, n, H, Dv]``, ``[B, n, H, D']``: keys, values and feature-mapped keys of
            the last ``min(overlap_frames, frames_seen)`` frames (``n`` = those frames x ``frame_tokens``).
        frames_seen: number of latent frames processed so far (the absolute start frame of the next chunk).
    """

    s: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    frames_seen: int = 0

    @classmethod
    def empty(cls, q: torch.Tensor, v: torch.Tensor, fq: torch.Tensor) -> "RecurrentState":
        """An empty state for inputs shaped like ``q`` ``[B, n, H, D]``, ``v`` and ``fq`` ``[B, n, H, D']``."""
        B, _, H, _ = q.shape
        acc = _acc_dtype(q.dtype, fq.dtype)
        return cls(
            s=q.new_zeros(B, H, fq.shape[-1], v.shape[-1], dtype=acc),
            z=q.new_zeros(B, H, fq.shape[-1], dtype=acc),
            k=q.new_zeros(B, 0, H, q.shape[-1]),
            v=v.new_zeros(B, 0, H, v.shape[-1]),
            fk=fq.new_zeros(B, 0, H, fq.shape[-1]),
            frames_seen=0,
        )

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.s, self.z, self.k, self.v, self.fk))


def rehyat_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    state: RecurrentState | None = None,
    *,
    frame_tokens: int,
    overlap_frames: int,
    stabilizer: str = "lse",
    scale: float | None = None,
    compiled: bool = False,
    linear_norm_frames: int | None = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """One chunk of the causal hybrid attention as an RNN step (design section 5).

    The chunk's queries attend with softmax to the cached overlap frames plus the chunk itself, and linearly to
    the state ``(s, z)``; then every frame that leaves the softmax window (all but the last ``overlap_frames``
    frames seen) moves into ``(s, z)``, the rule that equals the parallel causal form. Running the chunks of
    :func:`chunk_windows` in order through this function equals ``rehyat_attention(..., causal=True)``.

    Args:
        q, k, v, fq, fk: one chunk, ``[B, n, H, D]`` / ``[B, n, H, Dv]`` / ``[B, n, H, D']``, ``n`` a multiple
            of ``frame_tokens``; RoPE, if any, applied at absolute positions (start frame
            ``state.frames_seen``).
        state: the state after the previous chunk, or ``None`` for the first chunk. Not modified (the new state
            shares its ``s`` and ``z`` tensors with it while no frame has left the softmax window yet; nothing in
            the library writes into a state in place).
        frame_tokens, overlap_frames, stabilizer, scale: as in :func:`rehyat_attention`.
        compiled: run the step's tensor work through ``torch.compile`` (``dynamic=False``, compiled on first use,
            one compiled function per process). Its graphs depend on the shapes and the cached-token count only,
            not on the chunk's position: a whole sequence compiles to 2-3 graphs (first chunk, later chunks, a
            shorter last chunk) when ``overlap_frames <= chunk_frames``, and to ``ceil(overlap_frames /
            chunk_frames) + 1`` (+ 1) while the cache takes several chunks to fill; beyond ``torch._dynamo``'s
            recompile limit (8 by default, raised by :func:`rehyat.models.compile_blocks`) it runs eagerly.
            Default False (eager).
        linear_norm_frames: as in :func:`rehyat_attention`: the state's sums over ``n > H`` frames are read out
            scaled by ``H / n`` (the state itself keeps the plain sums). Default None.

    Returns:
        ``(y, new_state)``: ``y`` ``[B, n, H, Dv]`` in q's dtype, and the state after this chunk.

    Raises:
        ValueError: as :func:`rehyat_attention`, and when ``state`` does not match the inputs (shape, dtype,
            device of each tensor, the cached-token count, ``frames_seen``), before any work.
    """
    check_settings(frame_tokens=frame_tokens, chunk_frames=None, overlap_frames=overlap_frames, stabilizer=stabilizer)
    check_linear_norm_frames(linear_norm_frames)
    check_qkv(q, k, v, fq, fk)
    n_frames = check_frames(q.shape[1], frame_tokens)
    if state is None:
        state = RecurrentState.empty(q, v, fq)
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True or False, got {compiled!r}")
    _check_state(state, q, k, v, fq, fk, frame_tokens=frame_tokens, overlap_frames=overlap_frames)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    frames_seen = state.frames_seen + n_frames
    # Tokens that stay in the softmax window after this chunk. The core below sees only this count (it stops
    # changing once overlap_frames frames have been seen), never the chunk's position, so a compiled core serves
    # every chunk with a few graphs instead of recompiling for each position.
    keep = min(overlap_frames, frames_seen) * frame_tokens
    # the frames in (s, z) now: those before this chunk's window; a tensor factor (or None), so that a compiled
    # core does not recompile for each value
    factor = _norm_factors([max(state.frames_seen - overlap_frames, 0)], linear_norm_frames, state.z)
    core = _compiled_step_core() if compiled else _step_core
    y, s_new, z_new, k_keep, v_keep, fk_keep = core(
        q, k, v, fq, fk, state.s, state.z, state.k, state.v, state.fk, keep, frame_tokens, stabilizer, scale, factor
    )
    return y, RecurrentState(s=s_new, z=z_new, k=k_keep, v=v_keep, fk=fk_keep, frames_seen=frames_seen)


def _check_state(state: RecurrentState, q, k, v, fq, fk, *, frame_tokens: int, overlap_frames: int) -> None:
    """ValueError naming the field when ``state`` does not match the chunk ``q, k, v, fq, fk`` (shape, dtype and
    device of each tensor; ``frames_seen`` an int >= 0; ``min(overlap_frames, frames_seen) * frame_tokens`` cached
    tokens)."""
    B, _, H, _ = q.shape
    acc = _acc_dtype(q.dtype, fq.dtype)
    expected = {
        "s": ((B, H, fq.shape[-1], v.shape[-1]), acc), "z": ((B, H, fq.shape[-1]), acc),
        "k": ((B, None, H, k.shape[-1]), k.dtype), "v": ((B, None, H, v.shape[-1]), v.dtype),
        "fk": ((B, None, H, fk.shape[-1]), fk.dtype),
    }
    for name, (shape, dtype) in expected.items():
        t = getattr(state, name)
        got = tuple(t.shape)
        if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
            want = "[" + ", ".join("n" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"state does not match the inputs: state.{name} has shape {list(got)}, expected {want}")
        if t.dtype != dtype or t.device != q.device:
            raise ValueError(
                f"state does not match the inputs: state.{name} is {t.dtype} on {t.device}, expected {dtype} on "
                f"{q.device}"
            )
    if not isinstance(state.frames_seen, int) or state.frames_seen < 0:
        raise ValueError(f"state.frames_seen must be an int >= 0, got {state.frames_seen!r}")
    cached = min(overlap_frames, state.frames_seen) * frame_tokens
    if not state.k.shape[1] == state.v.shape[1] == state.fk.shape[1] == cached:
        raise ValueError(
            f"state caches {state.k.shape[1]} tokens, expected min(overlap_frames={overlap_frames}, "
            f"state.frames_seen={state.frames_seen}) * frame_tokens={frame_tokens} = {cached}: "
            "the state was made with other settings"
        )


def _step_core(q, k, v, fq, fk, s, z, ck, cv, cfk, keep: int, frame_tokens: int, stabilizer: str, scale: float,
               factor=None):
    """Tensor part of :func:`rehyat_attention_step`: the chunk's output and the new state's tensors.

    ``(s, z, ck, cv, cfk)`` is the old state (sums, cached overlap keys / values / feature-mapped keys); ``keep``
    the tokens that stay cached after this chunk; ``factor`` ``[1]`` the length normalisation of the read-out, or
    ``None``. Returns ``(y, s, z, k, v, fk)``.
    """
    acc = s.dtype
    k_win = torch.cat([ck, k], dim=1)
    v_win = torch.cat([cv, v], dim=1)
    mm = _mm_dtype(q, fq, acc)
    o, mass = _window_softmax(q, k_win, v_win, stabilizer, scale, acc)
    s_read, z_read = (s, z) if factor is None else (s * factor, z * factor)
    num_lin, den_lin = _readout(fq[:, None], s_read[:, None], z_read[:, None], mm)
    y = _merge(o, mass, num_lin[:, 0], den_lin[:, 0], acc, q.dtype)

    # Frames leaving the softmax window: the first `move` tokens of [cached overlap, chunk]. Their per-frame sums
    # are taken from the cache and the chunk separately (no concatenated copy of the feature-mapped keys), then
    # summed in frame order.
    move = k_win.shape[1] - keep
    c = ck.shape[1]
    m0, m1 = min(move, c), max(move - c, 0)
    sums = [_frame_sums(f[:, :m], x[:, :m], frame_tokens, mm, acc) for f, x, m in ((cfk, cv, m0), (fk, v, m1)) if m > 0]
    if sums:
        kv, ks = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in zip(*sums))
        s, z = s + kv.sum(dim=1), z + ks.sum(dim=1)
    if m0 == c:  # every cached frame leaves: the new cache is the chunk's tail
        fk_keep = fk[:, m1:].clone(memory_format=torch.contiguous_format)
    else:  # overlap_frames > the chunk's frames: part of the old cache stays
        fk_keep = torch.cat([cfk[:, m0:], fk], dim=1)
    # clone: a slice would keep the whole window buffer (overlap + chunk) alive, not just the overlap frames; (s, z)
    # are the old state's tensors when no frame leaves (nothing writes into a state in place)
    dense = torch.contiguous_format  # standard strides, whatever the slice's (B = 1 keeps the window's batch stride)
    return y, s, z, k_win[:, move:].clone(memory_format=dense), v_win[:, move:].clone(memory_format=dense), fk_keep


_COMPILED_STEP_CORE = None


def _compiled_step_core():
    """``torch.compile(_step_core, dynamic=False)``, built on first use (one per process)."""
    global _COMPILED_STEP_CORE
    if _COMPILED_STEP_CORE is None:
        _COMPILED_STEP_CORE = torch.compile(_step_core, dynamic=False)
    return _COMPILED_STEP_CORE


def rehyat_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    frame_tokens: int,
    chunk_frames: int,
    overlap_frames: int,
    stabilizer: str = "lse",
    scale: float | None = None,
    state: RecurrentState | None = None,
    linear_norm_frames: int | None = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """Run a whole sequence chunk by chunk through :func:`rehyat_attention_step`.

    Same inputs as :func:`rehyat_attention` (causal variant only; ``linear_norm_frames`` included). With
    ``state=None`` the sequence starts at frame 0; a given state continues a longer sequence, and its
    ``frames_seen`` must then be a multiple of ``chunk_frames`` for the result to follow the parallel chunking.

    Returns:
        ``(y, state)``: ``y`` ``[B, N, H, Dv]`` in q's dtype, equal to ``rehyat_attention(..., causal=True)``
        on the same (whole) sequence, and the final state.
    """
    check_settings(
        frame_tokens=frame_tokens, chunk_frames=chunk_frames, overlap_frames=overlap_frames, stabilizer=stabilizer
    )
    check_qkv(q, k, v, fq, fk)
    check_frames(q.shape[1], frame_tokens)
    step = chunk_frames * frame_tokens
    outs = []
    for i in range(0, q.shape[1], step):
        sl = slice(i, i + step)
        y, state = rehyat_attention_step(
            q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state,
            frame_tokens=frame_tokens, overlap_frames=overlap_frames, stabilizer=stabilizer, scale=scale,
            linear_norm_frames=linear_norm_frames,
        )
        outs.append(y)
    return torch.cat(outs, dim=1), state
