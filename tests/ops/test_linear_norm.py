"""Tests of the linear branch's length normalisation (``linear_norm_frames``, design section 3): every path
(parallel, dense reference, recurrent, the mass diagnostic) against a per-row computation written here from the
definition, in float64 with odd sizes; exactness within H frames; refusals before any work.

Layouts: q, k ``[B, N, H, D]``, v ``[B, N, H, Dv]``, fq, fk ``[B, N, H, D']``, N = frames * frame_tokens.
"""

from __future__ import annotations

import pytest
import torch

from rehyat.ops import (
    attention_mass,
    linear_norm_factor,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# (frames, tokens per frame, chunk_frames, overlap_frames, linear_norm_frames): odd sizes, a shorter last chunk,
# an overlap wider than the chunk, H = 1
CASES = [(11, 3, 2, 1, 3), (13, 5, 3, 4, 2), (9, 2, 1, 0, 1), (12, 3, 4, 3, 4)]


def _inputs(T, S, dtype=torch.float64, B=2, H=3, D=5, Fd=7, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = T * S
    q, k = (torch.randn(B, N, H, D, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, N, H, Dv, generator=g, dtype=dtype)
    fq, fk = (torch.rand(B, N, H, Fd, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, fq, fk


def _by_definition(q, k, v, fq, fk, S, Tc, To, Hn):
    """Per query row, from design sections 2 and 3: softmax over the window (lse), linear keys = the frames
    before it, their sums scaled by min(1, Hn / n) for n linear frames, one joint normaliser."""
    B, N, H, D = q.shape
    out = torch.empty(B, N, H, v.shape[-1], dtype=torch.float64)
    for i in range(N):
        c = (i // S) // Tc
        w0, w1 = max(c * Tc - To, 0), min((c + 1) * Tc, N // S)
        n = w0
        f = 1.0 if n <= Hn else Hn / n
        logits = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, w0 * S:w1 * S]) * D ** -0.5
        p = torch.softmax(logits, dim=-1)
        o = torch.einsum("bhk,bkhd->bhd", p, v[:, w0 * S:w1 * S])
        sv = f * torch.einsum("bkhf,bkhd->bhfd", fk[:, :n * S], v[:, :n * S])
        sz = f * fk[:, :n * S].sum(1)
        num = o + torch.einsum("bhf,bhfd->bhd", fq[:, i], sv)
        den = 1 + torch.einsum("bhf,bhf->bh", fq[:, i], sz)[..., None]
        out[:, i] = num / den
    return out


def _rel(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm()).item()


def test_factor():
    assert linear_norm_factor(7, None) == 1.0
    assert linear_norm_factor(5, 9) == linear_norm_factor(9, 9) == 1.0
    assert linear_norm_factor(18, 9) == 0.5
    assert linear_norm_factor(0, 1) == 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="linear_norm_frames must be None or an int >= 1"):
            linear_norm_factor(5, bad)
    with pytest.raises(ValueError, match="linear_frames must be an int >= 0, got -3"):
        linear_norm_factor(-3, 2)


@pytest.mark.parametrize("T,S,Tc,To,Hn", CASES)
def test_reference_and_parallel_match_the_definition(T, S, Tc, To, Hn):
    x = _inputs(T, S)
    want = _by_definition(*x, S, Tc, To, Hn)
    kw = dict(frame_tokens=S, chunk_frames=Tc, overlap_frames=To, linear_norm_frames=Hn)
    assert _rel(rehyat_attention_reference(*x, **kw), want) < 1e-12
    assert _rel(rehyat_attention(*x, **kw), want) < 1e-12
    # the normalisation does change these cases: some chunk holds more than Hn linear frames
    plain = rehyat_attention(*x, **{**kw, "linear_norm_frames": None})
    assert _rel(plain, want) > 1e-3


@pytest.mark.parametrize("T,S,Tc,To,Hn", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_recurrent_matches_parallel(T, S, Tc, To, Hn, dtype, tol):
    x = _inputs(T, S, dtype=dtype, seed=1)
    kw = dict(frame_tokens=S, chunk_frames=Tc, overlap_frames=To, linear_norm_frames=Hn)
    y, state = rehyat_attention_recurrent(*x, **kw)
    assert _rel(y, rehyat_attention(*x, **kw)) < tol
    assert state.frames_seen == T


def test_parallel_gradients_match_reference():
    x = [t.requires_grad_() for t in _inputs(11, 3, seed=2)]
    kw = dict(frame_tokens=3, chunk_frames=2, overlap_frames=1, linear_norm_frames=2)
    dy = torch.randn(2, 33, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = [torch.autograd.grad((fn(*x, **kw) * dy).sum(), x) for fn in (rehyat_attention, rehyat_attention_reference)]
    for a, r in zip(*grads):
        assert _rel(a, r) < 1e-12


def test_no_change_within_the_horizon():
    """H at least the largest number of linear frames: bitwise the plain operator (no factor is applied)."""
    x = _inputs(11, 3, dtype=torch.float32, seed=4)
    kw = dict(frame_tokens=3, chunk_frames=2, overlap_frames=1)  # the last chunk's linear branch holds 9 frames
    plain = rehyat_attention(*x, **kw)
    assert torch.equal(rehyat_attention(*x, **kw, linear_norm_frames=9), plain)
    assert not torch.equal(rehyat_attention(*x, **kw, linear_norm_frames=8), plain)
    assert torch.equal(rehyat_attention_recurrent(*x, **kw, linear_norm_frames=9)[0],
                       rehyat_attention_recurrent(*x, **kw)[0])


def test_mass_diagnostic_scales_the_linear_mass():
    q, k, _, fq, fk = _inputs(13, 2, seed=5)
    kw = dict(frame_tokens=2, chunk_frames=3, overlap_frames=1, max_queries=1000)
    plain, normed = attention_mass(q, k, fq, fk, **kw), attention_mass(q, k, fq, fk, **kw, linear_norm_frames=4)
    frames = (plain["queries"] // 2 // 3) * 3 - 1  # each sampled query's linear frames: its window start
    factor = torch.tensor([min(1.0, 4 / n) for n in frames.tolist()], dtype=torch.float64)
    torch.testing.assert_close(normed["linear"], plain["linear"] * factor[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(normed["teacher_linear"], plain["teacher_linear"], rtol=0, atol=0)
    assert (factor < 1).any()


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "9"])
def test_bad_value_refused_by_every_path(bad):
    x = _inputs(5, 2)
    kw = dict(frame_tokens=2, chunk_frames=2, overlap_frames=1, linear_norm_frames=bad)
    for fn in (rehyat_attention, rehyat_attention_reference, rehyat_attention_recurrent):
        with pytest.raises(ValueError, match=r"linear_norm_frames must be None or an int >= 1"):
            fn(*x, **kw)
    with pytest.raises(ValueError, match=r"linear_norm_frames must be None or an int >= 1"):
        rehyat_attention_step(*x, frame_tokens=2, overlap_frames=1, linear_norm_frames=bad)
    with pytest.raises(ValueError, match=r"linear_norm_frames must be None or an int >= 1"):
        attention_mass(x[0], x[1], x[3], x[4], frame_tokens=2, chunk_frames=2, overlap_frames=1, linear_norm_frames=bad)


def test_bidirectional_refused():
    x = _inputs(5, 2)
    for fn in (rehyat_attention, rehyat_attention_reference):
        with pytest.raises(ValueError, match="linear_norm_frames needs causal=True"):
            fn(*x, frame_tokens=2, chunk_frames=2, overlap_frames=1, causal=False, linear_norm_frames=3)


def test_compiled_step_matches_eager_without_a_graph_per_position():
    """The factor enters the compiled step as a tensor: chunks with different factors share one graph."""
    from torch._dynamo.utils import counters

    x = _inputs(17, 2, dtype=torch.float32, B=1, seed=6)  # 9 chunks of 2 frames (the last of 1), factors 1, 1, 2/3..
    torch._dynamo.reset()
    counters.clear()
    state_e = state_c = None
    for f0 in range(0, 17, 2):
        sl = slice(f0 * 2, min(f0 + 2, 17) * 2)
        kw = dict(frame_tokens=2, overlap_frames=1, linear_norm_frames=2)
        y_e, state_e = rehyat_attention_step(*(t[:, sl] for t in x), state_e, **kw)
        y_c, state_c = rehyat_attention_step(*(t[:, sl] for t in x), state_c, compiled=True, **kw)
        assert _rel(y_c, y_e) <= 1e-5
    # first chunk (empty cache), second (no factor), later chunks (a factor), the shorter last chunk
    assert counters["stats"]["unique_graphs"] <= 4
