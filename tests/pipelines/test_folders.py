"""Model folders: the one VAE loader and the one atomic writer (pipeline.save_pretrained, training's save_model_folder)."""

from __future__ import annotations

import pytest
import torch

from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.pipelines.folders import load_vae
from rehyat.testing import folder_weights, tiny_vae, tiny_wan_transformer


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
