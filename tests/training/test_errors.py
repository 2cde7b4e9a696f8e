"""Bad input: one clear error line (exit code 2) before any model weights are loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from rehyat.cli import main


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


def _run_after_loading(args, capsys):
    """As :func:`_run` for errors found once some weights are loaded (their progress bars come before the line)."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rehyat {args[0]}: error: "), err
    return last


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


def _config_variant(tmp_path, name, **changes):
    """configs/world_teacher.json-like tiny config for the pixel dataset, with ``changes`` (a list/str: the whole file)."""
    cfg = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
           "attention_head_dim": 16, "in_channels": 3, "out_channels": 3, "text_dim": 64, "freq_dim": 32,
           "ffn_dim": 64, "num_layers": 1}
    cfg.update(changes)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(changes.get("whole", cfg)))
    return p


def test_finetune_config_values(pixel_dataset, tmp_path, capsys, no_weights):
    """A --config with bad sizes or of the wrong shape: an error naming the file and the key, before --out exists."""
    out = tmp_path / "o"
    cases = {
        "neg": ({"num_layers": -2}, "num_layers must be an int >= 1, got -2"),
        "zero": ({"num_layers": 0}, "num_layers must be an int >= 1, got 0"),
        "word": ({"num_layers": "two"}, "num_layers must be an int >= 1, got 'two'"),
        "heads": ({"num_attention_heads": 0}, "num_attention_heads must be an int >= 1"),
        "ffn": ({"ffn_dim": 1.5}, "ffn_dim must be an int >= 1"),
        "text": ({"text_dim": True}, "text_dim must be an int >= 1"),
        "outc": ({"out_channels": -3}, "out_channels must be an int >= 1"),
        "patch": ({"patch_size": [1, 0, 2]}, "patch_size must be a list of 3 ints >= 1"),
        "patch2": ({"patch_size": 2}, "patch_size must be a list of 3 ints >= 1"),
        "odd_head": ({"attention_head_dim": 7}, "attention_head_dim"),
        "list": ({"whole": [1, 2]}, "must hold a JSON object"),
        "str": ({"whole": "config"}, "must hold a JSON object"),
    }
    for name, (changes, expected) in cases.items():
        cfg = _config_variant(tmp_path, name, **changes)
        err = _run(["finetune", "--config", str(cfg), "--data", str(pixel_dataset), "--out", str(out), "--steps", "1"],
                   capsys)
        assert "--config" in err and str(cfg) in err and expected in err, (name, err)
        assert not out.exists(), name
    # the fixed file then trains (the failed attempts left nothing to block the retry)
    ok = _config_variant(tmp_path, "ok")
    assert main(["finetune", "--config", str(ok), "--data", str(pixel_dataset), "--out", str(out), "--steps", "1",
                 "--batch-size", "1", "--eval-batches", "0", "--no-progress"]) == 0
    assert json.loads((out / "transformer" / "config.json").read_text())["num_layers"] == 1


def test_feature_map_kwargs_checked_before_out(teacher, prompts, tmp_path, capsys, no_weights):
    """distill / convert: feature-map kwargs the feature map does not take fail before --out is written."""
    out = tmp_path / "o"
    for cmd in ("distill", "convert"):
        base = [cmd, "--model", str(teacher), "--prompts", str(prompts), *DISTILL_GEOM, "--out", str(out)]
        err = _run(base + ["--feature-map-kwargs", '{"nope": 3}'], capsys)
        assert "--feature-map-kwargs" in err and "nope" in err, err
        err = _run(base + ["--feature-map", "hedgehog", "--feature-map-kwargs", '{"feature_dim": 3}'], capsys)
        assert "--feature-map-kwargs" in err and "feature_dim must be even" in err, err
        err = _run(base + ["--feature-map-kwargs", "[3]"], capsys)
        assert "--feature-map-kwargs must be a JSON object" in err, err
        assert not out.exists(), cmd


def test_prepare_data_bad_numbers(pixel_teacher, videos, tmp_path, capsys, no_weights):
    out = tmp_path / "o"
    base = ["prepare-data", "--model", str(pixel_teacher), "--videos", str(videos), "--out", str(out)]
    assert "--batch-size must be an int >= 1" in _run(base + ["--batch-size", "0"], capsys)
    assert "--frames must be an int >= 1" in _run(base + ["--frames", "0"], capsys)
    assert not out.exists()


def test_prepare_data_unreadable_videos(pixel_teacher, videos, tmp_path, capsys):
    """A corrupt video or a listed non-video file: an error naming it, and no half-written --out left behind."""
    out = tmp_path / "o"
    bad = tmp_path / "bad"
    shutil.copytree(videos, bad)
    names = [json.loads(line)["file_name"] for line in (bad / "metadata.jsonl").read_text().splitlines()]
    second = bad / names[1]  # found mid-encoding, after the first batch was written
    second.write_bytes(second.read_bytes()[:300])
    err = _run_after_loading(["prepare-data", "--model", str(pixel_teacher), "--videos", str(bad), "--batch-size", "1",
                "--out", str(out), "--no-progress"], capsys)
    assert str(second) in err and "cannot read the video" in err, err
    assert not out.exists()
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "a.txt").write_text("not a video\n")
    (txt / "metadata.jsonl").write_text(json.dumps({"file_name": "a.txt", "text": "a red circle"}) + "\n")
    err = _run_after_loading(["prepare-data", "--model", str(pixel_teacher), "--videos", str(txt), "--out", str(out)], capsys)
    assert str(txt / "a.txt") in err and "cannot read the video" in err, err
    assert not out.exists()


def test_corrupt_model_files(pixel_student, pixel_teacher, pixel_dataset, teacher, prompts, tmp_path, capsys):
    """A truncated weights file or malformed JSON in a model folder: an error naming the file, --out not created."""
    out = tmp_path / "o"
    run = ["--data", str(pixel_dataset), "--out", str(out), "--steps", "1", "--batch-size", "1", "--eval-batches", "0"]
    for src in (pixel_student, pixel_teacher):  # converted (ReHyAt) and plain
        bad = tmp_path / f"trunc_{src.name}"
        shutil.copytree(src, bad)
        w = bad / "transformer" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
        err = _run_after_loading(["finetune", "--model", str(bad), *run], capsys)
        assert str(w) in err, err
        assert not out.exists()
    bad = tmp_path / "trunc_teacher"
    shutil.copytree(teacher, bad)
    w = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    err = _run_after_loading(["distill", "--model", str(bad), "--prompts", str(prompts), *DISTILL_GEOM, "--steps", "1",
                "--out", str(out)], capsys)
    assert str(w) in err, err
    assert not out.exists()
    for rel in ("rehyat_pipeline.json", "transformer/rehyat_config.json"):
        bad = tmp_path / ("json_" + rel.replace("/", "_"))
        shutil.copytree(pixel_student, bad)
        (bad / rel).write_text('{"blocks": [0,')
        err = _run_after_loading(["finetune", "--model", str(bad), *run], capsys)
        assert str(bad / rel) in err and "not valid JSON" in err, err
        assert not out.exists()
