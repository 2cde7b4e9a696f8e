"""Plumbing shared by the training runs: run folders, resume checks, geometry, block lists, precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

__all__ = [
    "TRAIN_DIR",
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "prepare_run_folder",
    "check_resume_config",
    "check_resume_steps",
    "latent_shape_for",
    "parse_blocks",
    "block_overlap_settings",
    "resolve_dtype",
    "feature_map_parameters",
]

TRAIN_DIR = "train"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
CONFIG_NAME = "run_config.json"
# what a run writes into its --out folder (removed by --overwrite; anything else there is left alone)
RUN_OUTPUTS = ("train", "transformer", "distill_report.json", "distill_report.md", "selection.json", "selection.md",
               "finetune_report.json", ".transformer.partial")


def prepare_run_folder(out, *, overwrite: bool, resume: bool) -> Path:
    """Check a run's ``--out`` folder before any compute; returns it (not yet created).

    * ``resume``: the folder must hold ``train/checkpoint.pt`` (FileNotFoundError otherwise);
    * otherwise a non-empty folder is refused (FileExistsError) unless ``overwrite``, which deletes the run's own
      outputs there (``train/``, ``transformer/``, reports) before the run starts;
    * the parent folder must exist (FileNotFoundError).
    """
    out = Path(out)
    if resume:
        if not (out / TRAIN_DIR / CHECKPOINT_NAME).is_file():
            raise FileNotFoundError(f"--resume: {out / TRAIN_DIR / CHECKPOINT_NAME} does not exist")
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out: {out} exists and is not empty; pass --overwrite to replace it "
                                  "(or --resume to continue its run)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: parent folder {out.parent} does not exist")
    return out


def clear_run_outputs(out: Path) -> None:
    """Delete what a previous run wrote into ``out`` (for ``--overwrite``)."""
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def run_config(settings: dict) -> dict:
    """A JSON-safe copy of a run's settings."""
    return json.loads(json.dumps(_jsonable(settings)))


def check_resume_config(saved: dict, now: dict, *, may_differ=("steps", "checkpoint_every", "log_every")) -> None:
    """Raise ValueError naming the settings that differ between a checkpoint's run and this one."""
    keys = (set(saved) | set(now)) - set(may_differ)
    diff = sorted(k for k in keys if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise ValueError(f"--resume with other settings than the checkpoint's run ({detail}); "
                         "start a new run or pass the same settings")


def check_resume_steps(done: int, steps: int, checkpoint) -> None:
    """``--resume`` with ``steps`` below the ``done`` steps of the checkpoint at ``checkpoint``: the outputs would
    hold ``done`` steps' weights under a report of ``steps``. Raises ValueError naming both numbers."""
    if steps < done:
        raise ValueError(f"--resume: {checkpoint} has {done} steps done, more than --steps {steps}; pass --steps "
                         f"{done} or more (the total, not the steps to add)")


def latent_shape_for(model, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the latents of a ``frames x height x width`` video for a model folder (a path or a
    :class:`~rehyat.pipelines.folders.ModelFolder`; reads configs only, through it).

    Raises:
        ValueError: a frame count the VAE cannot take (``4k+1`` for Wan's) or a size that is not a multiple of VAE
            stride x patch size.
    """
    from ..pipelines.folders import ModelFolder

    model = ModelFolder.of(model)
    tcfg = model.transformer_config
    tf, sf = model.vae_factors
    mult = sf * tcfg["patch_size"][1]
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % tf != 0:
        raise ValueError(f"--frames must be {tf}k+1 for this model's VAE, got {frames!r}")
    for name, val in (("--height", height), ("--width", width)):
        if not isinstance(val, int) or val < mult or val % mult != 0:
            raise ValueError(f"{name} must be a positive multiple of {mult} for this model, got {val!r}")
    return (tcfg["in_channels"], (frames - 1) // tf + 1, height // sf, width // sf)


def parse_blocks(spec, num_blocks: int, *, allow=("all", "list", "best")):
    """Parse a block choice: ``"all"``, a list / ``"0,3,5"``, ``"best:N"`` or ``"auto"``.

    Returns ``("all", list)``, ``("list", list)``, ``("best", N)`` or ``("auto", None)``.

    Raises:
        ValueError: a malformed spec, a kind not in ``allow``, an index outside ``0..num_blocks-1``, or N outside
            ``1..num_blocks``.
    """
    if isinstance(spec, (list, tuple)):
        kind, val = "list", [int(b) for b in spec]
    else:
        s = str(spec).strip()
        if s == "all":
            kind, val = "all", list(range(num_blocks))
        elif s == "auto":
            kind, val = "auto", None
        elif s.startswith("best:"):
            try:
                val = int(s[5:])
            except ValueError:
                raise ValueError(f"--blocks best:N needs an integer N, got {s!r}") from None
            kind = "best"
            if not 1 <= val <= num_blocks:
                raise ValueError(f"--blocks best:{val}: N must be in 1..{num_blocks} (the model has {num_blocks} blocks)")
        else:
            try:
                val = [int(b) for b in s.split(",") if b.strip()]
            except ValueError:
                raise ValueError(f"--blocks must be 'all', 'best:N', 'auto' or a list like '0,2,5', got {s!r}") from None
            kind = "list"
    if kind not in allow:
        raise ValueError(f"--blocks {spec!r} is not allowed here (use one of: {', '.join(allow)})")
    if kind == "list":
        if not val:
            raise ValueError("--blocks lists no block")
        bad = [b for b in val if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"--blocks {bad} out of range: the model has {num_blocks} blocks (0..{num_blocks - 1})")
        val = sorted(set(val))
    return kind, val


def block_overlap_settings(given, kind: str, blocks, num_blocks: int, softmax_blocks: str,
                           spec="all") -> dict | None:
    """``--block-overlap-frames`` (``{block: overlap_frames}``, or ``None``) checked against a block choice of
    :func:`parse_blocks` (``kind``, ``blocks``; ``spec``: ``--blocks`` as given, for the messages), as
    :func:`rehyat.convert_wan`'s ``block_settings`` (``{block: {"overlap_frames": n}}``; ``None`` for ``None``).

    A block must be converted (in ``blocks``), or, with ``softmax_blocks="chunk_causal"``, any block of the model
    (an unconverted one gets a bounded softmax window); each value an int >= 0.

    Raises:
        ValueError: a block choice other than ``"all"`` or a list (the blocks must be named up front), an empty or
            non-dict ``given``, a block that may not be named, a bad value; naming ``--block-overlap-frames``.
    """
    if given is None:
        return None
    if kind not in ("all", "list"):
        raise ValueError(f"--block-overlap-frames needs the converted blocks named up front, not --blocks {spec}: "
                         "pass --blocks all or a list, e.g. the blocks a best:N run chose")
    if not isinstance(given, dict) or not given:
        raise ValueError(f"--block-overlap-frames must be a non-empty {{block: overlap_frames}} dict, got {given!r}")
    windowed = softmax_blocks == "chunk_causal"  # unconverted blocks may then get a bounded window
    allowed = range(num_blocks) if windowed else blocks
    for b, v in given.items():
        if isinstance(b, bool) or b not in allowed:
            if windowed:
                raise ValueError(f"--block-overlap-frames names block {b!r}: it must be one of the teacher's blocks "
                                 f"0..{num_blocks - 1}")
            raise ValueError(f"--block-overlap-frames names block {b!r}, which is not converted: it must be one of "
                             f"--blocks {sorted(blocks)} (or, with --softmax-blocks chunk_causal, any block, to bound "
                             "its softmax window)")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"--block-overlap-frames: block {b} needs an int >= 0 of overlap frames, got {v!r}")
    return {int(b): {"overlap_frames": v} for b, v in sorted(given.items())}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None`` -> bfloat16 on CUDA, float32 elsewhere; else ``"bf16"``/``"bfloat16"``/``"fp32"``/``"float32"``."""
    name = "auto" if name is None else str(name)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {name!r}")
    return table[name]


def feature_map_parameters(transformer) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of what conversion added to every converted block: its processor's feature maps
    (``...attn1.processor.feature_map_{q,k}.*``) and linear scale (``...attn1.processor.linear_log_scale``)."""
    return [(n, p) for n, p in transformer.named_parameters() if ".attn1.processor." in n]


def default_geometry(model, frames, height, width) -> tuple[int, int, int]:
    """Frames/height/width: the given ones, else the folder's ``rehyat_pipeline.json`` ``defaults``, else Wan's
    (81, 480, 832). ``model``: a path or a :class:`~rehyat.pipelines.folders.ModelFolder`."""
    from ..pipelines.folders import ModelFolder

    d = ModelFolder.of(model).generation_defaults
    return (frames or d["frames"], height or d["height"], width or d["width"])


def cast_frozen_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a frozen model's floating parameters and buffers to ``dtype``, except the modules diffusers keeps in
    float32 (``model._keep_in_fp32_modules``: Wan's time embedder, norms, modulation tables), as
    ``from_pretrained(torch_dtype=...)`` does. A no-op for float32."""
    if dtype == torch.float32:
        return model
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not any(k in name.split(".") for k in keep):
                t.data = t.data.to(dtype)
    return model


def set_deterministic() -> None:
    """Ask PyTorch for deterministic kernels (cuBLAS workspace, cuDNN, ``use_deterministic_algorithms`` in warn-only
    mode), so that a resumed GPU run repeats an uninterrupted one as closely as the kernels allow. Slower."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
