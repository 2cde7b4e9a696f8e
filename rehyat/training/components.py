"""Model folders for training: read configs without loading weights, load only the parts a run needs, write results.

A model folder is what :class:`rehyat.pipelines.ReHyAtVideoPipeline` reads: ``transformer/`` (plain Wan or ReHyAt),
``scheduler/``, optional ``vae/``, optional ``tokenizer/`` + ``text_encoder/`` (or ``"text_encoder": "minilm"``
in ``rehyat_pipeline.json``). Training runs load the transformer and scheduler always, and a text encoder or VAE
only when they need one, so a GPU machine without the text encoder's weights can train from a caption table.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines.folders import (  # noqa: F401  (re-exported: part of this module's API)
    PIPELINE_CONFIG_NAME,
    ModelFolder,
    copy_components,
    load_scheduler,
    load_text_encoder_from_folder,
    load_vae,
    read_pipeline_config,
    read_transformer_config,
    write_model_folder,
)

__all__ = [
    "read_transformer_config",
    "read_pipeline_config",
    "load_scheduler",
    "load_text_encoder_from_folder",
    "load_model_folder",
    "copy_components",
    "save_model_folder",
    "same_architecture",
]

# config keys of WanTransformer3DModel that do not change the computation or the weights' shapes
_NON_ARCH_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "rope_max_seq_len"}


def same_architecture(a: dict, b: dict) -> list[str]:
    """Config keys (of two :func:`read_transformer_config` dicts) whose values differ and change the architecture."""
    keys = (set(a) | set(b)) - _NON_ARCH_KEYS - {"rehyat"}
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return sorted(k for k in keys if norm(a.get(k)) != norm(b.get(k)))


def load_model_folder(folder, *, device="cpu", dtype: torch.dtype | None = None, text_encoder: bool = False,
                      vae: bool = False):
    """A :class:`~rehyat.pipelines.ReHyAtVideoPipeline` with the folder's transformer and scheduler, and its text
    encoder / VAE only when asked for (``None`` otherwise). ``folder``: a path or a
    :class:`~rehyat.pipelines.folders.ModelFolder` (whose configs, once read, are not read again).

    Raises:
        FileNotFoundError / ValueError: as :func:`read_transformer_config`; ValueError for ``text_encoder=True``
            on a folder without one.
    """
    from ..models import load_transformer
    from ..pipelines import ReHyAtVideoPipeline

    folder = ModelFolder.of(folder)
    folder.transformer_config  # noqa: B018  (a missing or malformed config fails here, before any weights)
    cfg = folder.pipeline_config
    transformer = load_transformer(folder.path, torch_dtype=dtype, device=device)
    tok = enc = v = None
    if text_encoder:
        tok, enc = load_text_encoder_from_folder(folder, device=device)
    if vae:
        v = load_vae(folder.path, device)
    return ReHyAtVideoPipeline(
        transformer, load_scheduler(folder.path), v, tok, enc, max_sequence_length=cfg.get("max_sequence_length", 512),
        fps=cfg.get("fps", 16), negative_prompt=cfg.get("negative_prompt", ""),
    )


def save_model_folder(transformer, out, *, components_from=None, pipeline_config: dict | None = None) -> Path:
    """Write a model folder: ``transformer/`` (with :func:`rehyat.save_rehyat` for a converted model, else
    ``save_pretrained``), the other components copied from ``components_from`` (a model folder), or a default
    scheduler when there is none, and ``rehyat_pipeline.json`` (that of ``components_from``, else the one already
    in ``out``) updated with ``pipeline_config`` (a dict value updates a dict entry key by key).

    Written atomically by :func:`~rehyat.pipelines.folders.write_model_folder`: into a temporary folder beside
    ``out``, then moved in, so an interrupted save never leaves a half-written folder or component; entries of
    ``out`` it does not write (a run's ``train/``, its reports) are kept.
    """
    out = Path(out)
    src = ModelFolder.of(components_from) if components_from is not None else None
    cfg = dict((src if src is not None and (src / PIPELINE_CONFIG_NAME).is_file() else ModelFolder(out))
               .pipeline_config)  # a copy: the entries below must not change a ModelFolder's cached config
    for k, v in (pipeline_config or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return write_model_folder(out, transformer, cfg, components_from=src and src.path, overwrite=True)
