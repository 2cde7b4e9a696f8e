"""rehyat.models.compile_blocks: compiled blocks give the eager outputs (inductor on the CPU), bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from rehyat.models import compile_blocks, convert_wan, recurrent_forward
from rehyat.testing import tiny_wan_transformer as tiny_wan


def test_compiled_converted_model_matches_eager():
    torch.manual_seed(0)
    model = convert_wan(tiny_wan(), blocks=[0], chunk_frames=2, overlap_frames=1).eval()
    compiled = compile_blocks(copy.deepcopy(model))
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in compiled.blocks)
    x = torch.randn(1, model.config.in_channels, 5, 8, 8)
    t = torch.tensor([500.0])
    e = torch.randn(1, 4, model.config.text_dim)
    with torch.no_grad():
        want = model(x, t, e, return_dict=False)[0]
        got = compiled(x, t, e, return_dict=False)[0]
    assert (got - want).norm() / want.norm() < 1e-4


def test_compiled_recurrent_forward_matches_eager_without_per_chunk_recompiles():
    """Chunk by chunk, the recurrent attention step stays out of the block's graph and is compiled on its own with
    graphs that do not depend on the chunk position, so 8 chunks need a few graphs, not one per chunk position
    (before: 64 graphs for 16 chunks, then eager fallback): here the blocks' graphs plus 2 of the step (first
    chunk, later chunks)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = convert_wan(tiny_wan(), blocks="all", chunk_frames=2, overlap_frames=1).eval()
    compiled = compile_blocks(copy.deepcopy(model))
    x = torch.randn(1, model.config.in_channels, 16, 8, 8)
    t = torch.tensor([500.0])
    e = torch.randn(1, 4, model.config.text_dim)
    torch._dynamo.reset()
    counters.clear()
    want = recurrent_forward(model, x, t, e)
    got = recurrent_forward(compiled, x, t, e)
    assert (got - want).norm() / want.norm() < 1e-4
    assert 1 <= counters["stats"]["unique_graphs"] <= 8


def test_bad_input():
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cache_size_limit"):
        compile_blocks(tiny_wan(), cache_size_limit=0)
