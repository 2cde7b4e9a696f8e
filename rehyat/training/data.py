"""Training data: a folder of pre-encoded video latents and text embeddings, and the caption-embedding table.

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

Caption-embedding table (``--text-embeddings FILE.safetensors``, format in :mod:`rehyat.text_encoder`): it
replaces a text encoder on machines that lack its weights. :func:`encode_text_table` writes one; the class,
:class:`rehyat.text_encoder.TextEmbeddingTable`, is re-exported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..text_encoder import TextEmbeddingTable  # noqa: F401  (re-exported: its path before it moved down a floor)

__all__ = [
    "DATASET_CONFIG",
    "METADATA_FILE",
    "NULL_EMBEDS_FILE",
    "DatasetInfo",
    "LatentDataset",
    "DatasetWriter",
    "GlobalBatchSampler",
    "TextEmbeddingTable",
    "read_dataset_info",
    "read_metadata",
    "load_dataset",
    "check_dataset_fits_model",
    "encode_text_table",
    "prepare_dataset",
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


# ----------------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------------
class GlobalBatchSampler:
    """Global batches of sample indices, the same for any number of processes.

    Epoch ``e`` visits the samples in the order ``randperm(N)`` drawn from ``manual_seed(seed, e)``; a global batch
    takes the next ``batch_size`` entries, continuing into the next epoch when one runs out (so N < batch_size
    works). Each process then trains on its contiguous slice ``[rank*b, (rank+1)*b)`` of the global batch.

    State (``state_dict``): ``{"epoch", "position"}``, enough to continue exactly after a restart.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_samples, generator=g)

    def next_batch(self) -> torch.Tensor:
        """The next global batch, int64 ``[batch_size]`` (CPU)."""
        parts, need = [], self.batch_size
        while need:
            take = self._perm[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["batch_size"], state["seed"]) != (self.num_samples, self.batch_size, self.seed):
            raise ValueError("the checkpoint's data order was made with another dataset size, batch size or seed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------------------------
# Caption-embedding table (the class lives on the base floor, in rehyat.text_encoder, so that the pipeline can read
# a table without importing training; re-exported here because `rehyat.training.data.TextEmbeddingTable` was its
# public path)
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Building a dataset from videos
# ----------------------------------------------------------------------------------------------------------------
def _video_tensor(frames) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float32 ``[3, F, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def prepare_dataset(
    model,
    videos,
    out,
    *,
    text_embeddings=None,
    num_frames: int | None = None,
    batch_size: int = 4,
    device="cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetInfo:
    """Encode a videofolder (``metadata.jsonl`` with ``file_name`` + ``text``, videos beside it) into a dataset.

    Latents come from the model folder's VAE (``AutoencoderKLWan``: posterior mode, normalised with the VAE's
    ``latents_mean``/``latents_std`` as diffusers' Wan pipelines do); a model folder without ``vae/`` works in
    pixel space (latents = the video in [-1, 1], ``[3, F, H, W]``). Text embeddings come from the folder's text
    encoder, or are looked up in ``text_embeddings`` (a :class:`TextEmbeddingTable` file).

    Args:
        model: model folder (``transformer/config.json`` is read to check the sizes; weights are not loaded).
        videos: the videofolder.
        out: the dataset folder to write.
        text_embeddings: optional table file to use instead of a text encoder.
        num_frames: frames per video (default: every frame of the first video); videos are cut to it, and a
            shorter video is an error. With a VAE it must be 4k+1.
        batch_size: videos per VAE call.
        device: where the VAE and the text encoder run.

    Returns:
        The written :class:`DatasetInfo`.

    Raises:
        FileNotFoundError / FileExistsError / ValueError: a missing folder or video, an existing ``out`` (unless
            ``overwrite``), a bad ``batch_size`` / ``num_frames``, a caption missing from the table, a video of
            another size or too few frames, a frame count or size the model cannot take, a text encoder of the
            wrong width, or a file ffmpeg cannot decode (naming it); all before any encoding, except a video
            whose size ``metadata.jsonl`` does not state or that cannot be decoded (found when it is read; what
            the run wrote is then deleted, so ``out`` can be written by a retry).
    """
    model, videos = _check_prepare_args(model, videos, batch_size, num_frames)
    prepare_output_folder(out, overwrite=overwrite)
    source = _DatasetSource.open(model, videos, text_embeddings, num_frames, batch_size=batch_size, device=device)
    writer = DatasetWriter(out, source.info, overwrite=overwrite)
    try:
        source.write(writer, batch_size=batch_size, device=device, progress=progress)
        return writer.close()
    except BaseException:
        writer.abort()  # no half-written dataset left to block the retry
        raise


def _check_prepare_args(model, videos, batch_size, num_frames) -> tuple[Path, Path]:
    """``(model, videos)`` as paths, after checking that both folders exist and ``batch_size`` / ``num_frames``
    are ints >= 1 (``num_frames`` may be ``None``); errors name the CLI argument."""
    model, videos = Path(model), Path(videos)
    if not model.is_dir():
        raise FileNotFoundError(f"--model folder {model} does not exist")
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos folder {videos} does not exist")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"--batch-size must be an int >= 1 (videos per VAE call), got {batch_size!r}")
    if num_frames is not None and (not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1):
        raise ValueError(f"--frames must be an int >= 1, got {num_frames!r}")
    return model, videos


@dataclass
class _DatasetSource:
    """What :func:`prepare_dataset` encodes, checked: the videofolder's ``rows``, the first video's frames
    (``first``, read once for its size), the clip size ``(F, H, W)``, the dataset's :class:`DatasetInfo`, the
    caption embedder (``embed(captions) -> [n, L, text_dim]``: the table's lookup or the folder's text encoder), the
    video encoder (the VAE, or the identity in pixel space) and the negative prompt (whose embedding is the
    dataset's null embedding when it can be had)."""

    videos: Path
    rows: list[dict]
    first: object
    size: tuple[int, int, int]
    info: DatasetInfo
    embed: Callable
    encode_video: Callable
    negative: str | None

    @classmethod
    def open(cls, model: Path, videos: Path, text_embeddings, num_frames, *, batch_size: int, device):
        """Every check before encoding (configs, videos, captions, geometry, text encoder), then the encoders."""
        from ..pipelines.folders import ModelFolder, load_prompt_encoder

        model = ModelFolder(model)  # each config read once, here, for every check and setting below
        tcfg, pcfg = model.transformer_config, model.pipeline_config
        rows, table = _check_videos_and_captions(videos, text_embeddings, tcfg)
        first = _read_video(videos / rows[0]["file_name"])
        size = (num_frames if num_frames is not None else first.shape[0], *first.shape[1:3])
        factors = _check_geometry(model, tcfg, rows, *size)
        if table is None:  # one encoder call per batch of videos; ValueError without a text encoder
            embed = load_prompt_encoder(model, device=device, batch_size=batch_size)
        else:
            embed = table.lookup
        info = _dataset_info(model, rows, table, size, factors)
        encode_video = _video_encoder(model.path, device) if info.latent_space == "vae" else (lambda x: x)
        neg = pcfg.get("negative_prompt", "")
        return cls(videos, rows, first, size, info, embed, encode_video,
                   neg if table is None or neg in table else None)

    def write(self, writer: DatasetWriter, *, batch_size: int, device, progress: bool) -> None:
        """The null embedding (when there is one) and every sample, into ``writer``."""
        if self.negative is not None:
            writer.set_null_embeds(self.embed([self.negative])[0])
        first, rows = self.first, self.rows
        read = lambda r: first if r is rows[0] else _read_video(self.videos / r["file_name"])  # noqa: E731
        _write_samples(writer, rows, read, self.encode_video, self.embed, self.size, batch_size=batch_size,
                       device=device, progress=progress)


def _dataset_info(model, rows: list[dict], table, size, factors) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``rows`` encoded at ``size = (F, H, W)`` by a model folder (a
    :class:`~rehyat.pipelines.folders.ModelFolder`) whose VAE has ``factors = (temporal, spatial, channels)``
    (:func:`_check_geometry`), with captions from ``table`` or else the folder's text encoder."""
    (F, H, W), (tf, sf, C) = size, factors
    tcfg, pcfg = model.transformer_config, model.pipeline_config
    return DatasetInfo(
        latent_channels=C, latent_frames=(F - 1) // tf + 1, latent_height=H // sf, latent_width=W // sf,
        text_dim=tcfg["text_dim"],
        max_sequence_length=table.embeds.shape[1] if table is not None else pcfg.get("max_sequence_length", 512),
        latent_space="vae" if (model / "vae").is_dir() else "pixel",
        num_frames=F, height=H, width=W, num_samples=len(rows), fps=rows[0].get("fps", pcfg.get("fps")),
        text_encoder=(table.text_encoder if table is not None else _text_encoder_name(model)),
        source_model=str(model.path.resolve()),
    )


def _check_videos_and_captions(videos: Path, text_embeddings, tcfg: dict):
    """``(metadata rows, caption table or None)`` of a videofolder: it lists videos, they exist, and the caption
    table (if any) holds every caption at the model's ``text_dim``."""
    rows = read_metadata(videos)
    if not rows:
        raise ValueError(f"{videos / METADATA_FILE} lists no videos")
    missing = [r["file_name"] for r in rows if not (videos / r["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{videos} lacks {len(missing)} listed videos, e.g. {missing[:3]}")
    table = TextEmbeddingTable.load(text_embeddings) if text_embeddings is not None else None
    if table is not None:
        absent = table.missing(r["text"] for r in rows)
        if absent:
            raise ValueError(f"{len(absent)} captions are not in {text_embeddings}, e.g. {absent[:3]}")
        if table.text_dim != tcfg["text_dim"]:
            raise ValueError(f"{text_embeddings} holds {table.text_dim}-dim embeddings, the model takes text_dim={tcfg['text_dim']}")
    return rows, table


def _check_geometry(model, tcfg: dict, rows: list[dict], F: int, H: int, W: int) -> tuple[int, int, int]:
    """``(temporal factor, spatial factor, latent channels)`` of the model's VAE (``(1, 1, 3)`` in pixel space),
    after checking that ``F x H x W`` videos fit it and the model, and that every row's stated size fits.
    ``model``: a :class:`~rehyat.pipelines.folders.ModelFolder`."""
    has_vae = (model / "vae").is_dir()
    p_h = tcfg["patch_size"][1]
    if has_vae:
        vcfg = model.vae_config
        if vcfg is None:
            raise FileNotFoundError(f"{model / 'vae'} has no config.json")
        tf, sf = model.vae_factors
        if (F - 1) % tf != 0:
            raise ValueError(f"the model's VAE needs {tf}k+1 frames, got {F}; pass --frames")
        C = vcfg.get("z_dim", 16)
    else:
        tf, sf, C = 1, 1, 3
    for name, v in (("height", H), ("width", W)):
        if v % (sf * p_h) != 0:
            raise ValueError(f"video {name} {v} is not a multiple of {sf * p_h} (VAE stride x patch) for this model")
    if C != tcfg["in_channels"]:
        raise ValueError(f"the model takes in_channels={tcfg['in_channels']} but its {'VAE' if has_vae else 'pixel space'} gives {C}")
    for r in rows:  # sizes the videofolder's metadata states (rehyat.world writes them): checked before encoding
        if r.get("num_frames", F) < F or (r.get("height", H), r.get("width", W)) != (H, W):
            raise ValueError(f"{r['file_name']} is {r.get('width')}x{r.get('height')} with {r.get('num_frames')} frames; "
                             f"every video must be {W}x{H} with at least {F} frames")
    return tf, sf, C


def _video_encoder(model: Path, device):
    """``encode(videos [B, 3, F, H, W]) -> normalised latents [B, C, f, h, w]`` with the folder's VAE (float32,
    on ``device``; the latents normalised by its ``latents_mean`` / ``latents_std``). ValueError for a VAE that
    cannot be loaded."""
    from ..pipelines.folders import load_vae

    vae = load_vae(model, device)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(device)
    return lambda x: (vae.encode(x).latent_dist.mode() - mean) / std


def _write_samples(writer, rows: list[dict], read, encode_video, embed, size, *, batch_size: int, device,
                   progress: bool) -> None:
    """Encode the videos ``rows`` name (``read(row)``: frames ``[F', H, W, 3]``; the first ``F`` of them, each
    checked against ``size = (F, H, W)``) and their captions (``embed``) in batches into ``writer``."""
    from tqdm.auto import tqdm

    F, H, W = size
    bar = tqdm(total=len(rows), desc="prepare-data", disable=not progress)
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        clips = []
        for r in batch:
            frames = read(r)
            if frames.shape[0] < F:
                raise ValueError(f"{r['file_name']} has {frames.shape[0]} frames, fewer than {F}")
            if frames.shape[1:3] != (H, W):
                raise ValueError(f"{r['file_name']} is {frames.shape[2]}x{frames.shape[1]}, the first video is {W}x{H}")
            clips.append(_video_tensor(frames[:F]))
        x = encode_video(torch.stack(clips).to(device))
        emb = embed([r["text"] for r in batch])
        for j, r in enumerate(batch):
            writer.add(x[j], emb[j], r["text"])
        bar.update(len(batch))
    bar.close()


def _read_video(path: Path):
    """:func:`rehyat.world.read_video`, raising ValueError naming the file when ffmpeg cannot decode it."""
    from ..io import first_line
    from ..world import read_video

    try:
        return read_video(path)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as e:  # imageio: "Could not load meta information", "can not handle the given uri"
        raise ValueError(f"cannot read the video {path}: not a video file ffmpeg can decode ({first_line(e)})") from None
