"""The recurrent runner equals the parallel forward of the same causal model, with bounded state."""

from __future__ import annotations

import copy

import pytest
import torch

from rehyat.models import check_recurrent, convert_wan, forward_chunk, recurrent_forward
from rehyat.testing import tiny_wan_transformer


@pytest.fixture(scope="module")
def teacher():
    return tiny_wan_transformer(num_layers=3)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def data(frames, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, frames, hw, hw, generator=g), torch.tensor([700]), torch.randn(1, 5, 64, generator=g)


@pytest.mark.parametrize(
    "chunk, overlap, blocks, softmax_blocks, frames",
    [
        (3, 1, "all", "bidirectional", 7),  # frames not divisible by chunk_frames
        (1, 0, "all", "bidirectional", 5),
        (1, 4, "all", "bidirectional", 6),  # overlap larger than a chunk
        (2, 1, [1], "chunk_causal", 9),  # partly converted, chunk-causal softmax elsewhere
        (4, 2, [0, 2], "chunk_causal", 10),
        (3, 1, "all", "bidirectional", 40),  # past the teacher's 32-frame RoPE table
    ],
)
def test_recurrent_equals_parallel(teacher, chunk, overlap, blocks, softmax_blocks, frames):
    model = convert_wan(copy.deepcopy(teacher), blocks=blocks, chunk_frames=chunk, overlap_frames=overlap,
                        softmax_blocks=softmax_blocks)
    x, t, e = data(frames, hw=4 if frames > 20 else 8)
    with torch.no_grad():
        par = model(x, t, e, return_dict=False)[0]
    rec = recurrent_forward(model, x, t, e)
    assert rel(rec, par) < 1e-5
    rec2 = recurrent_forward(model, x, t, e, chunk_frames=2 * chunk)  # several chunks per runner call
    assert rel(rec2, par) < 1e-5


def test_mixed_chunk_sizes_use_lcm(teacher):
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1,
                        block_settings={1: {"chunk_frames": 3, "overlap_frames": 0}})
    assert check_recurrent(model) == 6
    x, t, e = data(13)
    with torch.no_grad():
        par = model(x, t, e, return_dict=False)[0]
    assert rel(recurrent_forward(model, x, t, e), par) < 1e-5
    with pytest.raises(ValueError, match="multiple"):
        recurrent_forward(model, x, t, e, chunk_frames=4)


def test_state_is_constant_size(teacher):
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, e = data(40, hw=4)
    state, sizes = None, []
    for f0 in range(0, 40, 2):
        _, state = forward_chunk(model, x[:, :, f0:f0 + 2], t, e, state)
        sizes.append(state.nbytes())
    assert state.frames_seen == 40
    assert len(set(sizes[1:])) == 1  # after the overlap cache fills, nothing grows


def test_chunk_causal_cache_grows(teacher):
    model = convert_wan(copy.deepcopy(teacher), blocks=[0], chunk_frames=2, overlap_frames=1,
                        softmax_blocks="chunk_causal")
    x, t, e = data(8, hw=4)
    _, s1 = forward_chunk(model, x[:, :, :2], t, e)
    _, s2 = forward_chunk(model, x[:, :, 2:4], t, e, s1)
    assert s2.block_states[1].k.shape[1] == 2 * s1.block_states[1].k.shape[1]
    assert s2.block_states[0].nbytes() == s1.block_states[0].nbytes()  # the converted block's state does not


def test_state_passed_in_is_not_modified(teacher):
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, e = data(6, hw=4)
    _, s1 = forward_chunk(model, x[:, :, :2], t, e)
    snap = {b: s.s.clone() for b, s in s1.block_states.items()}
    a, _ = forward_chunk(model, x[:, :, 2:4], t, e, s1)
    b, _ = forward_chunk(model, x[:, :, 2:4], t, e, s1)  # same state twice -> same output
    assert torch.equal(a, b)
    assert all(torch.equal(s1.block_states[k].s, v) for k, v in snap.items())


def test_wrong_chunk_start_refused(teacher):
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, e = data(6, hw=4)
    _, s1 = forward_chunk(model, x[:, :, :3], t, e)  # 3 frames: the next chunk would start mid-chunk
    with pytest.raises(RuntimeError, match="multiple of its chunk_frames"):
        forward_chunk(model, x[:, :, 3:5], t, e, s1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (None, "not causal"),
        (dict(blocks=[0], softmax_blocks="bidirectional"), "bidirectional softmax"),
        (dict(blocks="all", causal=False), "bidirectional linear"),
    ],
)
def test_not_causal_refused(teacher, kwargs, match):
    model = copy.deepcopy(teacher)
    if kwargs is not None:
        convert_wan(model, chunk_frames=2, overlap_frames=1, **kwargs)
    x, t, e = data(4, hw=4)
    with pytest.raises(ValueError, match=match):
        recurrent_forward(model, x, t, e)


def test_per_chunk_text_switches_the_conditioning_between_chunks(teacher, single_thread):
    """One text tensor per chunk: each chunk's output is the chained forward_chunk's with that chunk's text (the
    state carries over); a chunk before the switch is unchanged, the ones after differ; a wrong count is refused."""
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, a = data(6)
    b = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(9))
    out = recurrent_forward(model, x, t, [a, b, b])
    outs, state = [], None
    for f0, text in ((0, a), (2, b), (4, b)):
        o, state = forward_chunk(model, x[:, :, f0 : f0 + 2], t, text, state)
        outs.append(o)
    assert torch.equal(out, torch.cat(outs, dim=2))  # the same computation, on one object
    single = recurrent_forward(model, x, t, a)
    assert torch.equal(out[:, :, :2], single[:, :, :2])
    assert rel(out[:, :, 2:], single[:, :, 2:]) > 1e-2
    with pytest.raises(ValueError, match="one per chunk of 2 latent frames \\(3 for 6 frames\\), got 2"):
        recurrent_forward(model, x, t, [a, b])


def test_recurrent_forward_checks_the_model_once(teacher, monkeypatch):
    """recurrent_forward checks the transformer before any work, once: not again for each of its chunks."""
    from rehyat.models import runner

    calls = []
    monkeypatch.setattr(runner, "check_recurrent", lambda m: calls.append(m) or check_recurrent(m))
    model = convert_wan(copy.deepcopy(teacher), blocks="all", chunk_frames=2, overlap_frames=1)
    x, t, e = data(6, hw=4)
    recurrent_forward(model, x, t, e)  # 3 chunks
    assert calls == [model]


def test_forward_chunk_refuses_a_model_that_is_not_causal(teacher):
    """forward_chunk keeps its own check for callers that use it directly."""
    x, t, e = data(2, hw=4)
    with pytest.raises(ValueError, match="not causal"):
        forward_chunk(copy.deepcopy(teacher), x, t, e)


@pytest.mark.parametrize("frames, window", [(9, 1), (11, 3)])
def test_windowed_softmax_block_streams_with_a_bounded_cache(teacher, frames, window):
    # a chunk-causal softmax block with a finite window: the recurrent form equals the parallel one and its K/V
    # cache stops growing once the window is full, where an unbounded block's keeps growing
    model = convert_wan(copy.deepcopy(teacher), blocks=[1], chunk_frames=2, overlap_frames=1,
                        softmax_blocks="chunk_causal", block_settings={0: {"overlap_frames": window}})
    x, t, e = data(frames, hw=4)
    with torch.no_grad():
        par = model(x, t, e, return_dict=False)[0]
    assert rel(recurrent_forward(model, x, t, e), par) < 1e-5
    state, cached = None, []
    for f0 in range(0, frames, 2):
        _, state = forward_chunk(model, x[:, :, f0:f0 + 2], t, e, state)
        cached.append((state.block_states[0].k.shape[1], state.block_states[2].k.shape[1]))
    frame_tokens = 4  # 4 x 4 latents, patch 2 x 2
    assert max(c[0] for c in cached) == window * frame_tokens
    assert cached[-1][1] == frames * frame_tokens
