"""The eight conversion settings as one object (rehyat.training.conversion.ConversionSettings)."""

from __future__ import annotations

import argparse

import pytest

from rehyat.training.cli_args import add_conversion_args, conversion_kwargs
from rehyat.training.conversion import CONVERSION_NAMES, ConversionSettings


def _parse(*argv):
    p = argparse.ArgumentParser()
    add_conversion_args(p)
    return p.parse_args(list(argv))


def test_conversion_settings_from_cli_and_kwargs_give_the_run_config_entry():
    args = _parse("--chunk-frames", "2", "--overlap-frames", "0", "--bidirectional", "--feature-map", "hedgehog",
                  "--feature-map-kwargs", '{"feature_dim": 4}', "--softmax-blocks", "chunk_causal")
    s = ConversionSettings.from_cli(args)
    assert conversion_kwargs(args) == s.fields()
    assert ConversionSettings.from_kwargs({**s.fields(), "blocks": "all", "steps": 3}) == s
    # the "conversion" entry of run_config.json, as distill has always written it (compared on --resume)
    assert s.to_kwargs() == {"chunk_frames": 2, "overlap_frames": 0, "causal": False, "stabilizer": "lse",
                             "feature_map": "hedgehog", "feature_map_kwargs": {"feature_dim": 4},
                             "feature_map_input": "rotated", "softmax_blocks": "chunk_causal"}
    assert list(s.to_kwargs()) == list(CONVERSION_NAMES)
    assert ConversionSettings.from_cli(_parse()).to_kwargs()["feature_map_kwargs"] == {}  # None -> {}
    s.check(head_dim=8)


@pytest.mark.parametrize("change, match", [
    (dict(feature_map_kwargs=[1]), "--feature-map-kwargs must be a JSON object"),
    (dict(feature_map_kwargs={"no_such_key": 1}), "--feature-map polynomial --feature-map-kwargs"),
    (dict(softmax_blocks="causal"), "--softmax-blocks must be one of"),
    (dict(feature_map_input="sideways"), "feature_map_input must be one of"),
])
def test_conversion_settings_check_names_the_bad_argument(change, match):
    s = ConversionSettings.from_kwargs({**ConversionSettings.from_cli(_parse()).fields(), **change})
    with pytest.raises(ValueError, match=match):
        s.check(head_dim=8)
