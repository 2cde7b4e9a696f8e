"""Model folders: the one VAE loader and the one atomic writer (pipeline.save_pretrained, training's save_model_folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.pipelines.folders import load_vae
from rehyat.testing import assert_outputs_close, folder_weights, tiny_vae, tiny_wan_transformer


class Boom(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Boom("disk full")


def entries(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def pipe():
    return ReHyAtVideoPipeline(tiny_wan_transformer(num_layers=1), vae=tiny_vae())


def test_save_pretrained_refuses_a_non_empty_folder_before_writing(pipe, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True to replace its files"):
        pipe.save_pretrained(folder)
    assert entries(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"
    assert entries(tmp_path) == ["m"]  # no temporary folder beside it


def test_save_pretrained_error_mid_save_leaves_no_folder(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(pipe.vae, "save_pretrained", boom)  # after transformer/ and scheduler/ are written
    with pytest.raises(Boom):
        pipe.save_pretrained(tmp_path / "m")
    assert entries(tmp_path) == []


def test_save_pretrained_overwrite_error_keeps_the_old_folder(pipe, tmp_path, monkeypatch):
    folder = pipe.save_pretrained(tmp_path / "m")
    before = folder_weights(folder)
    other = ReHyAtVideoPipeline(tiny_wan_transformer(num_layers=1, seed=1), vae=tiny_vae())
    monkeypatch.setattr(other.vae, "save_pretrained", boom)
    with pytest.raises(Boom):
        other.save_pretrained(folder, overwrite=True)
    after = folder_weights(folder)
    assert entries(tmp_path) == ["m"] and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_save_pretrained_overwrite_replaces_its_components_and_keeps_others(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "m")
    (folder / "notes.txt").write_text("mine")
    other = ReHyAtVideoPipeline(tiny_wan_transformer(num_layers=1, seed=1), fps=5)
    other.save_pretrained(folder, overwrite=True)
    loaded = ReHyAtVideoPipeline.from_pretrained(folder)
    assert loaded.fps == 5 and (folder / "notes.txt").read_text() == "mine"
    new = folder_weights(folder)
    ref = other.transformer.state_dict()
    assert all(torch.equal(new[k], ref[k]) for k in new)
    assert entries(tmp_path) == ["m"]


def test_save_model_folder_error_mid_save_leaves_the_run_folder_as_it_was(pipe, tmp_path, monkeypatch):
    from rehyat.training.components import save_model_folder

    src = pipe.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "log.jsonl").write_text("{}\n")
    student = tiny_wan_transformer(num_layers=1, seed=2)
    monkeypatch.setattr(student, "save_pretrained", boom)  # after the components are copied
    with pytest.raises(Boom):
        save_model_folder(student, out, components_from=src)
    assert entries(out) == ["train"] and entries(tmp_path) == ["out", "src"]
    monkeypatch.undo()
    save_model_folder(student, out, components_from=src, pipeline_config={"fps": 3})
    assert entries(out) == ["rehyat_pipeline.json", "scheduler", "train", "transformer", "vae"]
    assert (out / "train" / "log.jsonl").read_text() == "{}\n"
    assert ReHyAtVideoPipeline.from_pretrained(out).fps == 3
    assert entries(tmp_path) == ["out", "src"]


def test_load_vae(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "m")
    vae = load_vae(folder)
    assert not vae.training and next(vae.parameters()).dtype == torch.float32
    ref = pipe.vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in vae.state_dict().items())
    assert load_vae(tmp_path) is None  # no vae/: pixel space


def test_corrupt_vae_is_one_value_error_at_every_loader(pipe, tmp_path):
    from rehyat.training.components import load_model_folder

    folder = pipe.save_pretrained(tmp_path / "m")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    for load in (lambda: ReHyAtVideoPipeline.from_pretrained(folder), lambda: load_model_folder(folder, vae=True)):
        with pytest.raises(ValueError, match=r"cannot load the VAE in .*vae"):
            load()


@pytest.fixture
def config_reads(monkeypatch):
    """Counts of the reads of each config of a model folder: ``rehyat_pipeline.json``, ``vae/config.json`` (through
    :func:`rehyat.io.read_json_object` in the folder readers) and the transformer's (:func:`read_transformer_config`)."""
    import collections

    from rehyat.pipelines import folders

    counts = collections.Counter()
    read_json, read_transformer = folders.read_json_object, folders.read_transformer_config

    def json_reader(path):
        counts["/".join(Path(path).parts[-2:])] += 1
        return read_json(path)

    def transformer_reader(folder):
        counts["transformer"] += 1
        return read_transformer(folder)

    monkeypatch.setattr(folders, "read_json_object", json_reader)
    monkeypatch.setattr(folders, "read_transformer_config", transformer_reader)
    return counts


def test_model_folder_reads_each_config_once(tmp_path, config_reads):
    from rehyat.pipelines.folders import ModelFolder, folder_check_rope_table, folder_latent_shape, folder_vae_factors
    from rehyat.testing import tiny_pipeline_folder

    path = tiny_pipeline_folder(tmp_path / "m")
    mf = ModelFolder(path)
    assert str(mf) == str(path) and Path(mf) == path and ModelFolder.of(mf) is mf
    shape = mf.latent_shape(9, 32, 32)
    assert shape == (1, 16, 3, 4, 4) == folder_latent_shape(path, 9, 32, 32)  # the path reads again
    assert mf.defaults["frames"] == 9 and mf.has_text_encoder
    assert config_reads["m/rehyat_pipeline.json"] == config_reads["vae/config.json"] - 1 == 1
    config_reads.clear()
    mf.check_rope_table(shape)
    folder_check_rope_table(mf, shape)
    assert folder_vae_factors(mf) == (4, 8)
    pipe = ReHyAtVideoPipeline.from_pretrained(mf)
    pipe.encode_prompt(["a red circle"])  # the text encoder loads from the same folder object
    assert pipe.defaults == mf.defaults
    assert config_reads["m/rehyat_pipeline.json"] + config_reads["vae/config.json"] + config_reads["transformer"] == 0


def test_generate_reads_each_config_of_the_model_once(tmp_path, config_reads):
    from rehyat.cli import main
    from rehyat.testing import tiny_pipeline_folder

    path = tiny_pipeline_folder(tmp_path / "m")
    assert main(["generate", "--model", str(path), "--frames", "9", "--height", "32", "--width", "32", "--steps", "1",
                 "--prompt", "a red circle", "--mode", "streaming", "--out", str(tmp_path / "v.mp4")]) == 0
    assert (tmp_path / "v.mp4").is_file()
    assert (config_reads["m/rehyat_pipeline.json"], config_reads["vae/config.json"], config_reads["transformer"]) == (
        1, 1, 1)


def test_load_prompt_encoder_is_the_folders_text_encoder_in_batches(tmp_path):
    from rehyat.pipelines.folders import load_prompt_encoder, load_text_encoder_from_folder
    from rehyat.testing import tiny_pipeline_folder
    from rehyat.text_encoder import encode_prompts

    folder = tiny_pipeline_folder(tmp_path / "m")
    prompts = ["a red circle", "a blue square moving left", ""]
    emb = load_prompt_encoder(folder, batch_size=2)(prompts)
    tok, enc = load_text_encoder_from_folder(folder)
    ref = encode_prompts(tok, enc, prompts, max_length=16)[0]  # the folder's max_sequence_length, one batch
    assert emb.shape == (3, 16, 64) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert_outputs_close(emb, ref.float())


def test_pipeline_and_training_tools_encode_prompts_through_one_path(tmp_path, monkeypatch):
    """ReHyAtVideoPipeline.encode_prompt, load_prompt_encoder (prompt pools, caption tables) and prepare-data all
    encode through PromptEncoder (issue 17: the pipeline kept its own copy of that path)."""
    from rehyat.pipelines import ReHyAtVideoPipeline
    from rehyat.pipelines.folders import PromptEncoder, load_prompt_encoder
    from rehyat.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "m")
    pipe = ReHyAtVideoPipeline.from_pretrained(folder)
    prompts = ["a red circle", "a blue square moving left"]
    expected = pipe.encode_prompt(prompts)  # the pipeline's behaviour: [B, L, text_dim] in its dtype, on its device
    assert expected.shape == (2, 16, 64) and expected.dtype == pipe.transformer.dtype
    assert_outputs_close(load_prompt_encoder(folder)(prompts), expected.float().cpu())
    calls = []
    real = PromptEncoder.__call__
    monkeypatch.setattr(PromptEncoder, "__call__", lambda self, p: calls.append(list(p)) or real(self, p))
    torch.testing.assert_close(pipe.encode_prompt(prompts), expected, rtol=0, atol=0)  # same objects, same path
    load_prompt_encoder(folder)(prompts)
    assert calls == [prompts, prompts]


def test_generation_defaults_come_from_one_table(tmp_path, monkeypatch):
    # a folder's own defaults win; every other setting comes from WAN21_DEFAULTS, read where it is used (the
    # training geometry and `rehyat generate` see a change to the table)
    import argparse
    import json

    from rehyat.commands.generate import _geometry
    from rehyat.pipelines.folders import WAN21_DEFAULTS, ModelFolder
    from rehyat.testing import tiny_pipeline_folder
    from rehyat.training.common import default_geometry

    path = tiny_pipeline_folder(tmp_path / "m")
    cfg_path = path / "rehyat_pipeline.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["defaults"] = {"frames": 9}
    cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setitem(WAN21_DEFAULTS, "height", 48)
    monkeypatch.setitem(WAN21_DEFAULTS, "guidance", 3.5)
    folder = ModelFolder(path)
    assert folder.generation_defaults == {"frames": 9, "height": 48, "width": 832, "steps": 50, "guidance": 3.5}
    assert default_geometry(folder, None, None, None) == (9, 48, 832)
    args = argparse.Namespace(frames=None, height=None, width=None, steps=None, guidance=None, init_video=None,
                              init_latents=None)
    g = _geometry(args, folder)
    assert (g["frames"], g["height"], g["width"], g["steps"], g["guidance"]) == (9, 48, 832, 50, 3.5)
