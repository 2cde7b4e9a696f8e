"""Tests of the ReHyAt hybrid-attention operator ``rehyat.ops.hybrid`` (SPEC sections 2, 3 and 5).

In the style of flash-linear-attention's op tests: each fast path (the parallel form ``rehyat_attention``, the
recurrent form ``rehyat_attention_recurrent`` and a hand-written loop of ``rehyat_attention_step``) is compared
with the dense reference ``rehyat_attention_reference`` on outputs and gradients; the reference itself is
checked against computations written here from the SPEC's definitions (a per-row loop, SDPA, a 2-frame case
by hand), so a bug shared by the library's masks and its fast paths cannot hide.

Layouts: q, k ``[B, N, H, D]``, v ``[B, N, H, Dv]``, fq, fk ``[B, N, H, D']``, N = frames * frame_tokens.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import rehyat.ops.hybrid as hybrid
from rehyat.modules import HedgehogFeatureMap, PolynomialFeatureMap
from rehyat.ops import (
    RecurrentState,
    chunk_windows,
    hybrid_masks,
    rehyat_attention,
    rehyat_attention_recurrent,
    rehyat_attention_reference,
    rehyat_attention_step,
)

pytestmark = pytest.mark.usefixtures("single_thread")

STABILIZERS = ["lse", "max"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, r: torch.Tensor) -> float:
    """||a - r|| / ||r|| in float64 (||a|| when r is exactly zero, e.g. the fq gradient of a layout with no
    linear keys)."""
    a, r = a.double(), r.double()
    if r.norm() == 0:
        return a.norm().item()
    return ((a - r).norm() / r.norm()).item()


@dataclasses.dataclass(frozen=True)
class Case:
    B: int  # batch
    T: int  # frames
    S: int  # tokens per frame
    H: int  # heads
    D: int  # q/k head dim
    F: int  # feature dim D'
    Dv: int  # value head dim
    Tc: int  # chunk_frames
    To: int  # overlap_frames

    @property
    def N(self) -> int:
        return self.T * self.S

    def kw(self, **extra) -> dict:
        return dict(frame_tokens=self.S, chunk_frames=self.Tc, overlap_frames=self.To, **extra)


CASES = {
    "7f_c3_o4": Case(B=1, T=7, S=2, H=2, D=8, F=8, Dv=8, Tc=3, To=4),
    "o4_c1_5tok_b2_DneF_DvneD": Case(B=2, T=5, S=5, H=2, D=8, F=12, Dv=6, Tc=1, To=4),
    "one_frame": Case(B=1, T=1, S=3, H=2, D=4, F=6, Dv=5, Tc=2, To=1),
    "odd_dims": Case(B=2, T=6, S=3, H=3, D=5, F=7, Dv=9, Tc=2, To=1),
    "c1_o0": Case(B=1, T=4, S=4, H=1, D=16, F=32, Dv=16, Tc=1, To=0),
    "o_eq_c": Case(B=1, T=6, S=2, H=2, D=8, F=8, Dv=8, Tc=2, To=2),
    "chunk_ge_T": Case(B=1, T=5, S=3, H=1, D=4, F=4, Dv=4, Tc=8, To=3),
    "1tok_9f": Case(B=1, T=9, S=1, H=2, D=4, F=6, Dv=3, Tc=2, To=3),
    "o_gt_T": Case(B=1, T=3, S=2, H=1, D=4, F=4, Dv=4, Tc=1, To=5),
}
case_params = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def make_inputs(gen, c: Case, dtype=torch.float64, features: str = "rand"):
    """Random q, k, v (normal) and non-negative fq, fk (uniform / sqrt(D'), so the two branches have comparable
    mass); ``features="signed"`` gives normal features with negative entries. Drawn in float64, then cast."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = randn(c.B, c.N, c.H, c.D), randn(c.B, c.N, c.H, c.D)
    v = randn(c.B, c.N, c.H, c.Dv)
    if features == "rand":
        fq = torch.rand(c.B, c.N, c.H, c.F, generator=gen, dtype=torch.float64) / math.sqrt(c.F)
        fk = torch.rand(c.B, c.N, c.H, c.F, generator=gen, dtype=torch.float64) / math.sqrt(c.F)
    else:
        fq, fk = randn(c.B, c.N, c.H, c.F), randn(c.B, c.N, c.H, c.F)
    return tuple(t.to(dtype) for t in (q, k, v, fq, fk))


def step_loop(q, k, v, fq, fk, c: Case, stabilizer="lse", scale=None):
    """The recurrent form written out: ``rehyat_attention_step`` over the chunks in order."""
    state, outs = None, []
    for c0 in range(0, c.T, c.Tc):
        sl = slice(c0 * c.S, min(c0 + c.Tc, c.T) * c.S)
        y, state = rehyat_attention_step(
            q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state,
            frame_tokens=c.S, overlap_frames=c.To, stabilizer=stabilizer, scale=scale,
        )
        outs.append(y)
    return torch.cat(outs, dim=1), state


def naive_rows(q, k, v, fq, fk, *, S, Tc, To, causal, stabilizer, scale=None):
    """Independent float64 definition, one query row at a time, straight from SPEC sections 2-3.

    Key sets come from frame arithmetic here, not from ``hybrid_masks``/``chunk_windows``. The linear mass is
    clamped at 0 like the library's documented guard (a no-op for non-negative features).
    """
    q, k, v, fq, fk = (t.double() for t in (q, k, v, fq, fk))
    B, N, H, D = q.shape
    T = N // S
    scale = D ** -0.5 if scale is None else scale
    y = torch.empty(B, N, H, v.shape[-1], dtype=torch.float64)
    for i in range(N):
        c = (i // S) // Tc
        lo, hi = max(c * Tc - To, 0), min((c + 1) * Tc, T)
        soft = [j for j in range(N) if lo <= j // S < hi]
        lin = [j for j in range(N) if (j // S < lo if causal else not lo <= j // S < hi)]
        logits = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, soft]) * scale
        if stabilizer == "lse":
            cst = logits.logsumexp(-1, keepdim=True)
        else:
            cst = logits.amax(-1, keepdim=True)
        w = (logits - cst).exp()
        num = torch.einsum("bhj,bjhd->bhd", w, v[:, soft])
        den = w.sum(-1)
        if lin:
            kern = torch.einsum("bhf,bjhf->bhj", fq[:, i], fk[:, lin])
            num = num + torch.einsum("bhj,bjhd->bhd", kern, v[:, lin])
            den = den + kern.sum(-1).clamp(min=0)
        y[:, i] = num / den[..., None]
    return y


# ----------------------------------------------------------------------------------------------------------------
# Forward: fast paths vs reference vs independent definitions
# ----------------------------------------------------------------------------------------------------------------
class TestForwardAgainstReference:
    """Parallel and recurrent forms equal the dense reference; the reference equals a per-row loop."""

    @case_params
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_parallel(self, gen, case, causal, stabilizer, dtype):
        x = make_inputs(gen, case, dtype)
        y = rehyat_attention(*x, **case.kw(causal=causal, stabilizer=stabilizer))
        ref = rehyat_attention_reference(*(t.double() for t in x), **case.kw(causal=causal, stabilizer=stabilizer))
        assert y.dtype == dtype and y.shape == (case.B, case.N, case.H, case.Dv)
        assert rel_err(y, ref) <= TOL[dtype]

    @case_params
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_recurrent(self, gen, case, stabilizer, dtype):
        x = make_inputs(gen, case, dtype)
        ref = rehyat_attention_reference(*(t.double() for t in x), **case.kw(causal=True, stabilizer=stabilizer))
        y_rec, state = rehyat_attention_recurrent(*x, **case.kw(stabilizer=stabilizer))
        y_loop, _ = step_loop(*x, case, stabilizer)
        for y in (y_rec, y_loop):
            assert y.dtype == dtype and y.shape == ref.shape
            assert rel_err(y, ref) <= TOL[dtype]
        assert state.frames_seen == case.T

    @case_params
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_reference_equals_row_loop(self, gen, case, causal, stabilizer):
        x = make_inputs(gen, case)
        ref = rehyat_attention_reference(*x, **case.kw(causal=causal, stabilizer=stabilizer))
        naive = naive_rows(*x, S=case.S, Tc=case.Tc, To=case.To, causal=causal, stabilizer=stabilizer)
        assert rel_err(ref, naive) <= 1e-12

    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_custom_scale(self, gen, causal, stabilizer):
        case = CASES["7f_c3_o4"]
        x = make_inputs(gen, case)
        kw = case.kw(causal=causal, stabilizer=stabilizer, scale=0.37)
        naive = naive_rows(*x, S=case.S, Tc=case.Tc, To=case.To, causal=causal, stabilizer=stabilizer, scale=0.37)
        assert rel_err(rehyat_attention(*x, **kw), naive) <= 1e-10
        assert rel_err(rehyat_attention_reference(*x, **kw), naive) <= 1e-10
        if causal:
            y_rec, _ = rehyat_attention_recurrent(*x, **case.kw(stabilizer=stabilizer, scale=0.37))
            assert rel_err(y_rec, naive) <= 1e-10
        # and the scale really is used: the default scale gives a different output
        assert rel_err(rehyat_attention(*x, **case.kw(causal=causal, stabilizer=stabilizer)), naive) > 1e-3

    def test_stabilizers_differ(self, gen):
        """"lse" and "max" are different operators whenever a row has linear keys (SPEC section 3)."""
        case = CASES["7f_c3_o4"]
        x = make_inputs(gen, case)
        y_lse = rehyat_attention(*x, **case.kw(stabilizer="lse"))
        y_max = rehyat_attention(*x, **case.kw(stabilizer="max"))
        for w0, q0, q1 in chunk_windows(case.T, case.Tc, case.To):
            rows = slice(q0 * case.S, q1 * case.S)
            if w0 == 0:  # no linear keys: both are plain softmax attention
                assert rel_err(y_lse[:, rows], y_max[:, rows]) <= 1e-12
            else:
                assert rel_err(y_lse[:, rows], y_max[:, rows]) > 1e-3

    @pytest.mark.parametrize("fmap", ["polynomial", "hedgehog"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_with_real_feature_maps(self, gen, fmap, causal, stabilizer):
        case = CASES["o4_c1_5tok_b2_DneF_DvneD"]
        torch.manual_seed(0)
        if fmap == "polynomial":
            phi_q, phi_k = PolynomialFeatureMap(case.H, case.D, case.F), PolynomialFeatureMap(case.H, case.D, case.F)
        else:
            phi_q, phi_k = HedgehogFeatureMap(case.H, case.D, case.F), HedgehogFeatureMap(case.H, case.D, case.F)
        phi_q, phi_k = phi_q.double(), phi_k.double()
        q, k, v, _, _ = make_inputs(gen, case)
        with torch.no_grad():
            fq, fk = phi_q(q), phi_k(k)
        x = (q, k, v, fq, fk)
        kw = case.kw(causal=causal, stabilizer=stabilizer)
        ref = rehyat_attention_reference(*x, **kw)
        assert rel_err(rehyat_attention(*x, **kw), ref) <= 1e-10
        assert rel_err(ref, naive_rows(*x, S=case.S, Tc=case.Tc, To=case.To, causal=causal, stabilizer=stabilizer)) <= 1e-12
        if causal:
            assert rel_err(rehyat_attention_recurrent(*x, **case.kw(stabilizer=stabilizer))[0], ref) <= 1e-10


class TestSpecialLayouts:
    """Layouts where the operator reduces to something known independently (SPEC section 2)."""

    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("chunk_frames, overlap_frames", [(5, 0), (5, 2), (9, 0), (9, 7)])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_one_chunk_is_full_softmax(self, gen, causal, stabilizer, chunk_frames, overlap_frames, dtype):
        case = Case(B=2, T=5, S=3, H=2, D=6, F=5, Dv=7, Tc=chunk_frames, To=overlap_frames)
        q, k, v, fq, fk = make_inputs(gen, case, dtype)
        expected = F.scaled_dot_product_attention(
            q.double().transpose(1, 2), k.double().transpose(1, 2), v.double().transpose(1, 2)
        ).transpose(1, 2)
        kw = case.kw(causal=causal, stabilizer=stabilizer)
        assert rel_err(rehyat_attention(q, k, v, fq, fk, **kw), expected) <= TOL[dtype]
        assert rel_err(rehyat_attention_reference(q, k, v, fq, fk, **kw), expected) <= TOL[dtype]
        if causal:
            y_rec, _ = rehyat_attention_recurrent(q, k, v, fq, fk, **case.kw(stabilizer=stabilizer))
            assert rel_err(y_rec, expected) <= TOL[dtype]

    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_two_frames_chunk1_by_hand(self, gen, causal, stabilizer):
        """chunk_frames=1, overlap 0, 2 frames: each frame is softmax over itself, plus the other frame linearly
        (frame 1 always; frame 0 only in the bidirectional variant). Written out for one batch entry and head."""
        S, D, Fd, Dv = 3, 4, 5, 2
        case = Case(B=1, T=2, S=S, H=1, D=D, F=Fd, Dv=Dv, Tc=1, To=0)
        q, k, v, fq, fk = make_inputs(gen, case)
        Q, K, V, FQ, FK = (t[0, :, 0] for t in (q, k, v, fq, fk))  # [2S, *]
        f0, f1 = slice(0, S), slice(S, 2 * S)

        def frame_rows(qs, soft, lin):
            logits = Q[qs] @ K[soft].T / math.sqrt(D)
            c = logits.logsumexp(-1, keepdim=True) if stabilizer == "lse" else logits.max(-1, keepdim=True).values
            w = torch.exp(logits - c)
            num, den = w @ V[soft], w.sum(-1, keepdim=True)
            if lin is not None:
                num = num + FQ[qs] @ (FK[lin].T @ V[lin])
                den = den + FQ[qs] @ FK[lin].sum(0, keepdim=True).T
            return num / den

        expected = torch.cat([frame_rows(f0, f0, None if causal else f1), frame_rows(f1, f1, f0)])
        y = rehyat_attention(q, k, v, fq, fk, **case.kw(causal=causal, stabilizer=stabilizer))[0, :, 0]
        assert rel_err(y, expected) <= 1e-12
        # the first frame of the causal variant is exactly softmax over its own frame
        if causal:
            own = torch.softmax(Q[f0] @ K[f0].T / math.sqrt(D), -1) @ V[f0]
            assert rel_err(y[f0], own) <= 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------
GRAD_CASES = ["7f_c3_o4", "o4_c1_5tok_b2_DneF_DvneD", "odd_dims", "o_gt_T"]


def _grads(fn, x, dy):
    x = [t.detach().clone().requires_grad_(True) for t in x]
    y = fn(*x)
    if isinstance(y, tuple):
        y = y[0]
    # materialize_grads: an input that cannot reach the output (fk when no frame ever leaves the softmax window
    # before the last chunk) has a zero gradient, whether or not the path built a graph through it
    return torch.autograd.grad(y, x, dy, allow_unused=True, materialize_grads=True)


class TestGradients:
    """gradcheck of the parallel form, and parallel / recurrent gradients vs the reference's (float64)."""

    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_gradcheck_parallel(self, gen, causal, stabilizer):
        case = Case(B=1, T=3, S=2, H=1, D=3, F=4, Dv=2, Tc=1, To=1)
        x = [t.requires_grad_(True) for t in make_inputs(gen, case)]
        fn = lambda *a: rehyat_attention(*a, **case.kw(causal=causal, stabilizer=stabilizer))  # noqa: E731
        assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-8, rtol=1e-6)

    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_gradcheck_recurrent(self, gen, stabilizer):
        case = Case(B=1, T=3, S=2, H=1, D=3, F=4, Dv=2, Tc=1, To=1)
        x = [t.requires_grad_(True) for t in make_inputs(gen, case)]
        fn = lambda *a: rehyat_attention_recurrent(*a, **case.kw(stabilizer=stabilizer))[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-8, rtol=1e-6)

    @pytest.mark.parametrize("name", GRAD_CASES)
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_parallel_grads_match_reference(self, gen, name, causal, stabilizer):
        case = CASES[name]
        x = make_inputs(gen, case)
        dy = torch.randn(case.B, case.N, case.H, case.Dv, generator=gen, dtype=torch.float64)
        kw = case.kw(causal=causal, stabilizer=stabilizer)
        g = _grads(lambda *a: rehyat_attention(*a, **kw), x, dy)
        g_ref = _grads(lambda *a: rehyat_attention_reference(*a, **kw), x, dy)
        for arg, a, r in zip("q k v fq fk".split(), g, g_ref):
            assert rel_err(a, r) <= 1e-9, arg

    @pytest.mark.parametrize("name", GRAD_CASES)
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_recurrent_grads_match_reference(self, gen, name, stabilizer):
        case = CASES[name]
        x = make_inputs(gen, case)
        dy = torch.randn(case.B, case.N, case.H, case.Dv, generator=gen, dtype=torch.float64)
        g_ref = _grads(lambda *a: rehyat_attention_reference(*a, **case.kw(stabilizer=stabilizer)), x, dy)
        g_rec = _grads(lambda *a: rehyat_attention_recurrent(*a, **case.kw(stabilizer=stabilizer)), x, dy)
        g_loop = _grads(lambda *a: step_loop(*a, case, stabilizer), x, dy)
        for g in (g_rec, g_loop):
            for arg, a, r in zip("q k v fq fk".split(), g, g_ref):
                assert rel_err(a, r) <= 1e-9, arg


# ----------------------------------------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------------------------------------
class TestBFloat16:
    """bf16 inputs: output in bf16, close to the float64 reference on the same (bf16-rounded) values."""

    @pytest.mark.parametrize("name", ["7f_c3_o4", "o4_c1_5tok_b2_DneF_DvneD", "odd_dims"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("feature_dtype", [torch.bfloat16, torch.float32], ids=["fbf16", "ff32"])
    def test_parallel_bf16(self, gen, name, causal, stabilizer, feature_dtype):
        case = CASES[name]
        q, k, v, fq, fk = make_inputs(gen, case, torch.bfloat16)
        fq, fk = fq.to(feature_dtype), fk.to(feature_dtype)
        kw = case.kw(causal=causal, stabilizer=stabilizer)
        y = rehyat_attention(q, k, v, fq, fk, **kw)
        ref = rehyat_attention_reference(*(t.double() for t in (q, k, v, fq, fk)), **kw)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, ref) <= 2e-2
        if causal:
            y_rec, _ = rehyat_attention_recurrent(q, k, v, fq, fk, **case.kw(stabilizer=stabilizer))
            assert y_rec.dtype == torch.bfloat16
            assert rel_err(y_rec, ref) <= 2e-2


FP16_CASE = Case(B=1, T=7, S=320, H=2, D=128, F=256, Dv=128, Tc=2, To=1)


@pytest.fixture(scope="module")
def fp16_wan_inputs():
    """float16 q, k, v and the features of fresh float16 polynomial maps at :data:`FP16_CASE` (built once)."""
    c = FP16_CASE
    g = torch.Generator().manual_seed(15)
    torch.manual_seed(15)
    phi_q, phi_k = (PolynomialFeatureMap(c.H, c.D, c.F).half() for _ in range(2))
    q, k, v = (torch.randn(c.B, c.N, c.H, d, generator=g).half() for d in (c.D, c.D, c.Dv))
    with torch.no_grad():
        fq, fk = phi_q(q), phi_k(k)
    # the test's premise: the largest linear mass of the last chunk is beyond float16's range
    w0 = chunk_windows(c.T, c.Tc, c.To)[-1][0]
    mass = torch.einsum("bnhf,bhf->bnh", fq[:, -c.S:].double(), fk[:, : w0 * c.S].double().sum(1))
    assert mass.max() > 2 * torch.finfo(torch.float16).max
    return q, k, v, fq, fk


class TestFloat16:
    """float16 at Wan2.1-like scales (head dim 128, D' 256, fresh polynomial feature maps in float16, hundreds of
    tokens per frame): the linear masses ``phi_q . z`` exceed float16's range (65504), so the linear branch must
    compute in float32 (design section 3, precision). Before that rule, every row after the first chunks came out
    exactly 0 (an infinite denominator) or NaN."""

    @pytest.mark.parametrize("features", ["module", "float16"], ids=["fmodule", "ff16"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_wan_scale_against_float64_reference(self, fp16_wan_inputs, features, causal, stabilizer):
        """``features="module"``: the feature maps' own output; ``"float16"``: the same features given as float16
        (a user's own maps), which must not take a 16-bit product path either."""
        q, k, v, fq, fk = fp16_wan_inputs
        if features == "float16":
            fq, fk = fq.half(), fk.half()
        c = FP16_CASE
        kw = c.kw(causal=causal, stabilizer=stabilizer)
        ref = rehyat_attention_reference(*(t.double() for t in (q, k, v, fq, fk)), **kw)
        outs = [rehyat_attention(q, k, v, fq, fk, **kw)]
        if causal:
            outs.append(rehyat_attention_recurrent(q, k, v, fq, fk, **c.kw(stabilizer=stabilizer))[0])
            outs.append(step_loop(q, k, v, fq, fk, c, stabilizer)[0])
        for y in outs:
            assert y.dtype == torch.float16
            assert torch.isfinite(y).all()
            assert rel_err(y, ref) <= 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Denominator guard and adversarial inputs
# ----------------------------------------------------------------------------------------------------------------
def assert_convex_combination(y, v, tol):
    """With a non-negative kernel every output row is a convex combination of value rows (weights >= 0 summing to
    1 through the joint normaliser): min_j v_jd - tol <= y_d <= max_j v_jd + tol, per batch entry and head."""
    y, v = y.double(), v.double()
    lo = v.amin(dim=1, keepdim=True)
    hi = v.amax(dim=1, keepdim=True)
    assert torch.isfinite(y).all()
    assert (y >= lo - tol).all() and (y <= hi + tol).all()


class TestDenominatorGuard:
    """The joint denominator never vanishes or changes sign (SPEC section 3), even on adversarial inputs."""

    MAPS = {
        "poly_softplus": lambda H, D: PolynomialFeatureMap(H, D, positivity="softplus"),
        "poly_relu": lambda H, D: PolynomialFeatureMap(H, D, positivity="relu"),
        "poly_exp": lambda H, D: PolynomialFeatureMap(H, D, positivity="exp"),
        "poly_deg3_softplus": lambda H, D: PolynomialFeatureMap(H, D, feature_dim=3 * D, degree=3),
        "hedgehog": lambda H, D: HedgehogFeatureMap(H, D),
    }

    @pytest.mark.parametrize("fmap", list(MAPS))
    @pytest.mark.parametrize("norm", [1.0, 10.0, 1e3])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_large_norm_real_maps(self, gen, fmap, norm, dtype, causal, stabilizer):
        case = Case(B=1, T=5, S=4, H=2, D=8, F=16, Dv=8, Tc=2, To=1)
        torch.manual_seed(0)
        phi_q, phi_k = self.MAPS[fmap](case.H, case.D), self.MAPS[fmap](case.H, case.D)
        q, k, v, _, _ = make_inputs(gen, case)
        q, k, v = (q * norm).to(dtype), (k * norm).to(dtype), v.to(dtype)
        with torch.no_grad():
            fq, fk = phi_q(q), phi_k(k)
        assert (fq >= 0).all() and (fk >= 0).all()
        y = rehyat_attention(q, k, v, fq, fk, **case.kw(causal=causal, stabilizer=stabilizer))
        if fmap == "poly_exp" and norm == 1e3:
            # exp of MLP outputs in the hundreds overflows float32: a documented limitation of the "exp" map (and
            # from input norms of about 30 its finite features already give kernels beyond float32, so NaN).
            # The operator must then not return finite numbers for the rows that read an infinite feature.
            assert not torch.isfinite(fq).all()
            bad_rows = ~torch.isfinite(fq).all(-1)
            assert not torch.isfinite(y[bad_rows]).all(-1).any()
            return
        assert torch.isfinite(fq).all() and torch.isfinite(fk).all()
        assert_convex_combination(y, v, tol=2e-2 * v.abs().max().item() if dtype == torch.bfloat16 else 1e-4)
        if causal:
            y_rec, _ = rehyat_attention_recurrent(q, k, v, fq, fk, **case.kw(stabilizer=stabilizer))
            assert_convex_combination(y_rec, v, tol=2e-2 * v.abs().max().item() if dtype == torch.bfloat16 else 1e-4)

    @pytest.mark.parametrize("name", ["7f_c3_o4", "c1_o0", "odd_dims", "1tok_9f"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_signed_features_guarded_like_reference(self, gen, name, causal, stabilizer):
        case = CASES[name]
        x = make_inputs(gen, case, features="signed")
        kw = case.kw(causal=causal, stabilizer=stabilizer)
        y = rehyat_attention(*x, **kw)
        ref = rehyat_attention_reference(*x, **kw)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) <= 1e-10
        assert rel_err(ref, naive_rows(*x, S=case.S, Tc=case.Tc, To=case.To, causal=causal, stabilizer=stabilizer)) <= 1e-12
        if causal:
            assert rel_err(rehyat_attention_recurrent(*x, **case.kw(stabilizer=stabilizer))[0], ref) <= 1e-10
        # the guard was really exercised: some rows have a negative linear mass
        _, lin = hybrid_masks(case.T, case.S, case.Tc, case.To, causal)
        lin_mass = (torch.einsum("bqhf,bkhf->bhqk", x[3], x[4]) * lin).sum(-1)
        assert (lin_mass < 0).any()

    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_guard_where_unguarded_denominator_is_zero(self, gen, stabilizer):
        """2 frames, chunk 1, causal: choose fq of frame 1 so that phi_q . z = -(softmax mass). Without the guard
        the denominator is exactly 0; with it the linear mass counts as 0, computed here by hand."""
        S, D, Fd, Dv = 2, 4, 3, 3
        case = Case(B=1, T=2, S=S, H=1, D=D, F=Fd, Dv=Dv, Tc=1, To=0)
        q, k, v, fq, fk = make_inputs(gen, case)
        Q, K, V, FK = q[0, :, 0], k[0, :, 0], v[0, :, 0], fk[0, :, 0]
        f0, f1 = slice(0, S), slice(S, 2 * S)
        logits = Q[f1] @ K[f1].T / math.sqrt(D)
        mass = torch.ones(S, 1, dtype=torch.float64)
        if stabilizer == "max":
            mass = torch.exp(logits - logits.max(-1, keepdim=True).values).sum(-1, keepdim=True)
        z = FK[f0].sum(0)  # [Fd]
        fq = fq.clone()
        fq[0, f1, 0] = -mass * z / (z @ z)  # phi_q . z = -mass exactly (up to rounding)
        w = torch.exp(logits - (logits.logsumexp(-1, keepdim=True) if stabilizer == "lse" else logits.max(-1, keepdim=True).values))
        num = w @ V[f1] + fq[0, f1, 0] @ (FK[f0].T @ V[f0])
        expected_f1 = num / w.sum(-1, keepdim=True)  # guard: linear mass clamped to 0
        kw = case.kw(stabilizer=stabilizer)
        for y in (rehyat_attention(q, k, v, fq, fk, **kw), rehyat_attention_recurrent(q, k, v, fq, fk, **kw)[0]):
            assert torch.isfinite(y).all()
            assert rel_err(y[0, f1, 0], expected_f1) <= 1e-10


# ----------------------------------------------------------------------------------------------------------------
# NaN / Inf propagation
# ----------------------------------------------------------------------------------------------------------------
LAYOUTS = {
    # T, S, Tc, To: chunk 0 sees frame 0 by softmax, later chunks linearly
    "c2_o1": (5, 2, 2, 1),
    # overlap > chunk: chunks 0, 1, 2 see frame 0 by softmax, chunks 3, 4 linearly
    "c1_o2": (5, 2, 1, 2),
}


def _run_paths(x, case, causal, stabilizer):
    """Outputs of every fast path on the same inputs (the recurrent ones only for the causal variant)."""
    out = {"parallel": rehyat_attention(*x, **case.kw(causal=causal, stabilizer=stabilizer))}
    if causal:
        out["recurrent"] = rehyat_attention_recurrent(*x, **case.kw(stabilizer=stabilizer))[0]
        out["step_loop"] = step_loop(*x, case, stabilizer)[0]
    return out


class TestNonFinitePropagation:
    """NaN and Inf are never silently dropped: every output that depends on a non-finite input is non-finite, and
    outputs that do not depend on it stay finite."""

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
    @pytest.mark.parametrize("Dv", [4, 3], ids=["Dv=D", "Dv!=D"])  # CPU SDPA: flash kernel iff Dv == D, else math
    def test_nonfinite_q_poisons_only_its_row(self, gen, bad, causal, stabilizer, dtype, Dv):
        case = Case(B=2, T=4, S=3, H=2, D=4, F=4, Dv=Dv, Tc=2, To=1)
        q, k, v, fq, fk = make_inputs(gen, case, dtype)
        b, t, h = 1, 7, 1
        q[b, t, h, 2] = bad
        for path, y in _run_paths((q, k, v, fq, fk), case, causal, stabilizer).items():
            assert not torch.isfinite(y[b, t, h]).any(), path
            others = torch.ones(y.shape[:3], dtype=torch.bool)
            others[b, t, h] = False
            assert torch.isfinite(y[others]).all(), path

    @pytest.mark.parametrize("layout", list(LAYOUTS))
    @pytest.mark.parametrize("arg", ["k", "v", "fk"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
    def test_nonfinite_in_frame0(self, gen, layout, arg, bad, causal, stabilizer, dtype):
        T, S, Tc, To = LAYOUTS[layout]
        case = Case(B=1, T=T, S=S, H=2, D=4, F=4, Dv=4, Tc=Tc, To=To)  # Dv == D: CPU SDPA's flash kernel
        q, k, v, fq, fk = make_inputs(gen, case, dtype)
        q = q.abs()  # all logits with an +inf key are +inf (not -inf, which would legitimately weigh 0)
        x = {"q": q, "k": k, "v": v, "fq": fq, "fk": fk}
        x[arg][0, 1, 0, :] = bad  # token 1 (frame 0), head 0
        windows = chunk_windows(T, Tc, To)
        # which chunks read frame 0 of this argument: k only through softmax, fk only through the linear branch
        # (frame 0 is a linear key of a chunk iff it is outside its window, causal or not), v through both
        sees = {
            "k": [w0 == 0 for w0, _, _ in windows],
            "fk": [w0 > 0 for w0, _, _ in windows],
            "v": [True for _ in windows],
        }[arg]
        for path, y in _run_paths(tuple(x.values()), case, causal, stabilizer).items():
            for (w0, q0, q1), seen in zip(windows, sees):
                rows_finite = torch.isfinite(y[0, q0 * S:q1 * S, 0]).all(-1)  # head 0
                if seen:
                    assert not rows_finite.any(), (path, (w0, q0, q1))
                else:
                    assert rows_finite.all(), (path, (w0, q0, q1))
            assert torch.isfinite(y[:, :, 1]).all(), path  # head 1 untouched

    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_nan_in_k_reaches_every_chunk_through_the_feature_map(self, gen, stabilizer):
        """With fk = phi_k(k), a NaN in k of frame 0 reaches every causal chunk (softmax or linear branch)."""
        T, S, Tc, To = LAYOUTS["c2_o1"]
        case = Case(B=1, T=T, S=S, H=2, D=4, F=8, Dv=4, Tc=Tc, To=To)
        torch.manual_seed(0)
        phi_q, phi_k = PolynomialFeatureMap(case.H, case.D), PolynomialFeatureMap(case.H, case.D)
        q, k, v, _, _ = make_inputs(gen, case)
        k[0, 0, 0, 1] = float("nan")
        with torch.no_grad():
            fq, fk = phi_q(q), phi_k(k)
        for path, y in _run_paths((q, k, v, fq, fk), case, True, stabilizer).items():
            assert not torch.isfinite(y[0, :, 0]).all(-1).any(), path


# ----------------------------------------------------------------------------------------------------------------
# Recurrent state
# ----------------------------------------------------------------------------------------------------------------
class TestCompiledStep:
    """``rehyat_attention_step(..., compiled=True)``: the eager results, with graphs that do not depend on the chunk
    position (inductor on the CPU)."""

    @pytest.mark.parametrize("name", ["7f_c3_o4", "odd_dims", "1tok_9f"])
    def test_matches_eager_with_few_graphs(self, gen, name):
        from torch._dynamo.utils import counters

        case = dataclasses.replace(CASES[name], T=CASES[name].T + 4 * CASES[name].Tc)  # several later chunks
        x = make_inputs(gen, case, torch.float32)
        torch._dynamo.reset()
        counters.clear()
        state_e = state_c = None
        for c0 in range(0, case.T, case.Tc):
            sl = slice(c0 * case.S, min(c0 + case.Tc, case.T) * case.S)
            kw = dict(frame_tokens=case.S, overlap_frames=case.To)
            y_e, state_e = rehyat_attention_step(*(t[:, sl] for t in x), state_e, **kw)
            y_c, state_c = rehyat_attention_step(*(t[:, sl] for t in x), state_c, compiled=True, **kw)
            assert rel_err(y_c, y_e) <= 1e-5
            assert state_c.frames_seen == state_e.frames_seen
            for a, b in ((state_c.s, state_e.s), (state_c.k, state_e.k), (state_c.fk, state_e.fk)):
                assert a.shape == b.shape and rel_err(a, b) <= 1e-5
        # first chunk(s) while the cache fills, the later chunks, a shorter last chunk: never one per position
        n_chunks = -(-case.T // case.Tc)
        assert 1 <= counters["stats"]["unique_graphs"] <= min(n_chunks - 2, 2 + -(-case.To // case.Tc))


class TestRecurrentState:
    """The state has constant size, caches exactly the overlap frames, is not mutated, and can be resumed."""

    def test_constant_size_and_contents(self, gen):
        case = Case(B=1, T=100, S=2, H=2, D=4, F=6, Dv=3, Tc=2, To=3)
        q, k, v, fq, fk = make_inputs(gen, case)
        state, sizes = None, {}
        for c in range(case.T // case.Tc):
            sl = slice(c * case.Tc * case.S, (c + 1) * case.Tc * case.S)
            _, state = rehyat_attention_step(
                q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state, frame_tokens=case.S, overlap_frames=case.To
            )
            seen = (c + 1) * case.Tc
            sizes[c + 1] = state.nbytes()
            assert state.frames_seen == seen
            cached = min(case.To, seen)
            assert state.k.shape[1] == state.v.shape[1] == state.fk.shape[1] == cached * case.S
            # the cache is the last `cached` frames, and (s, z) sum exactly the frames before them
            tail = slice((seen - cached) * case.S, seen * case.S)
            assert torch.equal(state.k, k[:, tail]) and torch.equal(state.v, v[:, tail])
            assert torch.equal(state.fk, fk[:, tail])
            moved = slice(0, (seen - cached) * case.S)
            s_exp = torch.einsum("bnhf,bnhd->bhfd", fk[:, moved], v[:, moved])
            z_exp = fk[:, moved].sum(1)
            assert torch.allclose(state.s, s_exp, rtol=1e-12, atol=1e-12)
            assert torch.allclose(state.z, z_exp, rtol=1e-12, atol=1e-12)
        assert sizes[5] == sizes[50] == sizes[2]  # constant once the overlap frames are cached
        assert sizes[1] < sizes[2]  # after one chunk only 2 of the 3 overlap frames exist

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
    def test_state_accumulates_in_float32_or_better(self, gen, dtype):
        case = CASES["7f_c3_o4"]
        x = make_inputs(gen, case, dtype)
        _, state = rehyat_attention_recurrent(*x, **case.kw())
        assert state.s.dtype == state.z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert state.k.dtype == state.v.dtype == state.fk.dtype == dtype

    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_step_does_not_modify_its_input_state(self, gen, stabilizer):
        case = CASES["o4_c1_5tok_b2_DneF_DvneD"]
        q, k, v, fq, fk = make_inputs(gen, case)
        n = 3 * case.S
        _, state = rehyat_attention_recurrent(
            q[:, :n], k[:, :n], v[:, :n], fq[:, :n], fk[:, :n], **case.kw(stabilizer=stabilizer)
        )
        before = dataclasses.replace(state, **{f: getattr(state, f).clone() for f in ("s", "z", "k", "v", "fk")})
        sl = slice(n, n + case.S)
        y1, new = rehyat_attention_step(
            q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state,
            frame_tokens=case.S, overlap_frames=case.To, stabilizer=stabilizer,
        )
        for f in ("s", "z", "k", "v", "fk"):
            assert torch.equal(getattr(state, f), getattr(before, f)), f
        assert state.frames_seen == before.frames_seen == 3 and new.frames_seen == 4
        # the same step from the same state again gives the same output (nothing hidden was consumed)
        y2, _ = rehyat_attention_step(
            q[:, sl], k[:, sl], v[:, sl], fq[:, sl], fk[:, sl], state,
            frame_tokens=case.S, overlap_frames=case.To, stabilizer=stabilizer,
        )
        assert torch.equal(y1, y2)

    @pytest.mark.parametrize("name", ["7f_c3_o4", "o4_c1_5tok_b2_DneF_DvneD", "1tok_9f", "o_gt_T"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_resume_equals_whole_sequence(self, gen, name, stabilizer):
        case = CASES[name]
        x = make_inputs(gen, case)
        whole = rehyat_attention(*x, **case.kw(causal=True, stabilizer=stabilizer))
        for split_chunks in range(1, -(-case.T // case.Tc)):
            n = split_chunks * case.Tc * case.S
            y1, st = rehyat_attention_recurrent(*(t[:, :n] for t in x), **case.kw(stabilizer=stabilizer))
            y2, st2 = rehyat_attention_recurrent(*(t[:, n:] for t in x), **case.kw(stabilizer=stabilizer), state=st)
            assert rel_err(torch.cat([y1, y2], 1), whole) <= 1e-10
            assert st2.frames_seen == case.T


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------
def _no_compute(*args, **kwargs):
    raise AssertionError("compute ran before the argument checks")


@pytest.fixture
def forbid_compute(monkeypatch):
    """Make every compute helper of the operator fail, so a ValueError proves the check ran first."""
    for name in ("_window_softmax", "_parallel", "_frame_sums", "_readout", "hybrid_masks"):
        monkeypatch.setattr(hybrid, name, _no_compute)


BASE = Case(B=2, T=3, S=2, H=2, D=4, F=5, Dv=3, Tc=2, To=1)


def _bad_inputs(what: str):
    g = torch.Generator().manual_seed(0)
    q, k, v, fq, fk = make_inputs(g, BASE, torch.float32)
    kw = BASE.kw()
    if what == "k_shape":
        k = k[..., :-1]
    elif what == "k_heads":
        k = k[:, :, :1]
    elif what == "v_shape":
        v = v[:, :-1]
    elif what == "fq_shape":
        fq = fq[:, :, :1]
    elif what == "fk_shape":
        fk = fk[..., :-1]
    elif what == "k_dtype":
        k = k.double()
    elif what == "v_dtype":
        v = v.double()
    elif what == "fk_dtype":
        fk = fk.double()
    elif what == "q_int":
        q = q.long()
    elif what == "q_3d":
        q = q[0]
    elif what == "fk_5d":
        fk = fk[None]
    elif what == "N_not_multiple":
        q, k, v, fq, fk = (t[:, :-1] for t in (q, k, v, fq, fk))
    elif what == "frame_tokens_0":
        kw["frame_tokens"] = 0
    elif what == "chunk_frames_0":
        kw["chunk_frames"] = 0
    elif what == "chunk_frames_float":
        kw["chunk_frames"] = 1.5
    elif what == "overlap_frames_neg":
        kw["overlap_frames"] = -1
    elif what == "stabilizer_foo":
        kw["stabilizer"] = "foo"
    return (q, k, v, fq, fk), kw


ERRORS = {
    "k_shape": r"^k must have the shape of q",
    "k_heads": r"^k must have the shape of q",
    "v_shape": r"^v must have shape",
    "fq_shape": r"^fq must have shape",
    "fk_shape": r"^fk must have the shape of fq",
    "k_dtype": r"^k must have the dtype of q",
    "v_dtype": r"^v must have the dtype of q",
    "fk_dtype": r"^fk must have the dtype of fq",
    "q_int": r"^q must be a floating-point",
    "q_3d": r"^q must have 4 dims",
    "fk_5d": r"^fk must have 4 dims",
    "N_not_multiple": r"frame_tokens",
    "frame_tokens_0": r"^frame_tokens must",
    "chunk_frames_0": r"^chunk_frames must",
    "chunk_frames_float": r"^chunk_frames must",
    "overlap_frames_neg": r"^overlap_frames must",
    "stabilizer_foo": r"^stabilizer must",
}


class TestArgumentChecks:
    """Every check raises ValueError naming the argument, before any compute."""

    @pytest.mark.parametrize("what", list(ERRORS))
    @pytest.mark.parametrize(
        "fn", [rehyat_attention, rehyat_attention_reference, rehyat_attention_recurrent], ids=["par", "ref", "rec"]
    )
    def test_errors(self, forbid_compute, what, fn):
        x, kw = _bad_inputs(what)
        with pytest.raises(ValueError, match=ERRORS[what]):
            fn(*x, **kw)

    @pytest.mark.parametrize("what", [w for w in ERRORS if not w.startswith("chunk_frames")])
    def test_errors_step(self, forbid_compute, what):
        x, kw = _bad_inputs(what)
        kw.pop("chunk_frames")
        with pytest.raises(ValueError, match=ERRORS[what]):
            rehyat_attention_step(*x, **kw)

    @pytest.mark.parametrize("mismatch", ["feature_dim", "value_dim", "heads", "batch", "dtype", "overlap", "frame_tokens"])
    def test_step_state_must_match(self, gen, mismatch):
        case = Case(B=2, T=4, S=2, H=2, D=4, F=5, Dv=3, Tc=1, To=1)
        q, k, v, fq, fk = make_inputs(gen, case)
        n = 2 * case.S
        _, state = rehyat_attention_recurrent(*(t[:, :n] for t in (q, k, v, fq, fk)), **case.kw())
        x = [t[:, n:] for t in (q, k, v, fq, fk)]
        kw = dict(frame_tokens=case.S, overlap_frames=case.To)
        if mismatch == "feature_dim":
            x[3], x[4] = x[3][..., :-1], x[4][..., :-1]
        elif mismatch == "value_dim":
            x[2] = x[2][..., :-1]
        elif mismatch == "heads":
            x = [t[:, :, :1] for t in x]
        elif mismatch == "batch":
            x = [t[:1] for t in x]
        elif mismatch == "dtype":
            x = [t.float() for t in x]
        elif mismatch == "overlap":  # the state caches 1 frame, a 2-frame overlap needs 2
            kw["overlap_frames"] = 2
        elif mismatch == "frame_tokens":  # the state caches 2 tokens, 1-token frames would need 1
            kw["frame_tokens"] = 1
        with pytest.raises(ValueError, match=r"^state"):
            rehyat_attention_step(*x, state, **kw)

    @pytest.mark.parametrize(
        "edit, match",
        [
            ("v dtype", r"state\.v is torch\.float32"),
            ("v last dim", r"state\.v has shape \[2, 2, 2, 2\], expected \[2, n, 2, 3\]"),
            ("fk last dim", r"state\.fk has shape"),
            ("k head dim", r"state\.k has shape \[2, 2, 2, 3\], expected \[2, n, 2, 4\]"),
            ("cache batch", r"state\.k has shape \[1, 2, 2, 4\]"),
            ("z shape", r"state\.z has shape"),
            ("s dtype", r"state\.s is torch\.float32"),
            ("frames_seen float", r"frames_seen must be an int >= 0"),
            ("frames_seen negative", r"frames_seen must be an int >= 0"),
        ],
    )
    def test_step_hand_edited_state_is_refused(self, gen, edit, match):
        """A state built or edited by hand: every tensor's shape, dtype and device is checked, with a message
        naming the tensor, before any work (not a PyTorch error from inside the step)."""
        case = Case(B=2, T=4, S=2, H=2, D=4, F=5, Dv=3, Tc=1, To=1)
        q, k, v, fq, fk = make_inputs(gen, case)
        n = 2 * case.S
        _, state = rehyat_attention_recurrent(*(t[:, :n] for t in (q, k, v, fq, fk)), **case.kw())
        changes = {
            "v dtype": dict(v=state.v.float()),
            "v last dim": dict(v=state.v[..., :2]),
            "fk last dim": dict(fk=state.fk[..., :2]),
            "k head dim": dict(k=state.k[..., :3]),
            "cache batch": dict(k=state.k[:1]),
            "z shape": dict(z=state.z[..., :2]),
            "s dtype": dict(s=state.s.float()),
            "frames_seen float": dict(frames_seen=2.0),
            "frames_seen negative": dict(frames_seen=-1),
        }
        state = dataclasses.replace(state, **changes[edit])
        x = [t[:, n:] for t in (q, k, v, fq, fk)]
        with pytest.raises(ValueError, match=match):
            rehyat_attention_step(*x, state, frame_tokens=case.S, overlap_frames=case.To)

    def test_step_compiled_must_be_bool(self, gen):
        case = Case(B=1, T=2, S=2, H=1, D=4, F=4, Dv=4, Tc=1, To=1)
        x = make_inputs(gen, case)
        with pytest.raises(ValueError, match="compiled must be True or False"):
            rehyat_attention_step(*x, None, frame_tokens=case.S, overlap_frames=case.To, compiled="no")

    def test_state_check_runs_before_compute(self, gen, forbid_compute):
        case = Case(B=1, T=2, S=2, H=1, D=4, F=4, Dv=4, Tc=1, To=1)
        q, k, v, fq, fk = make_inputs(gen, case)
        state = RecurrentState.empty(q, v, fq[..., :-1])
        with pytest.raises(ValueError, match=r"^state"):
            rehyat_attention_step(q, k, v, fq, fk, state, frame_tokens=case.S, overlap_frames=case.To)


# ----------------------------------------------------------------------------------------------------------------
# Chunk layout
# ----------------------------------------------------------------------------------------------------------------
class TestChunkLayout:
    """chunk_windows written out by hand for a few layouts; hybrid_masks agrees with chunk_windows."""

    @pytest.mark.parametrize(
        "T, Tc, To, expected",
        [
            (7, 3, 4, [(0, 0, 3), (0, 3, 6), (2, 6, 7)]),
            (7, 3, 1, [(0, 0, 3), (2, 3, 6), (5, 6, 7)]),
            (5, 2, 0, [(0, 0, 2), (2, 2, 4), (4, 4, 5)]),
            (4, 1, 2, [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 3, 4)]),
            (3, 1, 0, [(0, 0, 1), (1, 1, 2), (2, 2, 3)]),
            (21, 3, 1, [(0, 0, 3)] + [(3 * c - 1, 3 * c, 3 * c + 3) for c in range(1, 7)]),
            (4, 5, 2, [(0, 0, 4)]),
            (4, 4, 9, [(0, 0, 4)]),
            (1, 1, 0, [(0, 0, 1)]),
            (1, 3, 3, [(0, 0, 1)]),
        ],
    )
    def test_chunk_windows(self, T, Tc, To, expected):
        assert chunk_windows(T, Tc, To) == expected

    def test_chunk_windows_errors(self):
        with pytest.raises(ValueError, match="num_frames"):
            chunk_windows(0, 1, 0)
        with pytest.raises(ValueError, match="chunk_frames"):
            chunk_windows(3, 0, 0)
        with pytest.raises(ValueError, match="overlap_frames"):
            chunk_windows(3, 1, -1)

    @pytest.mark.parametrize("T, first, size, step, count", [(21, 2, 4, 3, 6), (7, 0, 5, 1, 3), (9, 1, 2, 3, 3),
                                                              (4, 0, 4, 1, 1), (10, 3, 3, 3, 2)])
    @pytest.mark.parametrize("B", [1, 2])
    def test_windows_view_equals_gather(self, gen, T, first, size, step, count, B):
        """The strided key/value windows of the parallel form equal an explicit gather by frame, are a view (for
        B == 1: no copy), and their backward sums the gradients of overlapping windows like the gather's."""
        x = torch.randn(B, T, 3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        idx = torch.tensor([[first + c * step + i for i in range(size)] for c in range(count)])
        got, want = hybrid._windows_view(x, first, size, step, count), x[:, idx]
        assert got.shape == want.shape == (B, count, size, 3, 2, 5)
        assert torch.equal(got, want)
        if B == 1:
            flat = got.reshape(count, size * 3, 2, 5)
            assert flat.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        (g_got,) = torch.autograd.grad(got, x, dy)
        (g_want,) = torch.autograd.grad(want, x, dy)
        assert torch.allclose(g_got, g_want, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("T, S, Tc, To", [(7, 2, 3, 4), (5, 3, 1, 4), (6, 1, 2, 1), (4, 2, 1, 0), (3, 2, 5, 1)])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    def test_hybrid_masks_agree_with_chunk_windows(self, T, S, Tc, To, causal):
        soft, lin = hybrid_masks(T, S, Tc, To, causal)
        N = T * S
        exp_soft = torch.zeros(N, N, dtype=torch.bool)
        exp_lin = torch.zeros(N, N, dtype=torch.bool)
        for w0, q0, q1 in chunk_windows(T, Tc, To):
            rows = slice(q0 * S, q1 * S)
            exp_soft[rows, w0 * S:q1 * S] = True
            if causal:
                exp_lin[rows, :w0 * S] = True
            else:
                exp_lin[rows] = True
                exp_lin[rows, w0 * S:q1 * S] = False
        assert torch.equal(soft, exp_soft)
        assert torch.equal(lin, exp_lin)
        assert not (soft & lin).any()
        # every query attends to its own frame by softmax, and never to a future frame in the causal variant
        frame = torch.arange(N) // S
        assert soft[torch.arange(N), torch.arange(N)].all()
        if causal:
            future = frame[None, :] >= ((frame[:, None] // Tc + 1) * Tc)
            assert not ((soft | lin) & future).any()


def test_state_caches_own_their_memory():
    """The overlap cache must not be a view that keeps the whole (overlap + chunk) window buffer alive."""
    from rehyat.ops import rehyat_attention_step

    g = torch.Generator().manual_seed(0)
    S, H, D = 4, 2, 8
    x = [torch.randn(1, 3 * S, H, D, generator=g) for _ in range(3)]
    f = [torch.rand(1, 3 * S, H, 6, generator=g) for _ in range(2)]
    _, state = rehyat_attention_step(*x, *f, frame_tokens=S, overlap_frames=1)
    for t in (state.k, state.v, state.fk):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
