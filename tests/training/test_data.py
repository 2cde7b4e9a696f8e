"""Dataset format, prepare-data (pixel space and tiny VAE), caption tables, data order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rehyat.cli import main
from rehyat.training import GlobalBatchSampler, TextEmbeddingTable, load_dataset, prepare_dataset, read_dataset_info
from rehyat.world import read_metadata, read_video


def test_prepare_data_pixel_space_format(pixel_dataset, videos, pixel_teacher):
    ds = pixel_dataset
    info = json.loads((ds / "dataset.json").read_text())
    assert info["format"] == "rehyat-latents" and info["version"] == 1
    assert info["latent_space"] == "pixel"
    assert (info["latent_channels"], info["latent_frames"], info["latent_height"], info["latent_width"]) == (3, 5, 8, 8)
    assert (info["num_frames"], info["height"], info["width"]) == (5, 8, 8)
    assert info["text_dim"] == 64 and info["max_sequence_length"] == 8 and info["num_samples"] == 6
    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text().splitlines()]
    src = read_metadata(videos)
    assert [r["text"] for r in rows] == [r["text"] for r in src]
    assert [r["file_name"] for r in rows] == [f"{i:06d}.safetensors" for i in range(6)]
    # latents are the decoded video in [-1, 1], [3, F, H, W]
    t = load_file(ds / rows[2]["file_name"])
    assert set(t) == {"latents", "prompt_embeds"}
    video = torch.from_numpy(read_video(videos / src[2]["file_name"])).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(t["latents"], video)
    # text embeddings: the model's text encoder, as the pipeline encodes prompts
    from rehyat.pipelines import ReHyAtVideoPipeline

    pipe = ReHyAtVideoPipeline.from_pretrained(pixel_teacher)
    torch.testing.assert_close(t["prompt_embeds"], pipe.encode_prompt([rows[2]["text"]])[0].float())
    assert t["prompt_embeds"].shape == (8, 64)
    assert (ds / "null_embeds.safetensors").is_file()
    # the loader stacks everything
    loaded = load_dataset(ds)
    assert loaded.in_memory and loaded.latents.shape == (6, 3, 5, 8, 8) and loaded.prompt_embeds.shape == (6, 8, 64)


def test_prepare_data_with_tiny_vae(root, teacher, tmp_path):
    from rehyat.testing import tiny_pipeline_folder
    from rehyat.world import export_video_dataset

    vids = export_video_dataset(tmp_path / "v", num_videos=2, num_frames=9, height=16, width=16, seed=1) and tmp_path / "v"
    model = tiny_pipeline_folder(tmp_path / "m", converted=False, vae=True)
    assert main(["prepare-data", "--model", str(model), "--videos", str(vids), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    info = read_dataset_info(tmp_path / "d")
    assert info.latent_space == "vae" and info.latent_shape == (16, 3, 2, 2) and info.num_frames == 9
    t = load_file(tmp_path / "d" / "000001.safetensors")
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model / "vae")
    x = torch.from_numpy(read_video(vids / "000001.mp4")).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(t["latents"], ((z - mean) / std)[0])


def test_caption_table_roundtrip_and_lookup(root, pixel_teacher, videos, pixel_dataset, tmp_path):
    table_path = tmp_path / "captions.safetensors"
    assert main(["prepare-data", "--model", str(pixel_teacher), "--videos", str(videos),
                 "--write-text-embeddings", str(table_path)]) == 0
    with safe_open(str(table_path), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
        assert f.get_tensor("embeds").shape == (len(captions), 8, 64)
    assert "" in captions  # the negative prompt, for guidance and caption dropout
    table = TextEmbeddingTable.load(table_path)
    with pytest.raises(ValueError, match="not in the text-embedding table"):
        table.lookup(["no such caption"])
    # a dataset built from the table equals the one built with the text encoder
    prepare_dataset(pixel_teacher, videos, tmp_path / "d", text_embeddings=table_path, progress=False)
    a, b = load_dataset(tmp_path / "d"), load_dataset(pixel_dataset)
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds)
    torch.testing.assert_close(a.latents, b.latents)


def test_lazy_dataset_matches_in_memory(pixel_dataset):
    mem = load_dataset(pixel_dataset)
    lazy = load_dataset(pixel_dataset, max_memory_bytes=0)
    assert mem.in_memory and not lazy.in_memory
    idx = torch.tensor([4, 0, 4])
    for x, y in zip(mem.batch(idx), lazy.batch(idx)):
        torch.testing.assert_close(x, y)


def test_global_batch_sampler_order_and_state():
    s = GlobalBatchSampler(5, 3, seed=7)
    seen = torch.cat([s.next_batch() for _ in range(5)])  # 15 = three epochs
    for e in range(3):
        assert sorted(seen[5 * e : 5 * e + 5].tolist()) == list(range(5))
    a = GlobalBatchSampler(5, 3, seed=7)
    a.next_batch(), a.next_batch()
    b = GlobalBatchSampler(5, 3, seed=7)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch(), b.next_batch())
    assert not np.array_equal(GlobalBatchSampler(5, 5, seed=8).next_batch(), GlobalBatchSampler(5, 5, seed=7).next_batch())
