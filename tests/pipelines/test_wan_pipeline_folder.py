"""A converted transformer saved inside diffusers' own ``WanPipeline`` loads back converted (not as the teacher)."""

from __future__ import annotations

import json

import pytest
import torch

from rehyat.models import convert_wan, get_rehyat_config
from rehyat.pipelines import ReHyAtVideoPipeline
from rehyat.pipelines.folders import default_scheduler, read_transformer_config
from rehyat.testing import tiny_text_encoder, tiny_wan_transformer, tiny_wan_vae


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """``(folder, student)``: diffusers' ``WanPipeline`` holding a converted tiny transformer, saved by
    ``WanPipeline.save_pretrained`` (no rehyat_config.json, no rehyat_pipeline.json)."""
    from diffusers import WanPipeline

    student = convert_wan(tiny_wan_transformer(), blocks="all", chunk_frames=2, overlap_frames=1)
    with torch.no_grad():  # feature maps that differ from their initialisation
        for p in student.blocks[1].attn1.processor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokenizer, text_encoder = tiny_text_encoder()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(),
                       scheduler=default_scheduler(), transformer=student)
    folder = tmp_path_factory.mktemp("wan") / "model"
    pipe.save_pretrained(folder)
    return folder, student


def latents(pipe, mode="parallel"):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 6, 64, generator=g)
    return pipe(prompt_embeds=pos, num_frames=9, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                mode=mode, output_type="latent", progress=False).latents


def test_wan_pipeline_folder_loads_converted(wan_folder):
    folder, student = wan_folder
    assert not (folder / "transformer" / "rehyat_config.json").exists()
    pipe = ReHyAtVideoPipeline.from_pretrained(folder)
    assert get_rehyat_config(pipe.transformer).to_dict() == get_rehyat_config(student).to_dict()
    saved, loaded = student.state_dict(), pipe.transformer.state_dict()
    assert sorted(saved) == sorted(loaded)
    for k, v in saved.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    reference = ReHyAtVideoPipeline(student, pipe.scheduler, pipe.vae)
    torch.testing.assert_close(latents(pipe), latents(reference), rtol=1e-5, atol=1e-5)
    # a converted model runs chunk by chunk: the reloaded one does too
    torch.testing.assert_close(latents(pipe, "recurrent"), latents(pipe), rtol=1e-4, atol=1e-4)


def test_folder_readers_see_the_settings(wan_folder):
    from rehyat.commands._notes import folder_recurrence_problem

    folder, student = wan_folder
    assert read_transformer_config(folder)["rehyat"] == get_rehyat_config(student).to_dict()
    assert folder_recurrence_problem(folder) is None


def test_generate_streams_a_wan_pipeline_folder(wan_folder, tmp_path, capsys):
    # `rehyat generate --mode streaming` accepts the folder as a ReHyAt model (it used to look for rehyat_config.json)
    from rehyat.cli import main

    folder, _ = wan_folder
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--frames", "9", "--height", "32",
                 "--width", "32", "--steps", "1", "--mode", "streaming", "--out", str(tmp_path / "v.mp4")]) == 0
    assert (tmp_path / "v.mp4").is_file()


def test_wan_pipeline_folder_without_settings_is_refused(wan_folder, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(wan_folder[0], folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rehyat", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        ReHyAtVideoPipeline.from_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "transformer") in msg and ".attn1.processor.feature_map_" in msg
