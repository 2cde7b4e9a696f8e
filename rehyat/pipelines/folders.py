"""Reading a model folder's parts without loading more than asked: configs, scheduler, text encoder.

A model folder is what :class:`rehyat.pipelines.ReHyAtVideoPipeline` reads: ``transformer/`` (plain Wan or ReHyAt),
``scheduler/``, optional ``vae/``, optional ``tokenizer/`` + ``text_encoder/`` (or ``"text_encoder": "minilm"``
in ``rehyat_pipeline.json``). The pipeline and the training commands share these readers, the VAE loader
(:func:`load_vae`) and the one writer of model folders (:func:`write_model_folder`).
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path

from ..io import first_line, read_json_object, write_folder_atomically
from ..models.wan import read_rehyat_settings, read_wan_config

__all__ = ["PIPELINE_CONFIG_NAME", "WAN21_DEFAULTS", "ModelFolder", "read_transformer_config", "read_pipeline_config",
           "latent_shape", "vae_factors", "check_vae_channels", "check_rope_table", "folder_vae_config",
           "folder_vae_factors", "folder_latent_shape", "folder_check_rope_table", "default_scheduler",
           "load_scheduler", "load_text_encoder_from_folder", "PromptEncoder", "load_prompt_encoder", "load_vae",
           "copy_components", "write_model_folder"]

PIPELINE_CONFIG_NAME = "rehyat_pipeline.json"
# Wan2.1's generation defaults (frames, pixels, denoising steps, CFG scale): what every command and the pipeline
# fall back on for a setting neither the caller nor the folder's ``rehyat_pipeline.json`` "defaults" gives
WAN21_DEFAULTS = {"frames": 81, "height": 480, "width": 832, "steps": 50, "guidance": 5.0}


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


def latent_shape(temporal: int, spatial: int, patch: int, channels: int, num_frames: int, height: int, width: int,
                 batch: int = 1) -> tuple[int, int, int, int, int]:
    """Latent shape ``[B, C, F, H, W]`` of a video of ``num_frames`` x ``height`` x ``width`` pixels.

    ``temporal``/``spatial``: the VAE's compression (1/1 in pixel space); ``patch``: the transformer's spatial
    patch. Raises ``ValueError`` for a frame count the VAE cannot produce (``temporal * k + 1``) or a size that is
    not a positive multiple of ``spatial * patch``.
    """
    mult = spatial * patch
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {num_frames!r}")
    if (num_frames - 1) % temporal != 0:
        raise ValueError(f"frames must be {temporal}k+1 for this model's VAE (e.g. 81, 321, 1281), got {num_frames!r}")
    for name, val in (("height", height), ("width", width)):
        if not isinstance(val, int) or val < mult or val % mult != 0:
            raise ValueError(f"{name} must be a positive multiple of {mult} for this model, got {val!r}")
    return (batch, channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def vae_factors(vae_config) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of an ``AutoencoderKLWan`` from its config (a dict or ``vae.config``):
    ``scale_factor_temporal`` / ``scale_factor_spatial``; where the config omits them (or sets them to null),
    derived from its down-sampling stages and pixel patch: ``2 ** sum(temperal_downsample)`` and
    ``2 ** len(temperal_downsample) * patch_size`` (Wan2.1's VAE: 4 and 8; Wan2.2's, with ``patch_size=2``: 4 and
    16). The one reader of a VAE's geometry (its latent channels are ``z_dim``: :func:`check_vae_channels`)."""
    down = vae_config.get("temperal_downsample") or [False, True, True]
    temporal, spatial = vae_config.get("scale_factor_temporal"), vae_config.get("scale_factor_spatial")
    return (int(temporal) if temporal is not None else 2 ** sum(down),
            int(spatial) if spatial is not None else 2 ** len(down) * (vae_config.get("patch_size") or 1))


def check_vae_channels(vae_config, in_channels: int) -> None:
    """``ValueError`` when a VAE's latents (``z_dim`` channels, default 16) are not what the transformer takes
    (``in_channels``): a VAE and a transformer of two models, e.g. Wan2.2-TI2V-5B's VAE (48) with a Wan2.1
    transformer (16). ``vae_config``: a dict or ``vae.config``."""
    z_dim = vae_config.get("z_dim", 16)
    if z_dim != in_channels:
        raise ValueError(f"the VAE makes {z_dim}-channel latents (z_dim={z_dim}) but the transformer takes "
                         f"in_channels={in_channels}: they belong to two models (Wan2.1's VAE has 16 channels, "
                         "Wan2.2-TI2V-5B's 48); use the VAE the transformer was trained with")


WAN_ROPE_MAX_SEQ_LEN = 1024  # diffusers' WanTransformer3DModel default for rope_max_seq_len


def check_rope_table(positions: int | None, patch_size, shape, temporal: int, spatial: int) -> None:
    """``ValueError`` when a latent video is longer or larger than a plain Wan transformer's RoPE table.

    diffusers' ``WanRotaryPosEmbed`` precomputes ``rope_max_seq_len`` positions per axis (latent frames, rows and
    columns of patches) and fails inside the forward beyond them; a ReHyAt-converted transformer computes RoPE for
    any position (:class:`rehyat.models.wan.AbsoluteRotaryPosEmbed`), in every mode.

    Args:
        positions: the table's length (``rope_max_seq_len``), or ``None`` for a converted transformer (no limit).
        patch_size: the transformer's ``(p_t, p_h, p_w)``.
        shape: latents ``[B, C, F, H, W]`` (:func:`latent_shape`).
        temporal, spatial: the VAE's compression (1, 1 in pixel space), to state the limit in pixels and frames.

    Raises:
        ValueError: one line naming ``frames``, ``height`` or ``width``, the longest the model supports (frames
            also in latent frames) and that a converted model has no such limit.
    """
    if positions is None:
        return
    p_t, p_h, p_w = patch_size
    _, _, frames, height, width = shape
    table = f"this plain Wan transformer's RoPE table (rope_max_seq_len={positions} positions per axis), which supports"
    other = "in every mode; a ReHyAt-converted model (rehyat convert) has no such limit in any mode"
    if frames // p_t > positions:
        longest = positions * p_t
        raise ValueError(f"frames {(frames - 1) * temporal + 1} ({frames} latent frames) is past {table} up to "
                         f"{(longest - 1) * temporal + 1} frames ({longest} latent frames) {other}")
    for name, size, patch in (("height", height, p_h), ("width", width, p_w)):
        if size // patch > positions:
            raise ValueError(f"{name} {size * spatial} ({size // patch} patches) is past {table} up to "
                             f"{positions * patch * spatial} pixels ({positions} patches) {other}")


class ModelFolder:
    """A model folder's configs, each read once (on first use), without loading any weights.

    Pass one around instead of the folder's path (it is ``os.PathLike`` and prints as the path): the pipeline
    (:meth:`rehyat.pipelines.ReHyAtVideoPipeline.from_pretrained`), the ``folder_*`` readers and the CLI's checks
    then share its reads. ``ModelFolder.of(x)`` takes a path or a ``ModelFolder``.

    Attributes (read on first access, then kept; errors as their readers raise them):
        path: the folder.
        pipeline_config: ``rehyat_pipeline.json`` (:func:`read_pipeline_config`; ``{}`` when absent).
        transformer_config: the transformer's ``config.json`` with ``"rehyat"``, its ReHyAt settings as a dict or
            ``None`` (:func:`read_transformer_config`; ``FileNotFoundError`` / ``ValueError``).
        vae_config: ``vae/config.json``, or ``None`` without that file (pixel space; ``ValueError`` for malformed
            JSON).
    """

    def __init__(self, path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, folder) -> "ModelFolder":
        """``folder`` itself when it is a :class:`ModelFolder`, else a new one for that path."""
        return folder if isinstance(folder, ModelFolder) else cls(folder)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    def __truediv__(self, other) -> Path:
        return self.path / other

    @cached_property
    def pipeline_config(self) -> dict:
        return read_pipeline_config(self.path)

    @cached_property
    def transformer_config(self) -> dict:
        return read_transformer_config(self.path)

    @cached_property
    def vae_config(self) -> dict | None:
        cfg = self.path / "vae" / "config.json"
        return read_json_object(cfg) if cfg.is_file() else None

    @property
    def defaults(self) -> dict:
        """The model's default generation settings (``"defaults"`` of ``rehyat_pipeline.json``; ``{}`` without)."""
        return self.pipeline_config.get("defaults") or {}

    @property
    def generation_defaults(self) -> dict:
        """Every default generation setting: :attr:`defaults` over :data:`WAN21_DEFAULTS` (frames, height,
        width, steps, guidance, and any other key the folder gives)."""
        return {**WAN21_DEFAULTS, **self.defaults}

    @property
    def rehyat(self) -> dict | None:
        """The transformer's ReHyAt settings as a dict, ``None`` for a plain Wan transformer."""
        return self.transformer_config["rehyat"]

    @property
    def vae_factors(self) -> tuple[int, int]:
        """``(temporal, spatial)`` compression of the VAE (:func:`vae_factors`), ``(1, 1)`` in pixel space."""
        return vae_factors(self.vae_config) if self.vae_config is not None else (1, 1)

    @property
    def has_text_encoder(self) -> bool:
        """Whether prompts can be encoded from the folder: ``tokenizer/`` + ``text_encoder/``, or
        ``"text_encoder": "minilm"`` in ``rehyat_pipeline.json``."""
        return ((self.path / "text_encoder").is_dir() and (self.path / "tokenizer").is_dir()) or (
            self.pipeline_config.get("text_encoder") == "minilm")

    def check_vae_channels(self) -> None:
        """:func:`check_vae_channels` of the folder's VAE and transformer (nothing without a VAE)."""
        if self.vae_config is not None:
            check_vae_channels(self.vae_config, self.transformer_config["in_channels"])

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """:func:`latent_shape` of a video for this model. Raises ``ValueError`` as :func:`latent_shape` does, or
        when its VAE's latents are not the transformer's input (:func:`check_vae_channels`)."""
        tcfg = self.transformer_config
        self.check_vae_channels()
        return latent_shape(*self.vae_factors, tcfg["patch_size"][1], tcfg["in_channels"], num_frames, height, width)

    def check_rope_table(self, shape) -> None:
        """:func:`check_rope_table` for this model and latents ``shape`` (no limit for a converted transformer)."""
        tcfg = self.transformer_config
        positions = None if tcfg["rehyat"] is not None else tcfg.get("rope_max_seq_len", WAN_ROPE_MAX_SEQ_LEN)
        check_rope_table(positions, tcfg["patch_size"], shape, *self.vae_factors)


def folder_vae_config(folder) -> dict | None:
    """A model folder's ``vae/config.json``, or ``None`` without that file (pixel space). Raises ``ValueError``
    naming the file for malformed JSON. ``folder``: a path or a :class:`ModelFolder`."""
    return ModelFolder.of(folder).vae_config


def folder_vae_factors(folder) -> tuple[int, int]:
    """:func:`vae_factors` of a model folder's ``vae/config.json``; ``(1, 1)`` without that file (pixel space).
    Raises ``ValueError`` naming the file for malformed JSON."""
    return ModelFolder.of(folder).vae_factors


def folder_latent_shape(folder, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """:func:`latent_shape` for a model folder, read from its JSON configs alone (no weights are loaded).
    Raises ``ValueError`` as :func:`latent_shape` does, or when its VAE's latents are not the transformer's input
    (:func:`check_vae_channels`)."""
    return ModelFolder.of(folder).latent_shape(num_frames, height, width)


def folder_check_rope_table(folder, shape) -> None:
    """:func:`check_rope_table` for a model folder and its latents ``shape``, from its JSON configs alone."""
    ModelFolder.of(folder).check_rope_table(shape)


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
    """``(tokenizer, text_encoder)`` of a model folder (a path or a :class:`ModelFolder`; ``tokenizer/`` +
    ``text_encoder/``, or MiniLM by name).

    Raises:
        ValueError: the folder has no text encoder (then pass a caption-embedding table instead).
    """
    mf = ModelFolder.of(folder)
    folder, cfg = mf.path, mf.pipeline_config
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
        text_dim = mf.transformer_config["text_dim"]
    except ValueError:
        text_dim = width
    if width is not None and width != text_dim:
        raise ValueError(f"{folder}'s text encoder gives {width}-dim embeddings, its transformer takes text_dim={text_dim}")
    return tokenizer, encoder



class PromptEncoder:
    """Prompts to text embeddings at a fixed length: the one text-encoding path of the pipeline
    (:meth:`rehyat.pipelines.ReHyAtVideoPipeline.encode_prompt`) and the training tools (:func:`load_prompt_encoder`).

    Args:
        tokenizer, text_encoder: a tokenizer and its encoder (e.g. :func:`load_text_encoder_from_folder`).
        max_sequence_length: tokens per prompt ``L``: longer prompts are truncated, shorter ones padded.
        batch_size: prompts per encoder call; ``None`` (default): all in one call.

    ``encoder(prompts)`` (a list of str, or one str) returns ``[n, L, text_dim]`` in the encoder's dtype on its
    device, padded positions zero (:func:`rehyat.text_encoder.encode_prompts`, which raises ``ValueError`` for no
    prompts or a non-str one).
    """

    def __init__(self, tokenizer, text_encoder, max_sequence_length: int = 512, batch_size: int | None = None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.max_sequence_length, self.batch_size = max_sequence_length, batch_size

    @classmethod
    def from_folder(cls, folder, *, device="cpu", batch_size: int | None = None) -> "PromptEncoder":
        """The text encoder of a model folder (a path or a :class:`ModelFolder`; loaded here, on ``device``, by
        :func:`load_text_encoder_from_folder`, whose ``ValueError`` it raises) at its ``max_sequence_length``
        (``rehyat_pipeline.json``, default 512)."""
        mf = ModelFolder.of(folder)
        tokenizer, encoder = load_text_encoder_from_folder(mf, device=device)
        return cls(tokenizer, encoder, mf.pipeline_config.get("max_sequence_length", 512), batch_size)

    def __call__(self, prompts):
        import torch

        from ..text_encoder import encode_prompts

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        step = self.batch_size or max(len(prompts), 1)
        return torch.cat([encode_prompts(self.tokenizer, self.text_encoder, prompts[i : i + step],
                                         max_length=self.max_sequence_length)[0]
                          for i in range(0, max(len(prompts), 1), step)])


def load_prompt_encoder(folder, *, device="cpu", batch_size: int = 64):
    """``encode(prompts) -> [n, L, text_dim]`` float32 on the CPU with a model folder's text encoder (loaded once,
    here, on ``device``): :meth:`PromptEncoder.from_folder`, ``L`` its ``max_sequence_length``
    (``rehyat_pipeline.json``, default 512), in batches of ``batch_size`` prompts; padded tokens are zero. For the
    tools that encode many prompts at once (a run's prompt pool, a caption table, a dataset); the pipeline encodes
    its prompts through the same :class:`PromptEncoder` (:meth:`ReHyAtVideoPipeline.encode_prompt`).

    Raises:
        ValueError: the folder has no text encoder, or its width is not the transformer's ``text_dim``.
    """
    encoder = PromptEncoder.from_folder(folder, device=device, batch_size=batch_size)
    return lambda prompts: encoder(prompts).float().cpu()


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
