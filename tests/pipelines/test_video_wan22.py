"""Wan2.2-TI2V-5B geometry (48 latent channels, 16x spatial compression) through the pipeline: the geometry read from
the VAE's config, sizes and VAE/transformer mismatches refused before any work, a diffusers Wan2.2 TI2V folder
(``expand_timesteps``) generating what diffusers' ``WanPipeline`` generates, and save/load of a model folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rehyat.cli import main
from rehyat.models import convert_wan
from rehyat.pipelines import ReHyAtVideoPipeline, initial_noise
from rehyat.pipelines.video import folder_latent_shape, vae_factors
from rehyat.testing import (GEOMETRIES, assert_outputs_close, tiny_pipeline_folder, tiny_text_encoder, tiny_vae,
                            tiny_wan_transformer)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only wait on each other


@pytest.fixture(scope="module")
def wan22_folder(tmp_path_factory):
    """A converted tiny model folder of Wan2.2's geometry (9 frames of 32 x 32 by default)."""
    return tiny_pipeline_folder(tmp_path_factory.mktemp("wan22") / "model", geometry="wan2.2")


def embeds(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_tiny_vae_has_the_geometry_it_names(geometry):
    vae = tiny_vae(geometry)
    want = GEOMETRIES[geometry]
    assert vae_factors(dict(vae.config)) == (4, want["spatial"]) and vae.config.z_dim == want["channels"]
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == want["channels"]
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 9, 64, 64)).latent_dist.mode()
    assert z.shape == (1, want["channels"], 3, 64 // want["spatial"], 64 // want["spatial"])


def test_vae_factors_of_a_config_without_the_scale_factors():
    """A VAE config that omits ``scale_factor_*`` (or sets them to null): the factors derive from the down-sampling
    stages and, for Wan2.2's VAE, its 2x2 pixel patch (16x, not the 8x of the stages alone)."""
    cfg = dict(tiny_vae("wan2.2").config)
    for value in ("absent", None):
        c = dict(cfg)
        for k in ("scale_factor_temporal", "scale_factor_spatial"):
            if value == "absent":
                del c[k]
            else:
                c[k] = value
        assert vae_factors(c) == (4, 16), value
    assert vae_factors({k: v for k, v in dict(tiny_vae("wan2.1").config).items()
                        if not k.startswith("scale_factor")}) == (4, 8)


def test_pipeline_reads_its_geometry_from_the_vae(wan22_folder):
    pipe = ReHyAtVideoPipeline.from_pretrained(wan22_folder)
    assert (pipe.temporal_factor, pipe.spatial_factor) == (4, 16)
    assert pipe.latent_shape(21, 64, 96) == (1, 48, 6, 4, 6) == folder_latent_shape(wan22_folder, 21, 64, 96)


@pytest.mark.parametrize("height, width", [(48, 64), (64, 16), (64, 40)])
def test_size_not_a_multiple_of_32_is_refused_before_any_work(height, width):
    model = tiny_wan_transformer(in_channels=48)
    pipe = ReHyAtVideoPipeline(model, vae=tiny_vae("wan2.2"))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    pos, _ = embeds()
    bad = "height" if height % 32 else "width"
    with pytest.raises(ValueError, match=f"^{bad} must be a positive multiple of 32 for this model, got "):
        pipe(prompt_embeds=pos, num_frames=9, height=height, width=width, num_inference_steps=1, progress=False)
    assert not calls
    pipe(prompt_embeds=pos, num_frames=9, height=64, width=32, num_inference_steps=1, progress=False)
    assert calls  # the hook does see a forward


def test_generate_refuses_a_size_before_loading(wan22_folder, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(wan22_folder), "--prompt", "a red circle", "--frames", "9",
                 "--height", "48", "--width", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "height must be a positive multiple of 32" in err and " frames at " not in err  # before the model loads
    assert not out.exists()


def test_training_geometry_refuses_a_size(wan22_folder):
    from rehyat.training.common import latent_shape_for

    assert latent_shape_for(wan22_folder, 9, 64, 32) == (48, 3, 4, 2)
    with pytest.raises(ValueError, match="--width must be a positive multiple of 32"):
        latent_shape_for(wan22_folder, 9, 64, 48)


def test_vae_and_transformer_of_other_geometries_are_refused():
    with pytest.raises(ValueError, match=r"z_dim=48.*in_channels=16"):
        ReHyAtVideoPipeline(tiny_wan_transformer(in_channels=16), vae=tiny_vae("wan2.2"))
    with pytest.raises(ValueError, match=r"z_dim=16.*in_channels=48"):
        ReHyAtVideoPipeline(tiny_wan_transformer(in_channels=48), vae=tiny_vae("wan2.1"))


def test_generate_refuses_a_folder_whose_vae_is_of_another_geometry(tmp_path, capsys):
    folder = tiny_pipeline_folder(tmp_path / "mixed", geometry="wan2.1")
    shutil.rmtree(folder / "vae")
    tiny_vae("wan2.2").save_pretrained(folder / "vae")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rehyat generate: error:" in err and "z_dim=48" in err and "in_channels=16" in err
    assert " frames at " not in err  # refused before the model loads
    assert not out.exists()
    with pytest.raises(ValueError, match=r"z_dim=48.*in_channels=16"):
        ReHyAtVideoPipeline.from_pretrained(folder)


def test_save_load_is_bit_exact(wan22_folder, tmp_path):
    pipe = ReHyAtVideoPipeline.from_pretrained(wan22_folder)
    pipe.save_pretrained(tmp_path / "again")
    again = ReHyAtVideoPipeline.from_pretrained(tmp_path / "again")
    reference = tiny_vae("wan2.2")  # what tiny_pipeline_folder saved
    for a, b in ((pipe.transformer, again.transformer), (pipe.vae, again.vae), (reference, again.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for key in ("z_dim", "patch_size", "is_residual", "scale_factor_spatial", "latents_mean", "latents_std"):
        assert again.vae.config[key] == reference.config[key], key
    pos, _ = embeds()
    kw = dict(prompt_embeds=pos, num_frames=9, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
              mode="streaming", progress=False)
    a, b = pipe(**kw), again(**kw)
    assert_outputs_close(b.latents, a.latents)  # two model objects: up to rounding
    assert np.abs(a.video.astype(int) - b.video.astype(int)).max() <= 1


@pytest.mark.parametrize("converted", [False, True])
def test_diffusers_ti2v_folder_generates_what_wan_pipeline_generates(tmp_path, converted):
    """A folder written by diffusers' ``WanPipeline(expand_timesteps=True)`` (Wan2.2 TI2V's, whose transformer
    takes one timestep per token: all equal in text-to-video) loads as it is, and its parallel generation gives
    diffusers' latents (the pipeline passes one timestep per video)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    transformer = tiny_wan_transformer(in_channels=48)
    if converted:
        convert_wan(transformer, blocks="all", chunk_frames=2, overlap_frames=1)
    tokenizer, text_encoder = tiny_text_encoder()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    wan = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae("wan2.2"), scheduler=scheduler,
                      transformer=transformer, expand_timesteps=True)
    wan.save_pretrained(tmp_path / "ti2v")
    pipe = ReHyAtVideoPipeline.from_pretrained(tmp_path / "ti2v")
    assert pipe.scheduler.config.flow_shift == 5.0 and pipe.spatial_factor == 16
    pos, neg = embeds()
    shape = pipe.latent_shape(9, 64, 64)
    with torch.no_grad():
        ref = wan(prompt_embeds=pos, negative_prompt_embeds=neg, latents=initial_noise(0, shape), num_frames=9,
                  height=64, width=64, num_inference_steps=3, guidance_scale=3.0, output_type="latent").frames
    modes = ("parallel", "streaming") if converted else ("parallel",)
    for mode in modes:
        got = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=9, height=64, width=64,
                   num_inference_steps=3, guidance_scale=3.0, seed=0, mode=mode, output_type="latent",
                   progress=False).latents
        # tolerance: two code paths (per-token and per-video timestep; a batch of two guidance branches against
        # two calls) and, in streaming mode, the recurrent form, through 3 sampler steps
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=mode)


def test_cli_converts_and_streams_a_wan22_teacher(tmp_path):
    """``rehyat convert`` then ``rehyat generate --mode streaming`` on a plain Wan2.2-geometry teacher folder."""
    teacher = tiny_pipeline_folder(tmp_path / "teacher", converted=False, geometry="wan2.2")
    student = tmp_path / "student"
    assert main(["convert", "--model", str(teacher), "--out", str(student), "--blocks", "all", "--chunk-frames", "2",
                 "--overlap-frames", "1", "--no-progress"]) == 0
    assert (student / "vae" / "config.json").is_file()
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(student), "--prompt", "a red circle", "--frames", "13", "--height", "64",
                 "--width", "32", "--steps", "1", "--mode", "streaming", "--save-latents", str(tmp_path / "z.pt"),
                 "--out", str(out)]) == 0
    assert out.is_file() and torch.load(tmp_path / "z.pt").shape == (1, 48, 4, 4, 2)
