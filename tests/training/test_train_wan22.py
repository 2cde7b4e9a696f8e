"""Training on Wan2.2-TI2V-5B's geometry (tiny: 48 latent channels, 16x spatial compression): prepare-data through the
Wan2.2 VAE, distillation from a Wan2.2 teacher and fine-tuning of the result, a couple of steps each; sizes the
geometry cannot take are refused before any work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rehyat.testing import folder_weights
from rehyat.training import distill, finetune, prepare_dataset

# 9 frames of 64 x 64 pixels: latents [48, 3, 4, 4] (4 tokens per latent frame)
GEOM = dict(frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    """``(teacher folder, dataset folder)``: a tiny plain Wan2.2-geometry teacher with its VAE and text encoder, and
    a dataset of 2 world videos (9 frames, 64 x 64) encoded by that VAE."""
    from rehyat.testing import tiny_pipeline_folder
    from rehyat.world import export_video_dataset

    root = tmp_path_factory.mktemp("wan22")
    teacher = tiny_pipeline_folder(root / "teacher", converted=False, geometry="wan2.2")
    export_video_dataset(root / "videos", num_videos=2, num_frames=9, height=64, width=64, seed=0)
    prepare_dataset(teacher, root / "videos", root / "data", progress=False)
    return teacher, root / "data", root


def test_prepare_data_encodes_with_the_wan22_vae(wan22):
    from diffusers import AutoencoderKLWan

    from rehyat.training.data import _read_video, read_dataset_info
    from rehyat.testing import assert_outputs_close

    teacher, data, root = wan22
    info = read_dataset_info(data)
    assert info.latent_space == "vae" and info.latent_shape == (48, 3, 4, 4)
    vae = AutoencoderKLWan.from_pretrained(teacher / "vae")
    x = torch.from_numpy(_read_video(root / "videos" / "000001.mp4")).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)  # 48 entries each
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert_outputs_close(load_file(data / "000001.safetensors")["latents"], ((z - mean) / std)[0])


def test_prepare_data_refuses_videos_of_a_size_the_geometry_cannot_take(wan22, tmp_path):
    from rehyat.world import export_video_dataset

    teacher, _, _ = wan22
    export_video_dataset(tmp_path / "v", num_videos=1, num_frames=9, height=48, width=64, seed=0)
    with pytest.raises(ValueError, match="video height 48 is not a multiple of 32"):
        prepare_dataset(teacher, tmp_path / "v", tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").glob("*.safetensors"))


def test_distill_then_finetune(wan22, tmp_path):
    from rehyat.pipelines import ReHyAtVideoPipeline

    teacher, data, root = wan22
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    student = tmp_path / "student"
    res = distill(teacher, student, prompts=prompts, **GEOM, chunk_frames=1, overlap_frames=0, sampling_steps=2,
                  steps=2, lr=1e-2, batch_size=2, seed=0, progress=False)
    assert set(res.before) == set(res.after) == {0, 1}
    before, after = folder_weights(teacher), folder_weights(student)
    assert before.keys() <= after.keys()
    for k in before:  # distillation trains the feature maps only
        assert torch.equal(before[k], after[k]), k
    assert any(k not in before for k in after)  # the feature maps

    tuned = tmp_path / "tuned"
    finetune(tuned, model=student, data=data, steps=2, batch_size=2, lr=1e-2, eval_batches=0, progress=False)
    changed = [k for k, v in folder_weights(tuned).items() if not torch.equal(v, after[k])]
    assert changed
    pipe = ReHyAtVideoPipeline.from_pretrained(tuned)  # a complete model folder with the Wan2.2 VAE
    assert pipe.spatial_factor == 16 and pipe.vae.config.z_dim == pipe.transformer.config.in_channels == 48
    g = torch.Generator().manual_seed(0)
    out = pipe(prompt_embeds=torch.randn(1, 6, 64, generator=g), num_frames=9, height=64, width=32,
               num_inference_steps=1, guidance_scale=1.0, mode="streaming", progress=False)
    assert out.latents.shape == (1, 48, 3, 4, 2) and out.video.shape == (9, 64, 32, 3)


def test_training_sizes_refused_before_any_work(wan22, tmp_path, no_weights):
    teacher, _, root = wan22
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ValueError, match="--height must be a positive multiple of 32"):
        distill(teacher, tmp_path / "s", prompts=prompts, frames=9, height=48, width=64, steps=1, progress=False)
    with pytest.raises(ValueError, match="--width must be a positive multiple of 32"):
        finetune(tmp_path / "f", model=teacher, teacher=teacher, prompts=prompts, frames=9, height=64, width=80,
                 steps=1, progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()
