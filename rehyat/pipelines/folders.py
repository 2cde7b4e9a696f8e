"""Reading a model folder's parts without loading more than asked: configs, scheduler, text encoder.

A model folder is what :class:`rehyat.pipelines.ReHyAtVideoPipeline` reads: ``transformer/`` (plain Wan or ReHyAt),
``scheduler/``, optional ``vae/``, optional ``tokenizer/`` + ``text_encoder/`` (or ``"text_encoder": "minilm"``
in ``rehyat_pipeline.json``). The pipeline and the training commands share these readers, the VAE loader
(:func:`load_vae`) and the one writer of model folders (:func:`write_model_folder`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..io import first_line, read_json_object, write_folder_atomically
from ..models.wan import read_rehyat_settings, read_wan_config

__all__ = ["PIPELINE_CONFIG_NAME", "read_transformer_config", "read_pipeline_config", "default_scheduler", "load_scheduler",
           "load_text_encoder_from_folder", "load_vae", "copy_components", "write_model_folder"]

PIPELINE_CONFIG_NAME = "rehyat_pipeline.json"


def read_transformer_config(folder) -> dict:
    """``config.json`` of a model folder's transformer (or of a transformer folder), checked to be a Wan one, with
    ``"rehyat"``: its ReHyAt settings as a dict (:meth:`~rehyat.models.ReHyAtConfig.to_dict`, read by
    :func:`rehyat.models.wan.read_rehyat_settings` from ``config.json`` or ``rehyat_config.json``; ``None`` for a
    plain teacher).

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: no Wan transformer config in it, or malformed or
            disagreeing ReHyAt settings.
    """
    tdir, cfg = read_wan_config(folder)
    settings = read_rehyat_settings(tdir, cfg)
    cfg["patch_size"] = list(cfg.get("patch_size", [1, 2, 2]))
    cfg.setdefault("out_channels", cfg.get("in_channels"))
    cfg.setdefault("in_channels", 16)  # diffusers' WanTransformer3DModel default
    cfg["rehyat"] = None if settings is None else settings.to_dict()
    return cfg


def read_pipeline_config(folder) -> dict:
    """``rehyat_pipeline.json`` of a model folder (``{}`` when absent)."""
    p = Path(folder) / PIPELINE_CONFIG_NAME
    return read_json_object(p) if p.is_file() else {}


def default_scheduler():
    """Wan2.1's default sampler at 480p: ``UniPCMultistepScheduler`` with flow sigmas, flow shift 3.0."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def load_scheduler(folder):
    """The folder's ``scheduler/`` (any diffusers scheduler class), or Wan's default UniPC (flow shift 3.0)."""
    import diffusers

    folder = Path(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return default_scheduler()
    cls = getattr(diffusers, read_json_object(path).get("_class_name", ""), None)
    if cls is None:
        raise ValueError(f"unknown scheduler class in {path}")
    return cls.from_pretrained(folder / "scheduler")


def load_text_encoder_from_folder(folder, *, device="cpu"):
    """``(tokenizer, text_encoder)`` of a model folder (``tokenizer/`` + ``text_encoder/``, or MiniLM by name).

    Raises:
        ValueError: the folder has no text encoder (then pass a caption-embedding table instead).
    """
    folder = Path(folder)
    cfg = read_pipeline_config(folder)
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        import transformers

        te_cfg = read_json_object(folder / "text_encoder" / "config.json")
        arch = (te_cfg.get("architectures") or ["AutoModel"])[0]
        te_cls = getattr(transformers, arch, transformers.AutoModel)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
        encoder = te_cls.from_pretrained(folder / "text_encoder").to(device).eval()
    elif cfg.get("text_encoder") == "minilm":
        from ..text_encoder import load_text_encoder

        tokenizer, encoder = load_text_encoder(device=device)
    else:
        raise ValueError(
            f"{folder} has no text encoder (tokenizer/ + text_encoder/, or \"text_encoder\": \"minilm\" in "
            f"{PIPELINE_CONFIG_NAME}): pass --text-embeddings TABLE instead"
        )
    width = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "d_model", None)
    try:
        text_dim = read_transformer_config(folder)["text_dim"]
    except ValueError:
        text_dim = width
    if width is not None and width != text_dim:
        raise ValueError(f"{folder}'s text encoder gives {width}-dim embeddings, its transformer takes text_dim={text_dim}")
    return tokenizer, encoder



def load_vae(folder, device="cpu"):
    """The folder's ``vae/`` as an ``AutoencoderKLWan`` in float32 on ``device``, in eval mode; ``None`` without a
    ``vae/`` folder (pixel space). The one loader of a model folder's VAE.

    Raises:
        ValueError: ``vae/`` holds weights or a config diffusers cannot load (e.g. a corrupt safetensors file),
            naming the folder.
    """
    import torch
    from diffusers import AutoencoderKLWan

    path = Path(folder) / "vae"
    if not path.is_dir():
        return None
    try:
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=torch.float32)
    except OSError as e:  # diffusers: "Error no file named ...", a corrupt safetensors file
        raise ValueError(f"cannot load the VAE in {path}: {first_line(e)}") from None
    return vae.to(device).eval()


def copy_components(src, dst, *, exclude=("transformer",)) -> None:
    """Copy every top-level entry of model folder ``src`` into ``dst`` except ``exclude`` and training files
    (``train/``, ``distill_*``, ``finetune_*``, ``selection*``)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    skip = set(exclude) | {"train"}
    for entry in src.iterdir():
        if entry.name in skip or entry.name.startswith(("distill_", "finetune_", "selection")):
            continue
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target)


def _save_transformer(transformer, folder: Path) -> None:
    from ..models.wan import get_rehyat_config, save_rehyat

    if get_rehyat_config(transformer) is not None:
        save_rehyat(transformer, folder, overwrite=True)
    else:
        transformer.save_pretrained(folder)


def write_model_folder(folder, transformer, pipeline_config: dict, *, scheduler=None, vae=None, components_from=None,
                       overwrite: bool = False) -> Path:
    """Write a model folder atomically (:func:`rehyat.io.write_folder_atomically`): everything goes to a temporary
    folder beside ``folder`` first and is moved in when complete, so an error or interrupt mid-save leaves no
    half-written folder or component. The one writer of model folders.

    Args:
        folder: the model folder; where it already holds files (``overwrite=True``), the components written here
            replace theirs and its other entries are kept.
        transformer: written to ``transformer/`` (:func:`rehyat.save_rehyat` for a converted model, else
            ``save_pretrained``).
        pipeline_config: the content of ``rehyat_pipeline.json``.
        scheduler: written to ``scheduler/``; ``None``: the one of ``components_from`` or ``folder`` if any, else
            Wan's default (:func:`default_scheduler`).
        vae: an ``AutoencoderKLWan`` written to ``vae/``, or ``None``.
        components_from: a model folder whose other components are copied (:func:`copy_components`).
        overwrite: write into a non-empty ``folder``.

    Raises:
        FileExistsError: ``folder`` is a file, or a non-empty folder without ``overwrite``; before anything is written.
    """
    folder = Path(folder)

    def write(tmp: Path) -> None:
        if components_from is not None:
            copy_components(components_from, tmp)
        _save_transformer(transformer, tmp / "transformer")
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
        elif not (tmp / "scheduler").is_dir() and not (folder / "scheduler").is_dir():
            default_scheduler().save_pretrained(tmp / "scheduler")
        if vae is not None:
            vae.save_pretrained(tmp / "vae")
        (tmp / PIPELINE_CONFIG_NAME).write_text(json.dumps(pipeline_config, indent=2) + "\n")

    return write_folder_atomically(folder, write, overwrite=overwrite)
