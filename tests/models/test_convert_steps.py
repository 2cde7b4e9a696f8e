"""Focused tests for convert_wan's argument checks (rehyat.models.wan._check_blocks, _check_block_settings)."""

import pytest

from rehyat.models.wan import _check_block_settings, _check_blocks


def test_check_blocks_sorts_and_deduplicates():
    assert _check_blocks("all", 3) == [0, 1, 2]
    assert _check_blocks((2, "0", 2), 3) == [0, 2]
    with pytest.raises(ValueError, match=r"blocks \[3\] out of range: the transformer has 3 blocks \(0..2\)"):
        _check_blocks([0, 3], 3)
    with pytest.raises(ValueError, match="blocks must be 'all' or a list of block indices, got 'first'"):
        _check_blocks("first", 3)


def test_check_block_settings_copies_with_int_keys():
    given = {"1": {"chunk_frames": 2}}
    out = _check_block_settings(given, [0, 1], chunk_frames=3, overlap_frames=1, stabilizer="lse")
    assert out == {1: {"chunk_frames": 2}}
    out[1]["overlap_frames"] = 0
    assert given == {"1": {"chunk_frames": 2}}
    assert _check_block_settings(None, [0], 3, 1, "lse") == {}


@pytest.mark.parametrize("settings, match", [
    ({2: {"chunk_frames": 2}}, r"block_settings names block 2, which is not in blocks \[0, 1\]"),
    ({0: {"chunk": 2}}, r"block_settings\[0\] has unknown keys \['chunk'\]"),
    ({0: {"overlap_frames": -1}}, "overlap_frames"),  # checked with the block's own values
])
def test_check_block_settings_refuses(settings, match):
    with pytest.raises(ValueError, match=match):
        _check_block_settings(settings, [0, 1], chunk_frames=3, overlap_frames=1, stabilizer="lse")


def test_check_block_settings_bounds_chunk_causal_softmax_blocks():
    # an unconverted block may get a window, only with chunk-causal softmax blocks, only overlap_frames
    out = _check_block_settings({"2": {"overlap_frames": 5}}, [0, 1], 3, 1, "lse", "chunk_causal", 3)
    assert out == {2: {"overlap_frames": 5}}
    with pytest.raises(ValueError, match=r"names block 2, which is not in blocks \[0, 1\] \(only with "
                                         r"softmax_blocks='chunk_causal'"):
        _check_block_settings({2: {"overlap_frames": 5}}, [0, 1], 3, 1, "lse", "bidirectional", 3)
    with pytest.raises(ValueError, match=r"names block 3.*0\.\.2"):
        _check_block_settings({3: {"overlap_frames": 5}}, [0, 1], 3, 1, "lse", "chunk_causal", 3)
    with pytest.raises(ValueError, match=r"block_settings\[2\] has unknown keys \['chunk_frames'\]"):
        _check_block_settings({2: {"chunk_frames": 2}}, [0, 1], 3, 1, "lse", "chunk_causal", 3)
