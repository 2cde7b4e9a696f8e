"""Triton kernels for the linear branch of the parallel form, reading fq, fk, v and the softmax output in their
native ``[B, N, H, X]`` layouts (no permuted copies). An experiment of ``benchmarks/ab_linear_branch.py``, not part of
the library: measured slower than the compiled library operator at 21 and 42 latent frames and 1% faster at 84
(BENCHMARKS.md section 1), so not shipped. Imported only by that script.

frame_sums(fk, v, S)                       -> kv [B, T, H, F, Dv] fp32, ks [B, T, H, F] fp32 (per-frame phi_k^T v, sum phi_k)
readout_merge(fq, o, skv, sk, starts, n)   -> y [B, N, H, Dv], "lse" stabiliser: y = (o + fq S) / (1 + max(fq z, 0))
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _frame_sums_kernel(fk_ptr, v_ptr, kv_ptr, ks_ptr, N, T, H, S: tl.constexpr,
                       F: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    bt = tl.program_id(0)  # b * T + t
    h = tl.program_id(1)
    fb = tl.program_id(2)
    b = bt // T
    t = bt % T
    rf = fb * BF + tl.arange(0, BF)
    rd = tl.arange(0, DV)
    acc = tl.zeros((BF, DV), dtype=tl.float32)
    ks = tl.zeros((BF,), dtype=tl.float32)
    base = (b * N + t * S).to(tl.int64)
    for s0 in range(0, S, BS):
        rs = s0 + tl.arange(0, BS)
        ok = rs < S
        tok = base + rs
        fk = tl.load(fk_ptr + (tok[:, None] * H + h) * F + rf[None, :], mask=ok[:, None], other=0.0)  # [BS, BF]
        v = tl.load(v_ptr + (tok[:, None] * H + h) * DV + rd[None, :], mask=ok[:, None], other=0.0)  # [BS, DV]
        acc += tl.dot(tl.trans(fk), v)
        ks += tl.sum(fk.to(tl.float32), axis=0)
    out = ((bt * H + h) * F + rf).to(tl.int64)
    tl.store(kv_ptr + out[:, None] * DV + rd[None, :], acc)
    tl.store(ks_ptr + out, ks)


def frame_sums(fk, v, S, BS=64, BF=64):
    B, N, H, F = fk.shape
    DV = v.shape[-1]
    T = N // S
    BF = min(BF, F)
    assert F % BF == 0
    fk, v = fk.contiguous(), v.contiguous()
    kv = torch.empty(B, T, H, F, DV, device=fk.device, dtype=torch.float32)
    ks = torch.empty(B, T, H, F, device=fk.device, dtype=torch.float32)
    _frame_sums_kernel[(B * T, H, F // BF)](fk, v, kv, ks, N, T, H, S=S, F=F, DV=DV, BS=BS, BF=BF)
    return kv, ks


@triton.jit
def _readout_merge_kernel(fq_ptr, o_ptr, skv_ptr, sk_ptr, y_ptr, start_ptr, N, H, G, n,
                          so_bg, so_n, so_h,
                          F: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr):
    # program: (b * G + g) * cdiv(n, BM) + m over chunk g's n query tokens; head h
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tiles = tl.cdiv(n, BM)
    bg = pid // tiles
    m = pid % tiles
    b = bg // G
    q0 = tl.load(start_ptr + bg % G)  # first query token of chunk g
    rm = m * BM + tl.arange(0, BM)
    ok = rm < n
    tok = (b * N + q0 + rm).to(tl.int64)
    rf = tl.arange(0, F)
    rd = tl.arange(0, DV)
    fq = tl.load(fq_ptr + (tok[:, None] * H + h) * F + rf[None, :], mask=ok[:, None], other=0.0)  # [BM, F]
    sbase = ((bg * H + h) * F).to(tl.int64)
    s = tl.load(skv_ptr + (sbase + rf[:, None]) * DV + rd[None, :])  # [F, DV] fp32
    z = tl.load(sk_ptr + sbase + rf)  # [F] fp32
    num = tl.dot(fq, s.to(fq.dtype))  # [BM, DV] fp32
    den = tl.maximum(tl.sum(fq.to(tl.float32) * z[None, :], axis=1), 0.0)  # [BM]
    orow = (bg * so_bg + rm * so_n + h * so_h).to(tl.int64)
    o = tl.load(o_ptr + orow[:, None] + rd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    y = (o + num) / (1.0 + den[:, None])
    tl.store(y_ptr + (tok[:, None] * H + h) * DV + rd[None, :], y.to(y_ptr.dtype.element_ty), mask=ok[:, None])


def readout_merge(fq, o, skv, sk, starts, n, BM=64, y=None):
    """fq [B, N, H, F]; o [B * G, n, H, Dv] (the run's softmax output, chunks folded into the batch; any strides,
    last dim contiguous); skv [B, G, H, F, Dv] fp32; sk [B, G, H, F] fp32; starts: the G chunks' first query
    tokens (int32 tensor); n: query tokens per chunk. Writes y [B, N, H, Dv] at the chunks' tokens (others left
    uninitialised: pass y to fill one run at a time)."""
    B, N, H, F = fq.shape
    DV = o.shape[-1]
    G = skv.shape[1]
    assert o.stride(-1) == 1
    if y is None:
        y = torch.empty(B, N, H, DV, device=fq.device, dtype=fq.dtype)
    grid = (B * G * triton.cdiv(n, BM), H)
    _readout_merge_kernel[grid](fq.contiguous(), o, skv.contiguous(), sk.contiguous(), y, starts, N, H, G, n,
                                o.stride(0), o.stride(1), o.stride(2), F=F, DV=DV, BM=BM)
    return y
