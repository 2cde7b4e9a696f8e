"""rehyat.testing.assert_outputs_close: a tolerance tied to the dtype, relative to the outputs' size."""

from __future__ import annotations

import pytest
import torch

from rehyat.testing import OUTPUT_TOLERANCES, assert_outputs_close


@pytest.mark.parametrize("dtype", list(OUTPUT_TOLERANCES), ids=str)
def test_rounding_passes_and_real_differences_fail(dtype):
    ref = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype) * 1e3
    eps = torch.finfo(dtype).eps
    assert_outputs_close(ref + ref.abs().max() * eps, ref)  # one ulp of the largest entry, everywhere
    with pytest.raises(AssertionError):
        assert_outputs_close(ref * (1 + 100 * OUTPUT_TOLERANCES[dtype][0]), ref)
    bumped = ref.clone()
    bumped[ref.abs().argmin()] += 100 * OUTPUT_TOLERANCES[dtype][1] * ref.abs().max()  # the smallest entry
    with pytest.raises(AssertionError):
        assert_outputs_close(bumped, ref)


def test_float32_is_tighter_than_bfloat16_and_scales_with_the_outputs():
    ref = torch.ones(8)
    with pytest.raises(AssertionError):
        assert_outputs_close(ref + 1e-3, ref)
    assert_outputs_close((ref + 1e-3).bfloat16(), ref.bfloat16())
    assert_outputs_close(ref * 1e-6 + 1e-12, ref * 1e-6)
    with pytest.raises(AssertionError):
        assert_outputs_close(ref * 1e-6 + 1e-9, ref * 1e-6)  # 1e-3 relative: absolute 1e-9 is not "tiny" here


def test_nan_shape_and_dtype_mismatches_fail():
    ref = torch.tensor([1.0, float("nan")])
    with pytest.raises(AssertionError):
        assert_outputs_close(ref, ref)
    with pytest.raises(AssertionError):
        assert_outputs_close(torch.ones(3), torch.ones(2))
    with pytest.raises(AssertionError):
        assert_outputs_close(torch.ones(2).double(), torch.ones(2))
    with pytest.raises(AssertionError, match="block 3"):
        assert_outputs_close(torch.zeros(2), torch.ones(2), msg="block 3")


def test_integer_dtype_refused():
    with pytest.raises(ValueError, match="expected must have a floating dtype"):
        assert_outputs_close(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
