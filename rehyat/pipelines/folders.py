"""Reading a model folder's parts without loading more than asked: configs, scheduler, text encoder.

A model folder is what :class:`rehyat.pipelines.ReHyAtVideoPipeline` reads: ``transformer/`` (plain Wan or ReHyAt),
``scheduler/``, optional ``vae/``, optional ``tokenizer/`` + ``text_encoder/`` (or ``"text_encoder": "minilm"``
in ``rehyat_pipeline.json``). The pipeline and the training commands share these readers.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PIPELINE_CONFIG_NAME", "read_transformer_config", "read_pipeline_config", "default_scheduler", "load_scheduler",
           "load_text_encoder_from_folder"]

PIPELINE_CONFIG_NAME = "rehyat_pipeline.json"


def _transformer_dir(folder: Path) -> Path:
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    if (folder / "config.json").is_file():
        return folder
    raise ValueError(f"{folder} is not a Wan model folder: no transformer/config.json")


def read_transformer_config(folder) -> dict:
    """``config.json`` of a model folder's transformer (or of a transformer folder), checked to be a Wan one, plus
    ``"rehyat"``: the folder's ``rehyat_config.json`` as a dict (``None`` for a plain teacher).

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: no Wan transformer config in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    tdir = _transformer_dir(folder)
    cfg = _read_json(tdir / "config.json")
    if cfg.get("_class_name") != "WanTransformer3DModel":
        raise ValueError(f"{tdir / 'config.json'} describes {cfg.get('_class_name')!r}, expected 'WanTransformer3DModel'")
    cfg["patch_size"] = list(cfg.get("patch_size", [1, 2, 2]))
    cfg.setdefault("out_channels", cfg.get("in_channels"))
    rc = tdir / "rehyat_config.json"
    cfg.setdefault("in_channels", 16)  # diffusers' WanTransformer3DModel default
    cfg["rehyat"] = _read_json(rc) if rc.is_file() else None
    return cfg


def read_pipeline_config(folder) -> dict:
    """``rehyat_pipeline.json`` of a model folder (``{}`` when absent)."""
    p = Path(folder) / PIPELINE_CONFIG_NAME
    return _read_json(p) if p.is_file() else {}


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


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
    cls = getattr(diffusers, json.loads(path.read_text()).get("_class_name", ""), None)
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

        te_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
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

