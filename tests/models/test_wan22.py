"""convert_wan on a transformer of Wan2.2-TI2V-5B's geometry (48 latent channels in and out, patch (1, 2, 2)): equality
with the teacher for one chunk, the recurrent form, save/load, and Wan2.2 TI2V's per-token timesteps."""

from __future__ import annotations

import copy

import pytest
import torch

from rehyat.models import convert_wan, get_rehyat_config, load_transformer, recurrent_forward, save_rehyat
from rehyat.testing import GEOMETRIES, assert_outputs_close, tiny_wan_transformer

CHANNELS = GEOMETRIES["wan2.2"]["channels"]  # 48
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other


@pytest.fixture(scope="module")
def teacher():
    return tiny_wan_transformer(num_layers=3, in_channels=CHANNELS)


def inputs(frames=6, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, CHANNELS, frames, hw, hw, generator=g), torch.tensor([500.0]),
            torch.randn(1, 7, 64, generator=g))


def run(model, x, t, e):
    with torch.no_grad():
        return model(x, t, e, return_dict=False)[0]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_teacher_has_the_wan22_shape(teacher):
    x, t, e = inputs()
    assert teacher.config.in_channels == teacher.config.out_channels == 48
    assert run(teacher, x, t, e).shape == x.shape


def test_one_chunk_equals_teacher_and_chunks_differ(teacher):
    x, t, e = inputs(frames=5)
    ref = run(teacher, x, t, e)
    one = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=5, overlap_frames=1)
    assert rel(run(one, x, t, e), ref) < 1e-6
    chunked = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    assert rel(run(chunked, x, t, e), ref) > 1e-4  # so the line above can fail


def test_recurrent_form_equals_parallel(teacher):
    student = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, e = inputs(frames=7)
    with torch.no_grad():
        rec = recurrent_forward(student, x, t, e)
    torch.testing.assert_close(rec, run(student, x, t, e), rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_bit_exact(teacher, tmp_path):
    student = convert_wan(copy.deepcopy(teacher), blocks=[0, 2], chunk_frames=2, overlap_frames=1)
    with torch.no_grad():  # feature maps that differ from their initialisation
        for p in student.blocks[0].attn1.processor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_rehyat(student, tmp_path / "m")
    loaded = load_transformer(tmp_path / "m")
    assert loaded.config.in_channels == loaded.config.out_channels == 48
    assert get_rehyat_config(loaded).to_dict() == get_rehyat_config(student).to_dict()
    saved, got = student.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for k in saved:
        assert saved[k].dtype == got[k].dtype and torch.equal(saved[k], got[k]), k
    x, t, e = inputs()
    assert_outputs_close(run(loaded, x, t, e), run(student, x, t, e))  # two model objects: up to rounding


@pytest.mark.parametrize("converted", [False, True])
def test_one_timestep_per_token_equals_one_per_video(teacher, converted):
    """Wan2.2 TI2V's pipeline passes ``timestep [B, tokens]`` (``expand_timesteps``); in text-to-video every token
    has the step's timestep, which is the ``[B]`` timestep rehyat's pipeline passes (a different time-embedding
    path in diffusers' forward: equal up to rounding)."""
    model = teacher if not converted else convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2,
                                                      overlap_frames=1)
    x, t, e = inputs()
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    per_token = run(model, x, t.expand(1, tokens), e)
    assert_outputs_close(per_token, run(model, x, t, e))
    mixed = t.expand(1, tokens).clone()
    mixed[:, : tokens // x.shape[2]] = 0.0  # TI2V's image frame held at timestep 0: not what one timestep gives
    assert rel(run(model, x, mixed, e), per_token) > 1e-3
