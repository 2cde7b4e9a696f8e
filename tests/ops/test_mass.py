"""Tests of the attention-mass diagnostic ``rehyat.ops.mass`` (SPEC section 3: one joint normaliser).

``attention_mass`` is checked against masses written here from the SPEC's definitions, one query row at a time
with key sets from frame arithmetic (not from ``hybrid_masks``); ``mass_query_tokens`` against the queries that
have linear keys by that same arithmetic; ``log_scale_for_mass`` by the medians it promises. A "tiny teacher"
whose softmax is known in closed form (all logits equal) checks the teacher's shares and the calibration of a
constant-kernel feature map, and a Wan-sized case (head dim 128, fresh polynomial feature maps) checks that the
calibration takes the linear share from ~1 down to softmax's.

Layouts: q, k ``[B, N, H, D]``, fq, fk ``[B, N, H, D']``, N = frames * frame_tokens; masses ``[B, n, H]``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rehyat.modules import PolynomialFeatureMap
from rehyat.ops import attention_mass, log_scale_for_mass
from rehyat.ops.mass import mass_query_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

STABILIZERS = ["lse", "max"]


@dataclasses.dataclass(frozen=True)
class Case:
    B: int  # batch
    T: int  # frames
    S: int  # tokens per frame
    H: int  # heads
    D: int  # q/k head dim
    F: int  # feature dim D'
    Tc: int  # chunk_frames
    To: int  # overlap_frames

    @property
    def N(self) -> int:
        return self.T * self.S

    def kw(self, **extra) -> dict:
        return dict(frame_tokens=self.S, chunk_frames=self.Tc, overlap_frames=self.To, **extra)


CASES = {
    "odd_b2_h3": Case(B=2, T=7, S=3, H=3, D=5, F=7, Tc=2, To=1),
    "overlap_gt_chunk": Case(B=2, T=8, S=2, H=2, D=4, F=6, Tc=1, To=3),
    "o_gt_c_c3": Case(B=1, T=9, S=3, H=3, D=6, F=5, Tc=3, To=4),
    "no_overlap": Case(B=2, T=5, S=1, H=2, D=3, F=4, Tc=2, To=0),
}
case_params = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def key_sets(i: int, c: Case, causal: bool) -> tuple[list[int], list[int], list[int]]:
    """(window, linear, rest) key tokens of query token ``i``, from SPEC section 2's frame arithmetic."""
    chunk = (i // c.S) // c.Tc
    lo, hi = max(chunk * c.Tc - c.To, 0), min((chunk + 1) * c.Tc, c.T)
    win = [j for j in range(c.N) if lo <= j // c.S < hi]
    lin = [j for j in range(c.N) if (j // c.S < lo if causal else not lo <= j // c.S < hi)]
    rest = [j for j in range(c.N) if j not in win and j not in lin]
    return win, lin, rest


def eligible_queries(c: Case, causal: bool) -> list[int]:
    """The query tokens that have linear keys."""
    return [i for i in range(c.N) if key_sets(i, c, causal)[1]]


def naive_masses(q, k, fq, fk, c: Case, causal: bool, stabilizer: str, queries: list[int], scale=None) -> dict:
    """Float64 masses ``[B, n, H]`` of ``queries`` by a per-row loop over dense logits, straight from the SPEC."""
    q, k, fq, fk = (t.double() for t in (q, k, fq, fk))
    scale = c.D ** -0.5 if scale is None else scale
    out = {name: torch.zeros(c.B, len(queries), c.H, dtype=torch.float64)
           for name in ("window", "linear", "teacher_linear", "teacher_rest", "all")}
    for n, i in enumerate(queries):
        win, lin, rest = key_sets(i, c, causal)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i], k) * scale  # [B, H, N] every key's logit
        cst = s[..., win].logsumexp(-1) if stabilizer == "lse" else s[..., win].amax(-1)  # [B, H]
        e = (s - cst[..., None]).exp()
        out["window"][:, n] = e[..., win].sum(-1)
        out["teacher_linear"][:, n] = e[..., lin].sum(-1) if lin else 0.0
        out["teacher_rest"][:, n] = e[..., rest].sum(-1) if rest else 0.0
        out["all"][:, n] = e.sum(-1)
        if lin:
            out["linear"][:, n] = torch.einsum("bhf,bjhf->bh", fq[:, i], fk[:, lin]).clamp(min=0)
    return out


def make_inputs(gen, c: Case, dtype=torch.float64):
    """Normal q, k and positive features (uniform / sqrt(D')), drawn in float64 then cast."""
    q = torch.randn(c.B, c.N, c.H, c.D, generator=gen, dtype=torch.float64)
    k = torch.randn(c.B, c.N, c.H, c.D, generator=gen, dtype=torch.float64)
    fq = torch.rand(c.B, c.N, c.H, c.F, generator=gen, dtype=torch.float64) / math.sqrt(c.F)
    fk = torch.rand(c.B, c.N, c.H, c.F, generator=gen, dtype=torch.float64) / math.sqrt(c.F)
    return tuple(t.to(dtype) for t in (q, k, fq, fk))


def close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# attention_mass against the SPEC's definitions
# ----------------------------------------------------------------------------------------------------------------
class TestAttentionMass:
    @case_params
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_against_row_loop(self, gen, case, causal, stabilizer):
        q, k, fq, fk = make_inputs(gen, case)
        got = attention_mass(q, k, fq, fk, **case.kw(causal=causal, stabilizer=stabilizer), max_queries=10_000)
        queries = eligible_queries(case, causal)
        assert queries and got["queries"].tolist() == queries
        want = naive_masses(q, k, fq, fk, case, causal, stabilizer, queries)
        for name in ("window", "linear", "teacher_linear", "teacher_rest"):
            assert got[name].dtype == torch.float64 and got[name].shape == (case.B, len(queries), case.H), name
            close64(got[name], want[name])
        # every key is in exactly one of the three sets: the masses add up to the row's whole softmax mass
        close64(got["window"] + got["teacher_linear"] + got["teacher_rest"], want["all"])
        if stabilizer == "lse":
            close64(got["window"], torch.ones_like(got["window"]))
        else:  # the window's largest logit contributes exp(0) = 1, the others more than 0
            assert (got["window"] >= 1).all() and (got["window"] > 1).any()
        if not causal:  # the bidirectional variant's linear keys are every key outside the window
            assert (got["teacher_rest"] == 0).all()

    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    def test_custom_scale(self, gen, stabilizer):
        c = CASES["odd_b2_h3"]
        q, k, fq, fk = make_inputs(gen, c)
        got = attention_mass(q, k, fq, fk, **c.kw(stabilizer=stabilizer), scale=0.37, max_queries=10_000)
        want = naive_masses(q, k, fq, fk, c, True, stabilizer, got["queries"].tolist(), scale=0.37)
        for name in ("window", "teacher_linear", "teacher_rest"):
            close64(got[name], want[name])
        default = attention_mass(q, k, fq, fk, **c.kw(stabilizer=stabilizer), max_queries=10_000)
        assert not torch.allclose(default["teacher_linear"], got["teacher_linear"])

    def test_linear_is_fq_dot_summed_fk(self, gen):
        """``linear`` of query i is ``fq_i . sum_{j in L(i)} fk_j`` (here from an explicit sum, per head)."""
        c = CASES["overlap_gt_chunk"]
        q, k, fq, fk = make_inputs(gen, c)
        got = attention_mass(q, k, fq, fk, **c.kw(), max_queries=10_000)
        for n, i in enumerate(got["queries"].tolist()):
            lo = max((i // c.S) // c.Tc * c.Tc - c.To, 0)  # the linear keys: frames [0, lo)
            z = fk[:, : lo * c.S].sum(1)  # [B, H, D']
            close64(got["linear"][:, n], (fq[:, i] * z).sum(-1))

    def test_negative_kernel_clamped_at_zero(self, gen):
        c = CASES["odd_b2_h3"]
        q, k, fq, fk = make_inputs(gen, c)
        got = attention_mass(q, k, -fq, fk, **c.kw(), max_queries=10_000)
        assert got["linear"].numel() and (got["linear"] == 0).all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_dtype_and_subsampled_queries(self, gen, dtype):
        c = CASES["o_gt_c_c3"]
        q, k, fq, fk = make_inputs(gen, c, dtype)
        got = attention_mass(q, k, fq, fk, **c.kw(), max_queries=5)
        assert got["queries"].dtype == torch.int64 and got["queries"].tolist() == mass_query_tokens(
            c.T, c.S, c.Tc, c.To, max_queries=5).tolist()
        assert all(got[n].dtype == dtype and got[n].shape == (c.B, 5, c.H)
                   for n in ("window", "linear", "teacher_linear", "teacher_rest"))
        want = naive_masses(q, k, fq, fk, c, True, "lse", got["queries"].tolist())
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for name in ("window", "linear", "teacher_linear", "teacher_rest"):
            torch.testing.assert_close(got[name], want[name].to(dtype), **tol)

    @pytest.mark.parametrize("causal", [True, False])
    def test_one_chunk_video_has_no_queries(self, gen, causal):
        c = Case(B=2, T=3, S=2, H=2, D=4, F=4, Tc=3, To=1)
        q, k, fq, fk = make_inputs(gen, c)
        got = attention_mass(q, k, fq, fk, **c.kw(causal=causal))
        assert got["queries"].numel() == 0
        assert all(got[n].shape == (2, 0, 2) for n in ("window", "linear", "teacher_linear", "teacher_rest"))

    @pytest.mark.parametrize("kw, match", [
        (dict(frame_tokens=0), "frame_tokens"), (dict(chunk_frames=0), "chunk_frames"),
        (dict(overlap_frames=-1), "overlap_frames"), (dict(stabilizer="mean"), "stabilizer"),
        (dict(frame_tokens=4), "frame_tokens"), (dict(max_queries=0), "max_queries"),
    ])
    def test_bad_arguments(self, gen, kw, match):
        c = CASES["odd_b2_h3"]
        q, k, fq, fk = make_inputs(gen, c)
        with pytest.raises(ValueError, match=match):
            attention_mass(q, k, fq, fk, **{**c.kw(), **kw})

    def test_bad_layouts(self, gen):
        c = CASES["odd_b2_h3"]
        q, k, fq, fk = make_inputs(gen, c)
        with pytest.raises(ValueError, match="fk"):
            attention_mass(q, k, fq, fk[..., :-1], **c.kw())
        with pytest.raises(ValueError, match="k must"):
            attention_mass(q, k[:, :-1], fq, fk, **c.kw())


# ----------------------------------------------------------------------------------------------------------------
# mass_query_tokens
# ----------------------------------------------------------------------------------------------------------------
class TestQueryTokens:
    @case_params
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
    @pytest.mark.parametrize("max_queries", [1, 2, 5, 7, 10_000])
    def test_evenly_spaced_queries_with_linear_keys(self, case, causal, max_queries):
        eligible = eligible_queries(case, causal)
        got = mass_query_tokens(case.T, case.S, case.Tc, case.To, causal, max_queries=max_queries).tolist()
        assert len(got) == min(max_queries, len(eligible))
        assert set(got) <= set(eligible) and got == sorted(set(got))
        if len(eligible) <= max_queries:
            assert got == eligible
            return
        pos = [eligible.index(i) for i in got]  # positions in the eligible list: evenly spaced
        assert pos[0] == 0
        if max_queries > 1:
            assert pos[-1] == len(eligible) - 1
            step = (len(eligible) - 1) / (max_queries - 1)
            assert all(math.floor(step) <= b - a <= math.ceil(step) for a, b in zip(pos, pos[1:])), pos

    @pytest.mark.parametrize("causal", [True, False])
    @pytest.mark.parametrize("T, Tc, To", [(3, 3, 1), (2, 5, 0), (1, 1, 0), (4, 4, 9)])
    def test_one_chunk_video_is_empty(self, causal, T, Tc, To):
        got = mass_query_tokens(T, 3, Tc, To, causal)
        assert got.dtype == torch.int64 and got.numel() == 0

    def test_causal_first_window_reaching_frame_0_has_no_linear_keys(self):
        # chunk 1 (frames 2-3) with overlap 2 starts its window at frame 0: only chunk 2 has linear keys
        assert mass_query_tokens(6, 2, 2, 2).tolist() == [8, 9, 10, 11]

    @pytest.mark.parametrize("bad", [0, -3, 1.5, "4", None])
    def test_bad_max_queries(self, bad):
        with pytest.raises(ValueError, match="max_queries"):
            mass_query_tokens(6, 2, 2, 1, max_queries=bad)


# ----------------------------------------------------------------------------------------------------------------
# log_scale_for_mass
# ----------------------------------------------------------------------------------------------------------------
def lower_median_per_head(x: torch.Tensor) -> torch.Tensor:
    """The lower median over batch and queries of each head of ``x [B, n, H]``, by sorting."""
    flat = x.transpose(0, 2).reshape(x.shape[-1], -1).sort(dim=1).values
    return flat[:, (flat.shape[1] - 1) // 2]


class TestLogScaleForMass:
    @pytest.mark.parametrize("shape", [(2, 7, 3), (1, 6, 2), (3, 1, 1)])
    def test_scaled_medians_equal_the_targets(self, gen, shape):
        lin = torch.rand(*shape, generator=gen, dtype=torch.float64) * 50 + 1e-3
        target = torch.rand(*shape, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 3.0, 0.5])[: shape[-1]]
        g = log_scale_for_mass(lin, target)
        assert g.dtype == torch.float64 and g.shape == (shape[-1],)
        close64(lower_median_per_head(lin * g.exp()), lower_median_per_head(target))
        assert not torch.allclose(lower_median_per_head(lin), lower_median_per_head(target))

    def test_float32_inputs(self, gen):
        lin = torch.rand(2, 9, 2, generator=gen) * 100 + 1
        target = torch.rand(2, 9, 2, generator=gen)
        g = log_scale_for_mass(lin, target)
        assert g.dtype == torch.float64
        torch.testing.assert_close(lower_median_per_head(lin.double() * g.exp()),
                                   lower_median_per_head(target.double()), rtol=1e-12, atol=0)

    def test_no_queries_gives_zero(self):
        g = log_scale_for_mass(torch.zeros(2, 0, 3), torch.zeros(2, 0, 3))
        assert g.dtype == torch.float64 and torch.equal(g, torch.zeros(3, dtype=torch.float64))

    @pytest.mark.parametrize("which", ["linear", "target"])
    def test_head_without_positive_entries_gives_zero(self, gen, which):
        """As documented: a head whose masses are all 0 (a feature map that outputs 0, a softmax mass that underflows)
        keeps its scale, instead of a log scale of about +-700 (exp of it: inf or 0 in float32)."""
        lin = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64) + 0.5
        target = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64) + 0.1
        (lin if which == "linear" else target)[..., 1] = 0
        g = log_scale_for_mass(lin, target)
        assert g[1] == 0 and g.isfinite().all()
        ok = [0, 2]
        close64(lower_median_per_head(lin * g.exp())[ok], lower_median_per_head(target)[ok])

    @pytest.mark.parametrize("a, b", [((2, 5, 3), (2, 5, 2)), ((2, 5, 3), (1, 5, 3)), ((5, 3), (5, 3)),
                                      ((1, 2, 5, 3), (1, 2, 5, 3))])
    def test_shapes_must_match(self, a, b):
        with pytest.raises(ValueError, match=r"\[B, n, H\]"):
            log_scale_for_mass(torch.ones(a), torch.ones(b))


# ----------------------------------------------------------------------------------------------------------------
# A tiny teacher whose attention is known: every logit equal
# ----------------------------------------------------------------------------------------------------------------
def known_shares(c: Case, queries: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """With all logits equal, softmax's mass on a key set is proportional to its size: per query, the share of the
    linear keys against the window (causal student's view) and against every key (the bidirectional teacher)."""
    share, mass = [], []
    for i in queries:
        win, lin, rest = key_sets(i, c, True)
        share.append(len(lin) / (len(lin) + len(win)))
        mass.append(len(lin) / (len(lin) + len(win) + len(rest)))
    return torch.tensor(share, dtype=torch.float64), torch.tensor(mass, dtype=torch.float64)


class TestKnownTeacher:
    # frames a multiple of chunk_frames: every query with linear keys has a full window (Tc + To frames)
    CASES = [Case(B=2, T=8, S=3, H=2, D=4, F=5, Tc=2, To=1), Case(B=1, T=9, S=2, H=3, D=4, F=3, Tc=3, To=4)]

    @pytest.mark.parametrize("case", CASES, ids=["c2_o1", "c3_o4"])
    @pytest.mark.parametrize("stabilizer", STABILIZERS)
    @pytest.mark.parametrize("zero", ["k", "q"])
    def test_teacher_shares_in_closed_form(self, gen, case, stabilizer, zero):
        q, k, fq, fk = make_inputs(gen, case)
        q, k = (q, torch.zeros_like(k)) if zero == "k" else (torch.zeros_like(q), k)  # every logit 0
        m = attention_mass(q, k, fq, fk, **case.kw(stabilizer=stabilizer), max_queries=10_000)
        share, mass = known_shares(case, m["queries"].tolist())
        win, t_lin, rest = m["window"], m["teacher_linear"], m["teacher_rest"]
        close64(t_lin / (win + t_lin), share[None, :, None].expand_as(win))
        close64(t_lin / (win + t_lin + rest), mass[None, :, None].expand_as(win))
        if stabilizer == "max":  # c = 0: each key contributes exactly 1
            close64(win, torch.full_like(win, (case.Tc + case.To) * case.S))

    @pytest.mark.parametrize("case", CASES, ids=["c2_o1", "c3_o4"])
    def test_calibrated_constant_kernel_takes_the_known_share(self, gen, case):
        q, k, _, _ = make_inputs(gen, case)
        k = torch.zeros_like(k)
        # constant positive features, a different kernel per head (far too large: the linear branch swamps)
        fq = torch.rand(1, 1, case.H, case.F, generator=gen, dtype=torch.float64).add(1).expand(case.B, case.N, -1, -1)
        fk = torch.rand(1, 1, case.H, case.F, generator=gen, dtype=torch.float64).add(1).expand(case.B, case.N, -1, -1)
        m = attention_mass(q, k, fq, fk, **case.kw(), max_queries=10_000)
        share, _ = known_shares(case, m["queries"].tolist())
        expected = share[None, :, None].expand_as(m["window"])
        before = m["linear"] / (m["window"] + m["linear"])
        assert (before > 0.9).all() and (before - expected).abs().min() > 0.2
        g = log_scale_for_mass(m["linear"], m["teacher_linear"])
        m2 = attention_mass(q, k, fq, fk * g.exp()[:, None], **case.kw(), max_queries=10_000)
        close64(m2["linear"] / (m2["window"] + m2["linear"]), expected)


# ----------------------------------------------------------------------------------------------------------------
# Calibration at Wan sizes: fresh polynomial feature maps swamp the window, the log scale fixes it
# ----------------------------------------------------------------------------------------------------------------
class TestCalibrationAtWanSizes:
    def test_fresh_feature_maps_calibrated_to_softmax_share(self):
        g = torch.Generator().manual_seed(0)
        B, T, S, H, D, Tc, To = 1, 6, 352, 2, 128, 2, 1  # 352 tokens per frame (16 x 22), 2 heads of Wan2.1's
        torch.manual_seed(0)
        phi_q, phi_k = PolynomialFeatureMap(H, D, feature_dim=256), PolynomialFeatureMap(H, D, feature_dim=256)
        # unit-variance entries, as after Wan's RMSNorm across heads and RoPE (a rotation)
        q = torch.randn(B, T * S, H, D, generator=g)
        k = torch.randn(B, T * S, H, D, generator=g)
        with torch.no_grad():
            fq, fk = phi_q(q), phi_k(k)
        kw = dict(frame_tokens=S, chunk_frames=Tc, overlap_frames=To)
        m = attention_mass(q, k, fq, fk, **kw)
        assert m["queries"].numel() == 256

        def shares(m):
            win, lin, t_lin = m["window"], m["linear"], m["teacher_linear"]
            return (lin / (win + lin)).mean().item(), (t_lin / (win + t_lin)).mean().item()

        lin_share, soft_share = shares(m)
        assert lin_share > 0.99 and soft_share < 0.5, (lin_share, soft_share)
        gap = log_scale_for_mass(m["linear"], m["teacher_linear"])
        assert (gap < -1).all(), gap  # the scale goes down, per head
        m2 = attention_mass(q, k, fq, fk * gap.exp().float()[:, None], **kw)
        lin_share2, soft_share2 = shares(m2)
        assert soft_share2 == soft_share
        assert abs(lin_share2 - soft_share2) < 0.1, (lin_share2, soft_share2)
