"""The latent dataset format: a folder of pre-encoded video latents and text embeddings, its reader and writer.

Dataset folder (format ``"rehyat-latents"``, version 1)::

    DATASET/
      dataset.json              # what every sample holds (below)
      metadata.jsonl            # one line per sample: {"file_name": "000000.safetensors", "text": "<caption>"}
      000000.safetensors        # tensors "latents" [C, F, H, W] and "prompt_embeds" [L, text_dim]
      000001.safetensors
      ...
      null_embeds.safetensors   # optional: tensor "prompt_embeds" [L, text_dim], the negative ("") prompt

``dataset.json`` keys:

* ``format`` = ``"rehyat-latents"``, ``version`` = 1;
* ``latent_channels`` (C), ``latent_frames`` (F), ``latent_height`` (H), ``latent_width`` (W): the latents' shape;
* ``text_dim`` (D) and ``max_sequence_length`` (L): the text embeddings' shape;
* ``latent_space``: ``"vae"`` (latents of the model's ``AutoencoderKLWan``, normalised as diffusers' Wan pipelines
  do: ``(mode - latents_mean) / latents_std``) or ``"pixel"`` (the video itself, ``[3, F, H, W]`` in [-1, 1]);
* ``num_frames``, ``height``, ``width``: the source videos' frames and pixels (equal to the latent sizes in pixel
  space);
* ``num_samples``: lines in ``metadata.jsonl``;
* optional: ``fps``, ``text_encoder`` (e.g. ``"minilm"``), ``source_model`` (the model folder whose VAE and text
  encoder made the data), ``null_embeds`` (file name of the negative-prompt embedding), ``latents_dtype``.

All samples share one shape; every tensor is float32 unless ``latents_dtype`` says otherwise. Text embeddings are
zero past the prompt's tokens, as diffusers' ``WanPipeline`` makes them. :func:`load_dataset` reads everything
into memory (stacked ``[N, ...]`` tensors, optionally moved to the GPU) so the training loop gathers a batch with
one indexing op; a dataset larger than ``max_memory_bytes`` is read lazily, a batch at a time.

Its builder from a videofolder is :func:`rehyat.training.prepare.prepare_dataset`; the data order of training is
:class:`rehyat.training.sampler.GlobalBatchSampler`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = [
    "DATASET_CONFIG",
    "METADATA_FILE",
    "NULL_EMBEDS_FILE",
    "DatasetInfo",
    "LatentDataset",
    "DatasetWriter",
    "read_dataset_info",
    "read_metadata",
    "load_dataset",
    "check_dataset_fits_model",
    "prepare_output_folder",
]

DATASET_CONFIG = "dataset.json"
METADATA_FILE = "metadata.jsonl"
NULL_EMBEDS_FILE = "null_embeds.safetensors"
FORMAT = "rehyat-latents"
LATENT_SPACES = ("vae", "pixel")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# dataset.json
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    """The contents of ``dataset.json`` (see the module docstring)."""

    latent_channels: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_dim: int
    max_sequence_length: int
    latent_space: str
    num_frames: int
    height: int
    width: int
    num_samples: int
    fps: float | None = None
    text_encoder: str | None = None
    source_model: str | None = None
    null_embeds: str | None = None
    latents_dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, H, W)`` of one sample's latents."""
        return (self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {"format": FORMAT, "version": 1, **d, **extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = DATASET_CONFIG) -> "DatasetInfo":
        d = dict(d)
        if d.pop("format", FORMAT) != FORMAT:
            raise ValueError(f"{where}: format must be {FORMAT!r}")
        d.pop("version", None)
        required = ["latent_channels", "latent_frames", "latent_height", "latent_width", "text_dim",
                    "max_sequence_length", "latent_space", "num_samples"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{where} lacks the keys {missing}")
        for k in required + ["num_frames", "height", "width"]:
            if k != "latent_space" and k in d and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1):
                raise ValueError(f"{where}: {k} must be a positive int, got {d[k]!r}")
        if d["latent_space"] not in LATENT_SPACES:
            raise ValueError(f"{where}: latent_space must be one of {LATENT_SPACES}, got {d['latent_space']!r}")
        d.setdefault("num_frames", d["latent_frames"])
        d.setdefault("height", d["latent_height"])
        d.setdefault("width", d["latent_width"])
        if d.get("latents_dtype", "float32") not in _DTYPES:
            raise ValueError(f"{where}: latents_dtype must be one of {sorted(_DTYPES)}")
        known = set(cls.__dataclass_fields__) - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        return cls(**d, extra=extra)


def read_dataset_info(folder) -> DatasetInfo:
    """Read and check ``folder/dataset.json``.

    Raises:
        FileNotFoundError: the folder, or its ``dataset.json``, does not exist.
        ValueError: ``dataset.json`` is not valid JSON or lacks a required key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    path = folder / DATASET_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a rehyat dataset: no {DATASET_CONFIG} (build one with `rehyat prepare-data`)"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return DatasetInfo.from_dict(d, str(path))


def read_metadata(folder) -> list[dict]:
    """``metadata.jsonl`` of a dataset (or a videofolder) as a list of dicts with at least ``file_name`` and ``text``.

    Raises:
        FileNotFoundError: no ``metadata.jsonl``. ValueError: a line is not JSON or lacks ``file_name``/``text``.
    """
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(folder)} has no {METADATA_FILE}")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path} line {i} must be an object with string 'file_name' and 'text'")
        rows.append(row)
    return rows


def check_dataset_fits_model(info: DatasetInfo, model_config: dict, *, what: str = "the model") -> None:
    """Check that a dataset's latents and text embeddings fit a ``WanTransformer3DModel`` config (a dict).

    Raises:
        ValueError: latent channels != ``in_channels`` (or ``out_channels``), ``text_dim`` differs, or a latent
            frame count / height / width not divisible by the patch size.
    """
    C, F, H, W = info.latent_shape
    if C != model_config["in_channels"]:
        raise ValueError(
            f"dataset latents have {C} channels but {what} takes in_channels={model_config['in_channels']}"
            f" (latent_space {info.latent_space!r})"
        )
    out_ch = model_config.get("out_channels") or model_config["in_channels"]
    if out_ch != C:
        raise ValueError(f"{what} predicts out_channels={out_ch}, but the dataset latents have {C} channels")
    if info.text_dim != model_config["text_dim"]:
        raise ValueError(f"dataset text embeddings have dim {info.text_dim} but {what} takes text_dim={model_config['text_dim']}")
    p_t, p_h, p_w = model_config["patch_size"]
    for name, size, p in (("frames", F, p_t), ("height", H, p_h), ("width", W, p_w)):
        if size % p != 0:
            raise ValueError(f"dataset latent {name} {size} is not divisible by {what}'s patch size {p}")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
class LatentDataset:
    """Samples of a dataset folder: ``latents [N, C, F, H, W]`` and ``prompt_embeds [N, L, D]``.

    In memory (the default when it fits), both are single stacked tensors and :meth:`batch` is one index op on
    their device; otherwise (``in_memory=False``) :meth:`batch` reads the files of the requested samples.

    Attributes:
        folder, info (:class:`DatasetInfo`), captions (list of N str), null_embeds (``[L, D]`` or ``None``),
        latents / prompt_embeds (stacked tensors, in-memory mode only).
    """

    def __init__(self, folder: Path, info: DatasetInfo, rows: list[dict], latents=None, prompt_embeds=None,
                 null_embeds=None) -> None:
        self.folder, self.info, self.rows = folder, info, rows
        self.captions = [r["text"] for r in rows]
        self.latents, self.prompt_embeds, self.null_embeds = latents, prompt_embeds, null_embeds

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def in_memory(self) -> bool:
        return self.latents is not None

    @property
    def nbytes(self) -> int:
        """Bytes of all samples (latents and embeddings, as stored)."""
        C, F, H, W = self.info.latent_shape
        per = C * F * H * W * _DTYPES[self.info.latents_dtype].itemsize + self.info.max_sequence_length * self.info.text_dim * 4
        return per * len(self)

    def to(self, device) -> "LatentDataset":
        """Move the in-memory tensors to ``device`` (no-op for a lazy dataset). Returns self."""
        if self.in_memory:
            self.latents = self.latents.to(device)
            self.prompt_embeds = self.prompt_embeds.to(device)
        if self.null_embeds is not None:
            self.null_embeds = self.null_embeds.to(device)
        return self

    def batch(self, indices: torch.Tensor, device=None, dtype: torch.dtype = torch.float32):
        """``(latents [b, C, F, H, W], prompt_embeds [b, L, D])`` of samples ``indices`` (int64 ``[b]``), on ``device``."""
        if self.in_memory:
            idx = indices
            if self.latents.device.type == "cuda" and indices.device.type == "cpu":
                idx = indices.pin_memory().to(self.latents.device, non_blocking=True)  # no wait for the GPU
            idx = idx.to(self.latents.device)
            lat, emb = self.latents[idx], self.prompt_embeds[idx]
        else:
            from safetensors.torch import load_file

            tensors = [load_file(self.folder / self.rows[int(i)]["file_name"]) for i in indices.tolist()]
            lat = torch.stack([t["latents"] for t in tensors])
            emb = torch.stack([t["prompt_embeds"] for t in tensors])
        if device is not None and lat.device != torch.device(device):
            if lat.device.type == "cpu" and torch.device(device).type == "cuda":
                lat, emb = lat.pin_memory(), emb.pin_memory()
            lat, emb = lat.to(device, non_blocking=True), emb.to(device, non_blocking=True)
        return lat.to(dtype), emb.to(dtype)


def _check_sample(path: Path, t: dict, info: DatasetInfo) -> None:
    want = {"latents": info.latent_shape, "prompt_embeds": (info.max_sequence_length, info.text_dim)}
    for key, shape in want.items():
        if key not in t:
            raise ValueError(f"{path} lacks the tensor {key!r}")
        if tuple(t[key].shape) != tuple(shape):
            raise ValueError(f"{path}: {key} has shape {tuple(t[key].shape)}, {DATASET_CONFIG} says {tuple(shape)}")


def load_dataset(folder, *, device=None, max_memory_bytes: int | None = None, check_files: bool = True) -> LatentDataset:
    """Open a dataset folder (see the module docstring).

    Args:
        folder: the dataset folder.
        device: move the in-memory tensors there (default: keep them on the CPU).
        max_memory_bytes: read everything into memory when the samples take at most this many bytes (default:
            half the machine's RAM); otherwise the dataset is lazy.
        check_files: check that every listed file exists before reading any (cheap).

    Raises:
        FileNotFoundError: no folder, no ``dataset.json``/``metadata.jsonl``, or a listed file is missing.
        ValueError: a malformed ``dataset.json``, a sample count or tensor shape that disagrees with it, or an
            empty dataset.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_dataset_info(folder)
    rows = read_metadata(folder)
    if not rows:
        raise ValueError(f"dataset {folder} has no samples")
    if len(rows) != info.num_samples:
        raise ValueError(f"{folder / METADATA_FILE} lists {len(rows)} samples, {DATASET_CONFIG} says {info.num_samples}")
    if check_files:
        missing = [r["file_name"] for r in rows if not (folder / r["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"dataset {folder} lacks {len(missing)} sample files, e.g. {missing[:3]}")
    null = None
    if info.null_embeds:
        null = load_file(folder / info.null_embeds)["prompt_embeds"].float()
    ds = LatentDataset(folder, info, rows, null_embeds=null)
    if max_memory_bytes is None:
        try:
            max_memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError, AttributeError):
            max_memory_bytes = 8 << 30
    if ds.nbytes <= max_memory_bytes:
        C, F, H, W = info.latent_shape
        lat = torch.empty(len(rows), C, F, H, W, dtype=_DTYPES[info.latents_dtype])
        emb = torch.empty(len(rows), info.max_sequence_length, info.text_dim, dtype=torch.float32)
        for i, r in enumerate(rows):
            t = load_file(folder / r["file_name"])
            _check_sample(folder / r["file_name"], t, info)
            lat[i] = t["latents"]
            emb[i] = t["prompt_embeds"]
        ds.latents, ds.prompt_embeds = lat, emb
    else:
        _check_sample(folder / rows[0]["file_name"], load_file(folder / rows[0]["file_name"]), info)
    return ds.to(device) if device is not None else ds


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def prepare_output_folder(out, *, overwrite: bool, arg: str = "--out") -> Path:
    """Check an output folder before any work: refuse a non-empty one unless ``overwrite`` (FileExistsError), and a
    missing parent (FileNotFoundError). Does not create it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{arg}: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{arg}: {out} exists and is not empty; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{arg}: parent folder {out.parent} does not exist")
    return out


class DatasetWriter:
    """Write a dataset folder sample by sample; ``dataset.json`` is written last by :meth:`close`, so a folder
    without it is an unfinished dataset.

    Args:
        folder: output folder (created; must be empty unless ``overwrite``).
        info: the :class:`DatasetInfo` (``num_samples`` is set by :meth:`close`).
        overwrite: allow a non-empty folder (its old ``dataset.json`` and ``metadata.jsonl`` are removed first).

    ``add(latents [C, F, H, W], prompt_embeds [L, D], caption)`` checks the shapes against ``info``; :meth:`abort`
    deletes what the writer wrote (and the folder when it created it), so a failed run can be retried.
    """

    def __init__(self, folder, info: DatasetInfo, *, overwrite: bool = False) -> None:
        self.folder = prepare_output_folder(folder, overwrite=overwrite)
        self.created = not self.folder.exists()
        self.written: list[str] = []
        self.folder.mkdir(exist_ok=True)
        for name in (DATASET_CONFIG, METADATA_FILE):
            (self.folder / name).unlink(missing_ok=True)
        self.info = info
        self.rows: list[dict] = []

    def add(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, caption: str) -> str:
        from safetensors.torch import save_file

        name = f"{len(self.rows):06d}.safetensors"
        t = {"latents": latents.detach().to("cpu", _DTYPES[self.info.latents_dtype]).contiguous(),
             "prompt_embeds": prompt_embeds.detach().to("cpu", torch.float32).contiguous()}
        _check_sample(self.folder / name, t, self.info)
        self.written.append(name)
        save_file(t, self.folder / name, metadata={"text": caption})
        self.rows.append({"file_name": name, "text": caption})
        return name

    def set_null_embeds(self, prompt_embeds: torch.Tensor) -> None:
        """Store the negative-prompt embedding ``[L, D]`` (used for caption dropout and guidance)."""
        from safetensors.torch import save_file

        self.written.append(NULL_EMBEDS_FILE)
        save_file({"prompt_embeds": prompt_embeds.detach().to("cpu", torch.float32).contiguous()},
                  self.folder / NULL_EMBEDS_FILE)
        self.info.null_embeds = NULL_EMBEDS_FILE

    def close(self) -> DatasetInfo:
        if not self.rows:
            raise ValueError("no samples were written")
        with open(self.folder / METADATA_FILE, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        self.info.num_samples = len(self.rows)
        tmp = self.folder / (DATASET_CONFIG + ".tmp")
        tmp.write_text(json.dumps(self.info.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.folder / DATASET_CONFIG)
        return self.info

    def abort(self) -> None:
        """Delete the files this writer wrote, and the folder if it created it (and it is empty then)."""
        for name in self.written + [METADATA_FILE, DATASET_CONFIG + ".tmp"]:
            (self.folder / name).unlink(missing_ok=True)
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
