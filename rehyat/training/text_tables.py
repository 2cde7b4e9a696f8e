"""Writing caption-embedding tables (``--text-embeddings FILE.safetensors``, format in :mod:`rehyat.text_encoder`):
a table replaces a text encoder on machines that lack its weights. :func:`encode_text_table` writes one with a model
folder's text encoder; the class, :class:`rehyat.text_encoder.TextEmbeddingTable`, lives on the base floor so that
the pipeline can read a table without importing training."""

from __future__ import annotations

import torch

from ..text_encoder import TextEmbeddingTable

__all__ = ["encode_text_table"]


def _text_encoder_name(folder) -> str | None:
    from ..pipelines.folders import ModelFolder

    folder = ModelFolder.of(folder)
    return folder.pipeline_config.get("text_encoder") or ("folder" if (folder / "text_encoder").is_dir() else None)


@torch.no_grad()
def encode_text_table(model, captions: list[str], out, *, device="cpu", batch_size: int = 64,
                      include_negative: bool = True, overwrite: bool = False) -> TextEmbeddingTable:
    """Encode captions with a model folder's text encoder and write a :class:`TextEmbeddingTable` to ``out``.

    Args:
        model: a model folder with a text encoder (``tokenizer/`` + ``text_encoder/``, or ``"text_encoder":
            "minilm"`` in ``rehyat_pipeline.json``).
        captions: the captions (duplicates and empty lines are dropped; order kept).
        out: the ``.safetensors`` file to write.
        include_negative: also add the folder's negative prompt (default ``""``) for guidance and caption dropout.

    Raises:
        ValueError: no captions, or no text encoder in the folder. FileExistsError: ``out`` exists (unless
            ``overwrite``). FileNotFoundError: the folder or ``out``'s parent does not exist.
    """
    from ..io import check_output_file
    from ..pipelines.folders import ModelFolder, load_prompt_encoder

    model = ModelFolder.of(model)  # rehyat_pipeline.json read once, for the settings here and the encoder
    check_output_file(out, overwrite=overwrite, arg="--write-text-embeddings")
    caps = list(dict.fromkeys(c for c in captions if c.strip()))
    if not caps:
        raise ValueError("no captions to encode")
    cfg = model.pipeline_config
    if include_negative:
        neg = cfg.get("negative_prompt", "")
        if neg not in caps:
            caps.append(neg)
    encode = load_prompt_encoder(model, device=device, batch_size=batch_size)
    L = cfg.get("max_sequence_length", 512)
    table = TextEmbeddingTable(caps, encode(caps), max_sequence_length=L, text_encoder=_text_encoder_name(model))
    table.save(out)
    return table
