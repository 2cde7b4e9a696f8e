"""Fixtures of the training tests: tiny model folders, prompts and datasets, built once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster, above all on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pixel_model_folder(folder, *, converted: bool = False, num_layers: int = 2, chunk_frames: int = 2,
                       overlap_frames: int = 1, seed: int = 0):
    """A tiny pixel-space model folder (in_channels 3, no VAE) with the tiny UMT5 text encoder."""
    from rehyat.models import convert_wan
    from rehyat.pipelines import ReHyAtVideoPipeline
    from rehyat.testing import tiny_text_encoder, tiny_wan_transformer

    tok, enc = tiny_text_encoder()
    tr = tiny_wan_transformer(num_layers=num_layers, in_channels=3, seed=seed)
    if converted:
        torch.manual_seed(seed)
        convert_wan(tr, blocks="all", chunk_frames=chunk_frames, overlap_frames=overlap_frames)
    pipe = ReHyAtVideoPipeline(tr, tokenizer=tok, text_encoder=enc, max_sequence_length=8, fps=8)
    pipe.save_pretrained(folder)
    tok.save_pretrained(folder / "tokenizer")
    enc.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="session")
def teacher(root):
    """Tiny plain teacher (16 latent channels, no VAE, 2 blocks) with a text encoder."""
    from rehyat.testing import tiny_pipeline_folder

    return tiny_pipeline_folder(root / "teacher", converted=False, vae=False)


@pytest.fixture(scope="session")
def prompts(root):
    p = root / "prompts.txt"
    p.write_text("a red circle moving left\na blue square moving up\na green triangle on black\n")
    return p


@pytest.fixture(scope="session")
def videos(root):
    """A world videofolder: 6 videos of 5 frames, 8x8 pixels."""
    from rehyat.world import export_video_dataset

    export_video_dataset(root / "videos", num_videos=6, num_frames=5, height=8, width=8, seed=0)
    return root / "videos"


@pytest.fixture(scope="session")
def pixel_teacher(root):
    return pixel_model_folder(root / "pixel_teacher")


@pytest.fixture(scope="session")
def pixel_student(root):
    """The pixel teacher's architecture converted to ReHyAt (same teacher weights, seed 0)."""
    return pixel_model_folder(root / "pixel_student", converted=True)


@pytest.fixture(scope="session")
def pixel_dataset(root, pixel_teacher, videos):
    from rehyat.training import prepare_dataset

    return prepare_dataset(pixel_teacher, videos, root / "pixel_dataset", progress=False) and root / "pixel_dataset"


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights fails the test: an error the test expects must come first."""
    import rehyat.pipelines.folders as folders
    import rehyat.training.components as comp

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr(comp, "load_model_folder", refuse)
    monkeypatch.setattr(comp, "load_text_encoder_from_folder", refuse)
    monkeypatch.setattr(folders, "load_text_encoder_from_folder", refuse)  # through load_prompt_encoder
