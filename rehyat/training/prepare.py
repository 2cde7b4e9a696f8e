"""``rehyat prepare-data``: encode a videofolder (videos + ``metadata.jsonl``) into a latent dataset
(:mod:`rehyat.training.dataset`) with a model folder's VAE (or in pixel space) and text encoder (or a
caption-embedding table)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..text_encoder import TextEmbeddingTable
from .dataset import METADATA_FILE, DatasetInfo, DatasetWriter, prepare_output_folder, read_metadata
from .text_tables import _text_encoder_name
from .videos import read_video_file, video_tensor

__all__ = ["prepare_dataset"]


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
        first = read_video_file(videos / rows[0]["file_name"])
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
        read = lambda r: first if r is rows[0] else read_video_file(self.videos / r["file_name"])  # noqa: E731
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
            clips.append(video_tensor(frames[:F]))
        x = encode_video(torch.stack(clips).to(device))
        emb = embed([r["text"] for r in batch])
        for j, r in enumerate(batch):
            writer.add(x[j], emb[j], r["text"])
        bar.update(len(batch))
    bar.close()
