"""Focused tests for the steps of rehyat.world.checks.check_video (persistence, motion) on hand-made blobs."""

import math

import pytest

from rehyat.world.checks import _motion, _persistence


def _blob(cx, cy=5.0, area=10):
    return {"cx": float(cx), "cy": float(cy), "area": area}


def test_persistence_counts_stable_frames_and_scales_the_jump_limit_by_the_gap():
    # 32 x 32, max_jump 0.1: at most 3.2 px per frame since the last present frame; median area 10.
    blobs = [
        _blob(5),  # first present frame: good
        None,  # absent: not good
        _blob(11),  # 6 px over a gap of 2 frames (limit 6.4): good
        _blob(20),  # 9 px in one frame: teleport
        _blob(31, area=30),  # 3x the median area: unstable size
        _blob(1),  # 2 px across the right edge (wrapped): good
    ]
    persistence, mean_area = _persistence(blobs, 32, 32, max_jump=0.1)
    assert persistence == 3 / 6
    assert mean_area == pytest.approx(14 / 1024, rel=1e-12)


def test_persistence_of_an_absent_object():
    persistence, mean_area = _persistence([None, None], 32, 32, max_jump=0.1)
    assert persistence == 0.0 and math.isnan(mean_area)


@pytest.mark.parametrize("direction,consistency,speed", [("right", 1.0, 3.0), ("left", 0.0, -3.0), ("up", 0.0, 0.0)])
def test_motion_unwraps_steps_across_the_edge(direction, consistency, speed):
    # 30 -> 1 -> 4 is +3, +3 across the right edge; the pair around the gap is skipped.
    blobs = [_blob(30), _blob(1), _blob(4), None, _blob(20)]
    vx, vy, direction_consistency, measured = _motion(blobs, direction, 32, 32)
    assert (vx, vy) == (3.0, 0.0)
    assert direction_consistency == consistency and measured == speed


def test_motion_without_two_consecutive_present_frames():
    vx, vy, direction_consistency, speed = _motion([_blob(3), None, _blob(9)], "right", 32, 32)
    assert (vx, vy, direction_consistency) == (0.0, 0.0, 0.0) and math.isnan(speed)
