"""Where the joint normaliser's mass goes: the hybrid's linear share against the teacher's softmax mass.

ReHyAt's two branches share one normaliser (design section 3)::

    y = (sum_S exp(s_j - c) v_j + phi_q . sum_L phi_k^T v_j) / (sum_S exp(s_j - c) + phi_q . sum_L phi_k^T)

so the linear branch's share of a query's attention is ``m_lin / (m_win + m_lin)``, with ``m_win = sum_S exp(s_j - c)``
(exactly 1 for the ``"lse"`` stabiliser) and ``m_lin = phi_q(q) . sum_{j in L} phi_k(k_j)``. Softmax attention over
the same keys (the teacher's logits, same ``c``) would give the linear keys the share
``t_lin / (t_win + t_lin)``, ``t_lin = sum_L exp(s_j - c)``: that is what a causal student can match, since it never
sees the keys outside ``S`` and ``L`` (the future frames, for the causal variant). The bidirectional teacher's own
attention on the linear keys, ``t_lin / (t_win + t_lin + t_rest)``, is reported beside it.

Feature maps whose kernel ``phi_q . phi_k`` is far larger than ``exp(s - c)`` make the linear share 1: the queries
then ignore their own window. :func:`attention_mass` measures it on a deterministic sample of queries (dense over
the keys in float32, so memory is ``O(B H n_queries N)``), for the ``rehyat distill`` / ``rehyat eval`` diagnostics and for the
calibration of the per-head linear scale (:func:`log_scale_for_mass`).
"""

from __future__ import annotations

import torch

from ._checks import check_frames, check_linear_norm_frames, check_qkv, check_settings
from .hybrid import _row_norm_factors, hybrid_mask_rows

__all__ = ["attention_mass", "mass_query_tokens", "log_scale_for_mass", "MASS_QUERIES"]

#: default number of sampled query tokens per call of :func:`attention_mass`
MASS_QUERIES = 256


def mass_query_tokens(num_frames: int, frame_tokens: int, chunk_frames: int, overlap_frames: int, causal: bool = True,
                      max_queries: int = MASS_QUERIES, device=None) -> torch.Tensor:
    """Token indices of the sampled queries: evenly spaced over the queries that have linear keys.

    Those are the queries outside the first chunk whose window does not reach frame 0 (causal), or every query
    of a video longer than its window (bidirectional). Returns a sorted int64 tensor of at most ``max_queries``
    indices (empty when no query has linear keys, e.g. a video of one chunk).
    """
    if not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries must be an int >= 1, got {max_queries!r}")
    frame = torch.arange(num_frames * frame_tokens, device=device) // frame_tokens
    w0 = ((frame // chunk_frames) * chunk_frames - overlap_frames).clamp(min=0)
    w1 = ((frame // chunk_frames + 1) * chunk_frames).clamp(max=num_frames)
    has_linear = (w0 > 0) if causal else (w1 - w0 < num_frames)
    tokens = torch.nonzero(has_linear).flatten()
    if tokens.numel() <= max_queries:
        return tokens
    pick = torch.linspace(0, tokens.numel() - 1, max_queries, device=device).round().long()
    return tokens[pick]


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    *,
    frame_tokens: int,
    chunk_frames: int,
    overlap_frames: int,
    causal: bool = True,
    stabilizer: str = "lse",
    scale: float | None = None,
    max_queries: int = MASS_QUERIES,
    linear_norm_frames: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query masses of the hybrid's two branches and of softmax attention over the same keys.

    Args:
        q, k: ``[B, N, H, D]`` as given to :func:`rehyat.ops.rehyat_attention` (RoPE applied if the model uses it).
        fq, fk: ``[B, N, H, D']`` the feature-mapped q and k the hybrid uses (any scale folded into them).
        frame_tokens, chunk_frames, overlap_frames, causal, stabilizer, scale, linear_norm_frames: as in
            :func:`rehyat.ops.rehyat_attention`.
        max_queries: sampled query tokens (:func:`mass_query_tokens`), default 256.

    Returns:
        A dict of float32 tensors (float64 for float64 inputs) ``[B, n, H]`` over the ``n`` sampled queries
        (``n = 0`` when no query has linear keys), every mass relative to the window's stabiliser ``c``:

        - ``"window"``: ``sum_S exp(s_j - c)`` (1 for ``"lse"``);
        - ``"linear"``: the hybrid's linear mass ``phi_q . sum_L phi_k`` (clamped at 0, as the operator does;
          times the length normalisation when ``linear_norm_frames`` is set);
        - ``"teacher_linear"``: ``sum_L exp(s_j - c)``, softmax's mass on the same linear keys;
        - ``"teacher_rest"``: ``sum exp(s_j - c)`` over the keys in neither set (the future, causal variant);
        - ``"queries"``: the sampled token indices, int64 ``[n]``.

    Only ``"linear"`` is differentiable (with respect to ``fq`` and ``fk``): distillation can fit the linear
    share to softmax's (``rehyat distill --mass-weight``); everything else is computed without autograd.

    Raises:
        ValueError: as :func:`rehyat.ops.rehyat_attention`, before any work.
    """
    check_settings(frame_tokens=frame_tokens, chunk_frames=chunk_frames, overlap_frames=overlap_frames,
                   stabilizer=stabilizer)
    check_linear_norm_frames(linear_norm_frames, causal)
    check_qkv(q, k, k, fq, fk)
    T = check_frames(q.shape[1], frame_tokens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    idx = mass_query_tokens(T, frame_tokens, chunk_frames, overlap_frames, causal, max_queries, device=q.device)
    soft, lin = hybrid_mask_rows(idx, T, frame_tokens, chunk_frames, overlap_frames, causal)  # [n, N]
    acc = torch.float64 if torch.float64 in (q.dtype, fq.dtype) else torch.float32
    with torch.no_grad():
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, idx].to(acc), k.to(acc)) * scale  # [B, H, n, N]
        neg = torch.tensor(float("-inf"), dtype=acc, device=q.device)
        s_win = torch.where(soft, s, neg)
        c = torch.logsumexp(s_win, dim=-1, keepdim=True) if stabilizer == "lse" else s_win.amax(dim=-1, keepdim=True)

        def mass(mask):  # sum over the masked keys of exp(s - c), [B, n, H]
            return torch.exp(torch.where(mask, s, neg) - c).sum(-1).transpose(1, 2)

        out = {"window": mass(soft), "teacher_linear": mass(lin), "teacher_rest": mass(~(soft | lin)), "queries": idx}
    z = torch.einsum("qk,bkhf->bqhf", lin.to(acc), fk.to(acc))  # sum of phi_k over each query's linear keys
    factor = _row_norm_factors(lin, frame_tokens, linear_norm_frames, acc)[:, None]  # [n, 1]
    out["linear"] = (fq[:, idx].to(acc) * z).sum(-1).clamp(min=0) * factor
    return out


def log_scale_for_mass(linear: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-head log scale that centres the hybrid's linear mass on a target mass: ``median(log target) -
    median(log linear)`` over every query (and batch entry) of each head.

    With ``"lse"`` both the hybrid's and softmax's window mass are 1, so the scaled linear mass then has the same
    median as softmax's linear mass, i.e. the same median linear share. Args: ``linear``, ``target`` ``[B, n, H]``
    masses (:func:`attention_mass`'s ``"linear"`` and ``"teacher_linear"``). Returns float64 ``[H]``; 0 for a head
    where either mass has no positive entry (no queries, a feature map that outputs 0, a softmax mass that
    underflows): there is nothing to centre on, and the log of 0 would give a scale of about ``exp(+-708)``, inf or 0
    in float32. Raises ValueError on shapes that differ.
    """
    if linear.shape != target.shape or linear.dim() != 3:
        raise ValueError(f"linear and target must both be [B, n, H], got {tuple(linear.shape)} and "
                         f"{tuple(target.shape)}")
    tiny = torch.finfo(torch.float64).tiny
    la = linear.double().clamp_min(tiny).log().transpose(0, 2).reshape(linear.shape[-1], -1)
    lt = target.double().clamp_min(tiny).log().transpose(0, 2).reshape(target.shape[-1], -1)
    if la.shape[1] == 0:
        return torch.zeros(linear.shape[-1], dtype=torch.float64, device=linear.device)
    positive = (linear > 0).flatten(0, 1).any(dim=0) & (target > 0).flatten(0, 1).any(dim=0)  # [H]
    return torch.where(positive, lt.median(dim=1).values - la.median(dim=1).values, 0.0)
