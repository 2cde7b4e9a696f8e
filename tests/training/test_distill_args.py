"""DistillArgs: distill()'s arguments, with the eight conversion settings held as one ConversionSettings."""

import inspect
from dataclasses import fields
from pathlib import Path

from rehyat.training.conversion import CONVERSION_NAMES, ConversionSettings
from rehyat.training.distill import DistillArgs, distill


def _distill_defaults(**given):
    params = inspect.signature(distill).parameters
    return {name: given.get(name, p.default) for name, p in params.items()}


def test_fields_are_distills_arguments_with_the_conversion_as_one():
    names = [f.name for f in fields(DistillArgs)]
    assert not set(names) & set(CONVERSION_NAMES)
    assert set(names) - {"conversion"} | set(CONVERSION_NAMES) == set(inspect.signature(distill).parameters)


def test_from_kwargs_gathers_the_conversion():
    kwargs = _distill_defaults(model="teacher", out="student", chunk_frames=2, overlap_frames=0, causal=False,
                               feature_map_kwargs={"feature_dim": 4}, steps=7)
    a = DistillArgs.from_kwargs(kwargs)
    assert a.conversion == ConversionSettings(
        chunk_frames=2, overlap_frames=0, causal=False, stabilizer="lse", feature_map="polynomial",
        feature_map_kwargs={"feature_dim": 4}, feature_map_input="rotated", softmax_blocks="bidirectional")
    assert (a.model, a.out, a.steps, a.blocks) == (Path("teacher"), Path("student"), 7, "all")
