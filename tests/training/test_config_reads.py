"""The training commands read each model-folder config once (issue 17), through one ModelFolder per folder: their
checks, defaults, prompt pool and loading share its reads. ``transformer/config.json`` is read once more where the
weights load (:func:`rehyat.load_transformer`, a models-floor reader)."""

from __future__ import annotations

import builtins
import io

import pytest

CONFIGS = ("rehyat_pipeline.json", "transformer/config.json", "transformer/rehyat_config.json", "vae/config.json")


@pytest.fixture
def config_reads(monkeypatch):
    """``count(folder) -> {config: times read}``, counting the text-mode opens of a model folder's configs from
    now on."""
    opened: list[str] = []

    def counting(real):
        def wrapped(path, mode="r", *args, **kwargs):
            if "b" not in mode:  # read as text (a config); a binary open is a copy of the folder's files
                opened.append(str(path))
            return real(path, mode, *args, **kwargs)
        return wrapped

    for module in (builtins, io):
        monkeypatch.setattr(module, "open", counting(module.open))

    def count(folder) -> dict[str, int]:
        paths = [str(folder / c) for c in CONFIGS]
        return {c: opened.count(p) for c, p in zip(CONFIGS, paths) if opened.count(p)}

    return count


def test_distill_checks_read_each_config_once(teacher, prompts, tmp_path, no_weights, config_reads):
    from rehyat.training import distill

    with pytest.raises(AssertionError, match="weights were loaded"):  # the checks, defaults and prompt pool ran
        distill(teacher, tmp_path / "o", prompts=prompts, frames=4, height=4, width=4, progress=False)
    assert config_reads(teacher) == {"rehyat_pipeline.json": 1, "transformer/config.json": 1}


def test_convert_reads_each_config_once(teacher, tmp_path, config_reads):
    from rehyat.training import convert_model

    convert_model(teacher, tmp_path / "c", blocks="all", frames=4, height=4, width=4, progress=False)
    assert config_reads(teacher) == {"rehyat_pipeline.json": 1, "transformer/config.json": 2}  # checks, load


def test_prepare_dataset_reads_each_config_once(pixel_teacher, videos, tmp_path, config_reads):
    from rehyat.training import prepare_dataset

    prepare_dataset(pixel_teacher, videos, tmp_path / "d", progress=False)
    assert config_reads(pixel_teacher) == {"rehyat_pipeline.json": 1, "transformer/config.json": 1}
