"""Tests of ``rehyat.ops.feature_map``: the fused Triton polynomial feature map against the float64 reference.

The fused kernel needs Triton. On a CUDA machine with Triton the ``cuda`` tests run the real kernel (bfloat16 and
float16). Without CUDA but with Triton importable, one test runs the kernel through Triton's CPU interpreter in a
subprocess (float16: the interpreter's bfloat16 matrix product is not numerically meaningful). On a machine with
neither (this project's CPU CI) only the dispatch and error tests run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rehyat.modules import PolynomialFeatureMap, set_fused_feature_maps
from rehyat.ops.feature_map import (
    fused_feature_map_supports,
    fused_result_dtype,
    polynomial_feature_map,
    polynomial_feature_map_fused,
)

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def make_map(gen, H, D, Fd, degree, positivity, hidden=None) -> PolynomialFeatureMap:
    m = PolynomialFeatureMap(H, D, feature_dim=Fd, hidden_dim=hidden, degree=degree, positivity=positivity)
    with torch.no_grad():  # trained-looking weights: a bit larger than the init, so every branch of g is used
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / p.shape[-2] ** 0.5 if p.dim() == 3 else
                    torch.randn(p.shape, generator=gen) * 0.5)
    return m


def weights(m, dtype=None, device="cpu"):
    return tuple(p.detach().to(device=device, dtype=dtype or p.dtype) for p in (m.w1, m.b1, m.w2, m.b2))


# ----------------------------------------------------------------------------------------------------------------
class TestDispatch:
    """Where the fused path is taken; these run everywhere."""

    def test_module_uses_reference_on_cpu(self, gen):
        m = make_map(gen, 2, 16, 32, 2, "softplus")
        x = torch.randn(5, 2, 16, generator=gen)
        torch.testing.assert_close(m(x), polynomial_feature_map(x, *weights(m), degree=2), rtol=0, atol=0)

    @pytest.mark.parametrize(
        "case",
        ["cpu", "float32", "mixed dtypes", "width not power of two", "width above 256", "degree does not divide"],
    )
    def test_supports_false(self, case):
        H, D, Fd, deg, dt = 2, 16, 32, 2, torch.bfloat16
        if case == "float32":
            dt = torch.float32
        if case == "width not power of two":
            D = 24
        if case == "width above 256":
            Fd = 512
        if case == "degree does not divide":
            deg = 3
        m = PolynomialFeatureMap(H, D, feature_dim=Fd, degree=1 if case == "degree does not divide" else deg)
        m = m.to(dt)
        x = torch.randn(4, H, D, dtype=torch.float32 if case == "mixed dtypes" else dt)
        with torch.no_grad():
            assert not fused_feature_map_supports(x, m.w1, m.b1, m.w2, m.b2, deg)

    def test_supports_false_when_gradient_wanted(self):
        m = PolynomialFeatureMap(2, 16).to(torch.bfloat16)
        x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
        assert not fused_feature_map_supports(x, m.w1, m.b1, m.w2, m.b2, 2)  # grad mode on, weights require grad

    def test_gradient_of_a_bias_alone_counts(self):
        """Only the biases trainable (weights frozen, input without grad): a gradient is still wanted, so the
        forward-only kernel must not be chosen (checked with a stand-in CUDA input: the device test is below)."""
        from types import SimpleNamespace

        from rehyat.ops import feature_map as fm

        m = PolynomialFeatureMap(2, 16).to(torch.bfloat16)
        m.w1.requires_grad_(False)
        m.w2.requires_grad_(False)
        x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, requires_grad=False)
        saved = fm._AVAILABLE
        fm._AVAILABLE = True
        try:
            assert not fused_feature_map_supports(x, m.w1, m.b1, m.w2, m.b2, 2)
            with torch.no_grad():
                assert fused_feature_map_supports(x, m.w1, m.b1, m.w2, m.b2, 2)
        finally:
            fm._AVAILABLE = saved

    @pytest.mark.parametrize("bad", ["x heads", "x head dim", "b1", "w2", "b2"])
    def test_fused_refuses_mismatched_shapes(self, bad):
        m = PolynomialFeatureMap(2, 16).to(torch.bfloat16)
        x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
        w1, b1, w2, b2 = weights(m)
        if bad == "x heads":
            x = torch.randn(4, 3, 16, dtype=torch.bfloat16)
        elif bad == "x head dim":
            x = torch.randn(4, 2, 8, dtype=torch.bfloat16)
        elif bad == "b1":
            b1 = b1[:, :-1]
        elif bad == "w2":
            w2 = w2[:, :-1]
        elif bad == "b2":
            b2 = b2[:1]
        name = bad.split()[0]
        with torch.no_grad(), pytest.raises(ValueError, match=rf"^{name} has shape"):
            polynomial_feature_map_fused(x, w1, b1, w2, b2, degree=2)

    def test_module_pickled_before_the_fused_attribute_still_runs(self):
        m = PolynomialFeatureMap(2, 16)
        del m.fused  # as a module pickled by an earlier version
        x = torch.randn(3, 2, 16)
        torch.testing.assert_close(m(x), polynomial_feature_map(x, *weights(m), degree=2), rtol=0, atol=0)

    def test_fused_refuses_cpu_input_with_clear_error(self):
        m = PolynomialFeatureMap(2, 16).to(torch.bfloat16)
        x = torch.randn(4, 2, 16, dtype=torch.bfloat16)
        with torch.no_grad(), pytest.raises(ValueError, match="needs a CUDA input"):
            polynomial_feature_map_fused(x, *weights(m), degree=2)

    def test_fused_refuses_unknown_positivity(self):
        m = PolynomialFeatureMap(2, 16).to(torch.bfloat16)
        with pytest.raises(ValueError, match="positivity must be one of"):
            polynomial_feature_map_fused(torch.randn(4, 2, 16), *weights(m), degree=2, positivity="tanh")

    @pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
    def test_fused_output_dtype_is_the_references(self, dtype, expected):
        """The kernel writes what the reference returns: bfloat16 for bfloat16, float32 for float16 (whose range
        the powers exceed; design section 3)."""
        m = PolynomialFeatureMap(2, 16).to(dtype)
        x = torch.randn(4, 2, 16, dtype=dtype)
        with torch.no_grad():
            assert polynomial_feature_map(x, *weights(m), degree=2).dtype == expected
        assert fused_result_dtype(x) == expected

    def test_set_fused_feature_maps(self):
        model = torch.nn.Sequential(PolynomialFeatureMap(2, 16), torch.nn.Linear(2, 2), PolynomialFeatureMap(2, 16))
        assert all(m.fused for m in model if isinstance(m, PolynomialFeatureMap))
        assert set_fused_feature_maps(model, False) == 2
        assert not any(m.fused for m in model if isinstance(m, PolynomialFeatureMap))


# ----------------------------------------------------------------------------------------------------------------
CASES = [  # H, D, D', degree, positivity, tokens (odd counts: not a multiple of any token tile)
    (3, 32, 64, 2, "softplus", 77),
    (2, 16, 32, 1, "exp", 40),
    (2, 32, 64, 4, "relu", 130),
    (12, 128, 256, 2, "softplus", 1000),  # Wan2.1 head geometry
    (2, 64, 128, 2, "softplus", 1),
]


@cuda_triton
class TestFusedCUDA:
    """The real kernel against the float64 reference: its error must not exceed the PyTorch 16-bit path's."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
    def test_matches_reference(self, gen, case, dtype):
        H, D, Fd, deg, pos, M = case
        m = make_map(gen, H, D, Fd, deg, pos)
        x = torch.randn(M, H, D, generator=gen)
        ref64 = polynomial_feature_map(x.double(), *weights(m, torch.float64), degree=deg, positivity=pos)
        xd, wd = x.to("cuda", dtype), weights(m, dtype, "cuda")
        with torch.no_grad():
            torch16 = polynomial_feature_map(xd, *wd, degree=deg, positivity=pos)
            fused = polynomial_feature_map_fused(xd, *wd, degree=deg, positivity=pos)
        assert fused.dtype == torch16.dtype == fused_result_dtype(xd) and fused.shape == (M, H, Fd)
        e_fused, e_torch = rel_err(fused.cpu(), ref64), rel_err(torch16.cpu(), ref64)
        # both paths round to 16 bits (bfloat16: the output, up to 2^-8 relative; float16: the MLP's activations,
        # the output being float32), so their errors are of that size and either may be the smaller one; the fused
        # path must not be worse beyond that rounding
        assert e_fused <= max(1.5 * e_torch, 4e-3), (e_fused, e_torch)
        assert e_fused < 2e-2  # exp of a bfloat16-rounded argument: about 1e-2 on these weights (H200, measured)
        assert (fused >= 0).all()

    @pytest.mark.parametrize("block_n", [32, 64, 128])
    def test_every_tile_size(self, gen, block_n):
        from rehyat.ops.feature_map import _launch

        m = make_map(gen, 4, 64, 128, 2, "softplus")
        x = torch.randn(3, 101, 4, 64, generator=gen)
        ref64 = polynomial_feature_map(x.double(), *weights(m, torch.float64), degree=2)
        with torch.no_grad():
            out = _launch(x.to("cuda", torch.bfloat16), *weights(m, torch.bfloat16, "cuda"), 2, "softplus", block_n)
        assert rel_err(out.cpu(), ref64) < 1e-2

    def test_non_contiguous_input(self, gen):
        """q sliced out of a fused qkv projection: rows strided, last dim contiguous."""
        m = make_map(gen, 4, 32, 64, 2, "softplus").to("cuda", torch.bfloat16)
        qkv = torch.randn(2, 50, 3, 4, 32, device="cuda", dtype=torch.bfloat16)
        q = qkv[:, :, 0]
        assert not q.is_contiguous()
        w = weights(m, device="cuda")
        with torch.no_grad():
            fused = polynomial_feature_map_fused(q, *w, degree=2)
            ref = polynomial_feature_map(q.contiguous(), *w, degree=2)
        assert rel_err(fused.float().cpu(), ref.double().cpu()) < 1e-2

    def test_module_dispatch_and_grad_fallback(self, gen):
        m = make_map(gen, 4, 32, 64, 2, "softplus").to("cuda", torch.bfloat16)
        x = torch.randn(2, 33, 4, 32, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fused = m(x)
            m.fused = False
            ref = m(x)
            m.fused = True
        assert rel_err(fused.float().cpu(), ref.double().cpu()) < 1e-2
        y = m(x)  # grad mode on and the weights require grad: the reference path, with autograd
        assert y.grad_fn is not None
        y.float().sum().backward()
        assert m.w1.grad is not None
        m.w1.requires_grad_(False)
        m.w2.requires_grad_(False)
        y = m(x)  # only the biases trainable: still the reference path (the kernel has no backward)
        y.float().sum().backward()
        assert m.b1.grad is not None and m.b2.grad is not None

    def test_under_torch_compile(self, gen):
        m = make_map(gen, 4, 32, 64, 2, "softplus").to("cuda", torch.bfloat16)
        x = torch.randn(2, 65, 4, 32, device="cuda", dtype=torch.bfloat16)
        compiled = torch.compile(m, fullgraph=True)
        with torch.no_grad():
            out, ref = compiled(x), m(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs Triton without CUDA (interpreter)")
def test_kernel_in_triton_interpreter():
    """The same kernel through Triton's CPU interpreter (float16), in a subprocess (the interpreter is chosen when the
    kernel is built)."""
    code = textwrap.dedent(
        """
        import torch
        from rehyat.modules import PolynomialFeatureMap
        from rehyat.ops.feature_map import _launch, polynomial_feature_map
        torch.manual_seed(0)
        for H, D, Fd, deg, pos, M in %r:
            m = PolynomialFeatureMap(H, D, Fd, degree=deg, positivity=pos)
            x = torch.randn(M, H, D)
            w64 = [p.detach().double() for p in (m.w1, m.b1, m.w2, m.b2)]
            ref = polynomial_feature_map(x.double(), *w64, degree=deg, positivity=pos)
            w16 = [p.detach().half() for p in (m.w1, m.b1, m.w2, m.b2)]
            out = _launch(x.half(), *w16, deg, pos, block_n=32)
            t16 = polynomial_feature_map(x.half(), *w16, degree=deg, positivity=pos)
            e, et = [float((a.double() - ref).norm() / ref.norm()) for a in (out, t16)]
            assert e <= max(1.2 * et, 1e-3), (H, D, Fd, deg, pos, M, e, et)
        print("ok")
        """
        % ([c for c in CASES if c[1] <= 64],)
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
