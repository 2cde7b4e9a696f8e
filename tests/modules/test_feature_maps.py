"""Tests of the learned feature maps ``rehyat.modules.feature_maps`` (SPEC section 4).

Expected values are recomputed here from the maps' definitions and their parameters (one head at a time, plain
matmuls), never taken from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rehyat.modules import FEATURE_MAPS, HedgehogFeatureMap, PolynomialFeatureMap, make_feature_map

pytestmark = pytest.mark.usefixtures("single_thread")

POSITIVITY = {"softplus": F.softplus, "exp": torch.exp, "relu": F.relu}


def poly_by_hand(m: PolynomialFeatureMap, x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [g(u_1), g(u_2)^2, ..., g(u_P)^P], u = W2 gelu(W1 x + b1) + b2, one head at a time (float64)."""
    x = x.double()
    out = []
    for h in range(m.num_heads):
        w1, b1, w2, b2 = (p[h].detach().double() for p in (m.w1, m.b1, m.w2, m.b2))
        u = F.gelu(x[..., h, :] @ w1 + b1) @ w2 + b2
        width = m.feature_dim // m.degree
        g = POSITIVITY[m.positivity]
        out.append(torch.cat([g(u[..., i * width:(i + 1) * width]) ** (i + 1) for i in range(m.degree)], dim=-1))
    return torch.stack(out, dim=-2)


def rand_x(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
class TestShapesAndDtypes:
    """[..., H, D] -> [..., H, D'], float32 output (float64 when the input or the weights are float64)."""

    @pytest.mark.parametrize("cls", [PolynomialFeatureMap, HedgehogFeatureMap])
    @pytest.mark.parametrize("lead", [(), (7,), (2, 7), (2, 3, 7)], ids=["none", "N", "B,N", "B,T,S"])
    def test_shape(self, gen, cls, lead):
        m = cls(3, 5, feature_dim=8)
        y = m(rand_x(gen, *lead, 3, 5, dtype=torch.float32))
        assert y.shape == (*lead, 3, 8)

    @pytest.mark.parametrize("cls", [PolynomialFeatureMap, HedgehogFeatureMap])
    def test_default_feature_dim_is_twice_head_dim(self, gen, cls):
        assert cls(2, 6)(rand_x(gen, 4, 2, 6, dtype=torch.float32)).shape == (4, 2, 12)

    @pytest.mark.parametrize("cls", [PolynomialFeatureMap, HedgehogFeatureMap])
    @pytest.mark.parametrize(
        "x_dtype, w_dtype, out_dtype",
        [
            (torch.float32, torch.float32, torch.float32),
            (torch.bfloat16, torch.float32, torch.float32),
            (torch.bfloat16, torch.bfloat16, torch.bfloat16),
            (torch.float32, torch.bfloat16, torch.bfloat16),
            (torch.float16, torch.float16, torch.float32),  # float16 weights: float32 features (range)
            (torch.float32, torch.float16, torch.float32),
            (torch.float16, torch.float32, torch.float32),
            (torch.float64, torch.float32, torch.float64),
            (torch.float32, torch.float64, torch.float64),
            (torch.float64, torch.float64, torch.float64),
        ],
    )
    def test_dtype(self, gen, cls, x_dtype, w_dtype, out_dtype):
        m = cls(2, 4).to(w_dtype)
        y = m(rand_x(gen, 5, 2, 4, dtype=x_dtype))
        assert y.dtype == out_dtype

    def test_float64_input_is_not_downcast(self, gen):
        """A float64 input through float32 weights keeps float64 precision (the weights are exact in float64)."""
        m = PolynomialFeatureMap(2, 4)
        x = rand_x(gen, 5, 2, 4)
        assert torch.allclose(m(x), poly_by_hand(m, x), rtol=1e-12, atol=1e-14)

    @pytest.mark.parametrize("cls", [PolynomialFeatureMap, HedgehogFeatureMap])
    def test_float16_features_keep_their_range(self, gen, cls):
        """float16 weights: features beyond float16's range (65504) come back finite, in float32, equal to the
        float64 map of the same float16 weights and input (design section 3, precision). The polynomial map's
        4th power of softplus(u ~ 24) is about 3.3e5; the Hedgehog map's scale exp(13) about 4.4e5."""
        torch.manual_seed(0)
        m = PolynomialFeatureMap(2, 16, feature_dim=32, degree=4) if cls is PolynomialFeatureMap else cls(2, 16)
        with torch.no_grad():
            if cls is PolynomialFeatureMap:
                m.b2.add_(24.0)
            else:
                m.log_scale.fill_(13.0)
        x = rand_x(gen, 64, 2, 16, dtype=torch.float16)
        m16 = m.half()
        with torch.no_grad():
            y = m16(x)
            ref = m16.double()(x.double())
        assert ref.max() > torch.finfo(torch.float16).max  # the premise
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
class TestPositivity:
    """Every entry is >= 0 (the hybrid's denominator relies on it), also for large-norm inputs."""

    @pytest.mark.parametrize("positivity", ["softplus", "relu", "exp"])
    @pytest.mark.parametrize("degree", [1, 2, 3])
    @pytest.mark.parametrize("norm", [1.0, 1e3])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_polynomial_non_negative(self, gen, positivity, degree, norm, dtype):
        torch.manual_seed(0)
        m = PolynomialFeatureMap(3, 8, feature_dim=6 * degree, degree=degree, positivity=positivity)
        y = m((rand_x(gen, 64, 3, 8) * norm).to(dtype))
        assert not y.isnan().any()
        assert (y >= 0).all()
        if positivity != "exp":  # exp overflows float32 for MLP outputs > 88 (documented); the others stay finite
            assert torch.isfinite(y).all()

    @pytest.mark.parametrize("norm", [1.0, 1e3, 1e30])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_hedgehog_non_negative_and_bounded(self, gen, norm, dtype):
        m = HedgehogFeatureMap(3, 8)
        with torch.no_grad():
            m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=gen))
        y = m((rand_x(gen, 64, 3, 8) * norm).to(dtype))
        assert torch.isfinite(y).all() and (y >= 0).all()
        # each half is a softmax: sums to the scale (1 at init)
        assert torch.allclose(y[..., :8].sum(-1), torch.ones(()), atol=1e-5)
        assert torch.allclose(y[..., 8:].sum(-1), torch.ones(()), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
class TestPolynomialFeatureMap:
    """The paper's per-head 2-layer MLP with outputs split into P parts raised to powers 1..P."""

    def test_parameter_count_matches_paper(self):
        m = PolynomialFeatureMap(12, 128)
        n = sum(p.numel() for p in m.parameters())
        assert n == 12 * (128 * 256 + 256 + 256 * 256 + 256) == 1_185_792
        assert 1.1e6 < n < 1.3e6  # "about 1.2M parameters per map"
        assert m.w1.shape == (12, 128, 256) and m.w2.shape == (12, 256, 256)

    @pytest.mark.parametrize("positivity", ["softplus", "relu", "exp"])
    @pytest.mark.parametrize(
        "feature_dim, degree, hidden_dim", [(6, 3, None), (8, 2, 5), (4, 1, 3), (12, 6, 7)]
    )
    def test_matches_definition(self, gen, positivity, feature_dim, degree, hidden_dim):
        torch.manual_seed(1)
        m = PolynomialFeatureMap(3, 5, feature_dim=feature_dim, hidden_dim=hidden_dim, degree=degree,
                                 positivity=positivity).double()
        x = rand_x(gen, 2, 4, 3, 5)
        assert torch.allclose(m(x), poly_by_hand(m, x), rtol=1e-12, atol=1e-14)

    def test_degree3_third_part_is_softplus_cubed(self, gen):
        """degree 3, feature_dim 6: entries 4:6 equal softplus(u[4:6])^3 with u computed from the weights."""
        torch.manual_seed(2)
        m = PolynomialFeatureMap(2, 4, feature_dim=6, degree=3).double()
        x = rand_x(gen, 9, 2, 4)
        y = m(x)
        for h in range(2):
            u = F.gelu(x[:, h] @ m.w1[h] + m.b1[h]) @ m.w2[h] + m.b2[h]
            assert torch.allclose(y[:, h, 4:6], F.softplus(u[:, 4:6]) ** 3, rtol=1e-12)
            assert torch.allclose(y[:, h, 2:4], F.softplus(u[:, 2:4]) ** 2, rtol=1e-12)
            assert torch.allclose(y[:, h, 0:2], F.softplus(u[:, 0:2]), rtol=1e-12)

    def test_init_is_nn_linear_default(self):
        torch.manual_seed(3)
        m = PolynomialFeatureMap(4, 16, feature_dim=32, hidden_dim=24)
        for p, fan_in in ((m.w1, 16), (m.b1, 16), (m.w2, 24), (m.b2, 24)):
            bound = fan_in ** -0.5
            assert p.abs().max() <= bound
            assert p.abs().max() > 0.8 * bound  # really spread over the interval, not a tiny init

    def test_extra_repr(self):
        r = repr(PolynomialFeatureMap(2, 4, degree=2, positivity="relu"))
        assert "num_heads=2" in r and "degree=2" in r and "'relu'" in r


# ----------------------------------------------------------------------------------------------------------------
class TestHedgehogFeatureMap:
    """Hedgehog: s_h * [softmax(W x), softmax(-W x)] per head, identity init, learned per-head scale."""

    def test_identity_init_is_softmax_of_x_and_minus_x(self, gen):
        m = HedgehogFeatureMap(3, 5).double()  # D'/2 = D
        x = rand_x(gen, 4, 6, 3, 5)
        expected = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
        assert torch.allclose(m(x), expected, rtol=1e-12, atol=1e-15)

    @pytest.mark.parametrize("feature_dim", [6, 14])
    def test_identity_init_truncated_or_zero_padded(self, gen, feature_dim):
        m = HedgehogFeatureMap(2, 5, feature_dim=feature_dim).double()
        x = rand_x(gen, 7, 2, 5)
        half = feature_dim // 2
        u = torch.cat([x, torch.zeros(7, 2, max(half - 5, 0), dtype=x.dtype)], -1)[..., :half]
        expected = torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1)
        assert torch.allclose(m(x), expected, rtol=1e-12, atol=1e-15)

    def test_scale_is_per_head(self, gen):
        m = HedgehogFeatureMap(3, 4).double()
        x = rand_x(gen, 5, 3, 4)
        base = m(x)
        with torch.no_grad():
            m.log_scale[1] = math.log(2.5)
        y = m(x)
        assert torch.allclose(y[:, 1], 2.5 * base[:, 1], rtol=1e-12)
        assert torch.equal(y[:, 0], base[:, 0]) and torch.equal(y[:, 2], base[:, 2])

    def test_matches_definition_with_trained_weights(self, gen):
        m = HedgehogFeatureMap(2, 4, feature_dim=6).double()
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
            m.log_scale.copy_(torch.randn(2, generator=gen, dtype=torch.float64))
        x = rand_x(gen, 5, 2, 4)
        for h in range(2):
            u = x[:, h] @ m.weight[h]
            expected = m.log_scale[h].exp() * torch.cat([u.softmax(-1), (-u).softmax(-1)], -1)
            assert torch.allclose(m(x)[:, h], expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
MAKERS = {
    "polynomial": lambda: PolynomialFeatureMap(3, 4, feature_dim=6, degree=3),
    "hedgehog": lambda: HedgehogFeatureMap(3, 4),
}


def _perturb_head(m, h, gen):
    with torch.no_grad():
        for p in m.parameters():
            p[h].add_(0.5 * torch.randn(p[h].shape, generator=gen, dtype=p.dtype))


class TestPerHeadAndGradients:
    """Heads are independent (weights and inputs); gradients reach every parameter."""

    @pytest.mark.parametrize("kind", list(MAKERS))
    def test_changing_head0_weights_changes_only_head0(self, gen, kind):
        torch.manual_seed(4)
        m = MAKERS[kind]()
        x = rand_x(gen, 2, 5, 3, 4, dtype=torch.float32)
        before = m(x)
        _perturb_head(m, 0, gen)
        after = m(x)
        assert not torch.allclose(after[..., 0, :], before[..., 0, :])
        assert torch.equal(after[..., 1:, :], before[..., 1:, :])

    @pytest.mark.parametrize("kind", list(MAKERS))
    def test_changing_head0_input_changes_only_head0(self, gen, kind):
        torch.manual_seed(5)
        m = MAKERS[kind]()
        x = rand_x(gen, 5, 3, 4, dtype=torch.float32)
        x2 = x.clone()
        x2[:, 0] += torch.randn(5, 4, generator=gen)  # not a constant shift: a softmax ignores those
        y, y2 = m(x), m(x2)
        assert not torch.allclose(y[:, 0], y2[:, 0])
        assert torch.equal(y[:, 1:], y2[:, 1:])

    @pytest.mark.parametrize("kind", list(MAKERS))
    def test_gradients_reach_every_parameter(self, gen, kind):
        torch.manual_seed(6)
        m = MAKERS[kind]()
        x = rand_x(gen, 4, 3, 4, dtype=torch.float32).requires_grad_(True)
        y = m(x)
        # a random linear functional (a plain sum of a softmax is constant and would give zero gradients)
        (y * torch.randn(y.shape, generator=gen)).sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
            # every head receives its own gradient
            assert (p.grad.flatten(1).abs().sum(1) > 0).all() if p.dim() > 1 else (p.grad.abs() > 0).all(), name
        assert x.grad is not None and (x.grad.abs().sum() > 0)

    @pytest.mark.parametrize("kind", list(MAKERS))
    def test_gradcheck(self, gen, kind):
        torch.manual_seed(7)
        m = MAKERS[kind]().double()
        x = rand_x(gen, 3, 3, 4).requires_grad_(True)
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
class TestErrorsAndFactory:
    """ValueErrors for bad sizes, positivity and inputs; make_feature_map by name."""

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(num_heads=0, head_dim=4), "num_heads"),
            (dict(num_heads=2, head_dim=0), "head_dim"),
            (dict(num_heads=2, head_dim=4, feature_dim=-2), "feature_dim"),
            (dict(num_heads=2, head_dim=4, hidden_dim=0), "hidden_dim"),
            (dict(num_heads=2, head_dim=4, degree=0), "degree"),
            (dict(num_heads=2.0, head_dim=4), "num_heads"),
            (dict(num_heads=2, head_dim=4, feature_dim=7, degree=2), "divisible"),
            (dict(num_heads=2, head_dim=4, positivity="tanh"), "positivity"),
        ],
    )
    def test_polynomial_bad_args(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PolynomialFeatureMap(**kwargs)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(num_heads=0, head_dim=4), "num_heads"),
            (dict(num_heads=2, head_dim=-1), "head_dim"),
            (dict(num_heads=2, head_dim=4, feature_dim=0), "feature_dim"),
            (dict(num_heads=2, head_dim=4, feature_dim=7), "even"),
        ],
    )
    def test_hedgehog_bad_args(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            HedgehogFeatureMap(**kwargs)

    @pytest.mark.parametrize("cls", [PolynomialFeatureMap, HedgehogFeatureMap])
    @pytest.mark.parametrize("shape", [(5, 2, 5), (5, 3, 4), (4,), (5, 4, 2)], ids=["D", "H", "1d", "swapped"])
    def test_bad_input_shape(self, cls, shape):
        m = cls(2, 4)
        with pytest.raises(ValueError, match=r"^x must have shape"):
            m(torch.zeros(shape))

    def test_make_feature_map(self):
        m = make_feature_map("polynomial", 3, 4, feature_dim=6, degree=3, positivity="relu")
        assert isinstance(m, PolynomialFeatureMap)
        assert (m.num_heads, m.head_dim, m.feature_dim, m.degree, m.positivity) == (3, 4, 6, 3, "relu")
        h = make_feature_map("hedgehog", 2, 4, feature_dim=6)
        assert isinstance(h, HedgehogFeatureMap) and (h.num_heads, h.feature_dim) == (2, 6)
        assert set(FEATURE_MAPS) == {"polynomial", "hedgehog"}

    def test_make_feature_map_unknown(self):
        with pytest.raises(ValueError, match="feature_map"):
            make_feature_map("performer", 2, 4)
