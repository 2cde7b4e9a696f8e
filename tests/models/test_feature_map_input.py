"""What the feature maps see of q, k: rotated (the paper's), unrotated, or rotated in height and width only
(``"spatial"``), which makes the linear branch independent of absolute frame positions (design section 4)."""

from __future__ import annotations

import copy

import pytest
import torch

from rehyat.models import convert_wan, get_context, load_transformer, recurrent_forward, save_rehyat
from rehyat.models.wan import AbsoluteRotaryPosEmbed, RunContext, spatial_rotary
from rehyat.testing import tiny_wan_transformer


@pytest.fixture(scope="module")
def teacher():
    return tiny_wan_transformer(num_layers=2)


def _data(frames, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, frames, hw, hw, generator=g, dtype=torch.float64), torch.tensor([600]),
            torch.randn(1, 5, 64, generator=g, dtype=torch.float64))


def _convert(teacher, feature_map_input):
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1,
                        feature_map_input=feature_map_input).double()
    with torch.no_grad():  # scales that give the linear branch a share comparable to the window's
        for block in model.blocks:
            block.attn1.processor.linear_log_scale.fill_(-3.0)
    return model


def _output_at(model, x, t, e, frame_offset):
    ctx = get_context(model)
    ctx.frame_offset = frame_offset
    try:
        with torch.no_grad():
            return model(x, t, e, return_dict=False)[0]
    finally:
        ctx.frame_offset = 0


def test_spatial_rotary_removes_the_time_rotation_only():
    ctx = RunContext()
    rope = AbsoluteRotaryPosEmbed(32, (1, 2, 2), ctx)
    hs = torch.zeros(1, 16, 3, 4, 6)
    cos, sin = rope(hs)
    s_cos, s_sin = spatial_rotary((cos, sin), 32)
    t_dim = 32 - 4 * (32 // 6)  # 12: Wan's split of a 32-wide head is 12 / 10 / 10
    assert torch.equal(s_cos[..., :t_dim], torch.ones_like(s_cos[..., :t_dim]))
    assert torch.equal(s_sin[..., :t_dim], torch.zeros_like(s_sin[..., :t_dim]))
    assert torch.equal(s_cos[..., t_dim:], cos[..., t_dim:]) and torch.equal(s_sin[..., t_dim:], sin[..., t_dim:])
    assert not torch.equal(cos[..., 2:t_dim], torch.ones_like(cos[..., 2:t_dim]))  # time really rotates in RoPE
    ctx.frame_offset = 9
    later = spatial_rotary(rope(hs), 32)
    assert torch.equal(later[0], s_cos) and torch.equal(later[1], s_sin)  # the same at every frame position
    assert torch.equal(cos, rope.__class__(32, (1, 2, 2), RunContext())(hs)[0])  # the input was not modified


@pytest.mark.parametrize("feature_map_input, invariant", [("spatial", True), ("unrotated", True), ("rotated", False)])
def test_output_at_a_later_frame_position(teacher, feature_map_input, invariant):
    """Softmax under RoPE depends on position differences only; the whole converted model is then the same at every
    frame offset exactly when its feature maps do not see the time rotation."""
    model = _convert(teacher, feature_map_input)
    x, t, e = _data(6)
    at0, at13 = _output_at(model, x, t, e, 0), _output_at(model, x, t, e, 13)
    rel = ((at13 - at0).norm() / at0.norm()).item()
    if invariant:
        assert rel < 1e-6  # 1e-8 measured: RoPE's float32 tables at other positions differ in their last bits
    else:
        assert rel > 1e-4  # 4e-4 measured


def test_spatial_differs_from_unrotated(teacher):
    x, t, e = _data(6)
    a = _output_at(_convert(teacher, "spatial"), x, t, e, 0)
    b = _output_at(_convert(teacher, "unrotated"), x, t, e, 0)
    assert ((a - b).norm() / b.norm()).item() > 1e-3  # the height and width rotations are kept


def test_spatial_recurrent_equals_parallel_and_survives_save_load(teacher, tmp_path):
    model = _convert(teacher, "spatial").float()
    x, t, e = (v.float() if v.is_floating_point() else v for v in _data(7))
    with torch.no_grad():
        par = model(x, t, e, return_dict=False)[0]
    rec = recurrent_forward(model, x, t, e)
    assert ((rec - par).norm() / par.norm()).item() < 1e-5
    save_rehyat(model, tmp_path / "m")
    loaded = load_transformer(tmp_path / "m")
    assert loaded.config["rehyat"]["feature_map_input"] == "spatial"
    with torch.no_grad():
        again = loaded(x, t, e, return_dict=False)[0]
    torch.testing.assert_close(again, par, rtol=1e-5, atol=1e-6)
