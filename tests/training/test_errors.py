"""Bad input: one clear error line (exit code 2) before any model weights are loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from rehyat.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights fails the test: every error below must come first."""
    import rehyat.training.components as comp

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr(comp, "load_model_folder", refuse)
    monkeypatch.setattr(comp, "load_text_encoder_from_folder", refuse)


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def _dataset_variant(src, dst, **changes):
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset.json").read_text())
    info.update(changes)
    (dst / "dataset.json").write_text(json.dumps(info))
    return dst


DISTILL_GEOM = ["--frames", "4", "--height", "4", "--width", "4"]


def test_distill_errors(teacher, prompts, tmp_path, capsys, no_weights):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["distill", "--model", str(teacher), *DISTILL_GEOM, "--out", str(tmp_path / "o")]
    assert "holds no prompt" in _run(base + ["--prompts", str(empty)], capsys)
    assert "out of range" in _run(base + ["--prompts", str(prompts), "--blocks", "0,5"], capsys)
    assert "best:9" in _run(base + ["--prompts", str(prompts), "--blocks", "best:9"], capsys)
    assert "no prompts" in _run(base, capsys)
    assert "does not exist" in _run(base + ["--prompts", str(tmp_path / "missing.txt")], capsys)
    assert "multiple of" in _run(["distill", "--model", str(teacher), "--prompts", str(prompts), "--frames", "4",
                                  "--height", "5", "--width", "4", "--out", str(tmp_path / "o")], capsys)
    assert "chunk_frames" in _run(base + ["--prompts", str(prompts), "--chunk-frames", "0"], capsys)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    busy = ["distill", "--model", str(teacher), *DISTILL_GEOM, "--prompts", str(prompts), "--out", str(tmp_path / "busy")]
    assert "--overwrite" in _run(busy, capsys)
    assert "checkpoint.pt does not exist" in _run(busy + ["--resume"], capsys)
    assert "not a Wan model folder" in _run(["distill", "--model", str(tmp_path), "--prompts", str(prompts),
                                             "--out", str(tmp_path / "o")], capsys)


def test_finetune_errors(teacher, pixel_teacher, pixel_student, pixel_dataset, prompts, tmp_path, capsys, no_weights):
    out = ["--out", str(tmp_path / "o")]
    # a dataset folder without dataset.json
    (tmp_path / "nodata").mkdir()
    assert "dataset.json" in _run(["finetune", "--model", str(pixel_student), "--data", str(tmp_path / "nodata"), *out], capsys)
    # latents that do not fit the model: channels, and sizes not divisible by the patch
    wrong_c = _dataset_variant(pixel_dataset, tmp_path / "c16", latent_channels=16)
    assert "16 channels" in _run(["finetune", "--model", str(pixel_student), "--data", str(wrong_c), *out], capsys)
    odd = _dataset_variant(pixel_dataset, tmp_path / "odd", latent_height=7)
    assert "not divisible" in _run(["finetune", "--model", str(pixel_student), "--data", str(odd), *out], capsys)
    wrong_t = _dataset_variant(pixel_dataset, tmp_path / "t32", text_dim=32)
    assert "text_dim" in _run(["finetune", "--model", str(pixel_student), "--data", str(wrong_t), *out], capsys)
    # teacher and student of different architectures (the tiny 16-channel VAE-space teacher vs the pixel student)
    from rehyat.testing import tiny_pipeline_folder

    other = tiny_pipeline_folder(tmp_path / "other", converted=False, vae=True)
    capsys.readouterr()
    err = _run(["finetune", "--model", str(pixel_student), "--data", str(pixel_dataset), "--teacher", str(other), *out],
               capsys)
    assert "different architectures" in err and "in_channels" in err
    # nothing to train on; teacher without prompts; empty prompt file
    assert "nothing to train on" in _run(["finetune", "--model", str(pixel_student), *out], capsys)
    assert "needs prompts" in _run(["finetune", "--model", str(pixel_student), "--teacher", str(pixel_teacher), *out],
                                   capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no prompt" in _run(["finetune", "--model", str(pixel_student), "--teacher", str(pixel_teacher),
                                      "--prompts", str(empty), *out], capsys)
    # bad config
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"in_channels": 3, "num_layerz": 2}))
    assert "num_layerz" in _run(["finetune", "--config", str(cfg), "--data", str(pixel_dataset), *out], capsys)
    # an output folder that exists
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert "--overwrite" in _run(["finetune", "--model", str(pixel_student), "--data", str(pixel_dataset),
                                  "--out", str(tmp_path / "busy")], capsys)


def test_convert_and_prepare_data_errors(teacher, pixel_teacher, videos, prompts, tmp_path, capsys, no_weights):
    out = ["--out", str(tmp_path / "o")]
    assert "out of range" in _run(["convert", "--model", str(teacher), "--blocks", "2", *out], capsys)
    assert "--budget" in _run(["convert", "--model", str(teacher), "--blocks", "auto", *out], capsys)
    assert "candidates" in _run(["convert", "--model", str(teacher), "--blocks", "auto", "--budget", "0.5",
                                 "--candidates", "3;1", "--prompts", str(prompts), *out], capsys)
    assert "--blocks auto" in _run(["convert", "--model", str(teacher), "--budget", "0.5", *out], capsys)
    # a budget of 1 or more is refused before any distillation (keeping every block softmax would be optimal)
    assert "0 < --budget < 1" in _run(["convert", "--model", str(teacher), "--blocks", "auto", "--budget", "1.5",
                                       "--prompts", str(prompts), *out], capsys)
    assert "short distillation" in _run(["convert", "--model", str(teacher), "--blocks", "best:1", *out], capsys)
    # prepare-data: captions missing from a table, a model without VAE whose channels do not match the pixels
    import torch

    from rehyat.training import TextEmbeddingTable

    table = tmp_path / "t.safetensors"
    TextEmbeddingTable(["only this"], torch.zeros(1, 8, 64)).save(table)
    assert "not in" in _run(["prepare-data", "--model", str(pixel_teacher), "--videos", str(videos),
                             "--text-embeddings", str(table), *out], capsys)
    assert "does not exist" in _run(["prepare-data", "--model", str(pixel_teacher), "--videos", str(tmp_path / "nov"),
                                     *out], capsys)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert "--overwrite" in _run(["prepare-data", "--model", str(pixel_teacher), "--videos", str(videos), "--out",
                                  str(tmp_path / "busy")], capsys)
