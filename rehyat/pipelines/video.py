"""Text-to-video generation with a (converted) Wan transformer, in parallel, recurrent or streaming mode.

Built on diffusers' components: the scheduler (Wan's default ``UniPCMultistepScheduler`` with flow sigmas), the
causal ``AutoencoderKLWan`` and a transformers text encoder, all read from a model folder. Three modes give the same
video for a fully causal model (design section 5):

* ``parallel``: every denoising step runs the transformer on all latent frames at once (the teacher's way);
* ``recurrent``: every step runs the transformer chunk by chunk (:func:`rehyat.models.recurrent_forward`), so
  attention memory is constant in the video length;
* ``streaming``: chunk c is fully denoised (all steps) before chunk c+1; the transformer state after each chunk is
  kept per step, and frames are decoded with the causal VAE and handed out as soon as their chunk is done.

In recurrent and streaming modes the prompt can change between chunks (``prompt_schedule``,
:mod:`rehyat.pipelines.schedule`), and streaming mode can continue a given video (``init_latents`` /
``init_video``: its whole chunks are kept and run through the model as context, :meth:`ReHyAtVideoPipeline.
_streaming`).

Initial noise is drawn per latent frame from a generator seeded by ``(seed, frame)``, so the three modes (and any
video length) see the same noise for the same frames.

Non-finite output is refused in every mode: the latents are checked after every denoising step and the decoded
frames before they become uint8 (:func:`check_finite`); NaN or Inf raises :class:`NonFiniteOutputError` naming the
first bad video frame and latent frame, before that frame is decoded, handed to ``on_frames`` or returned (a NaN
frame would otherwise be written as black, an Inf one as black or white).

Model folder layout (``from_pretrained``): ``transformer/`` (required; a plain Wan or a ReHyAt checkpoint),
``scheduler/`` (optional, default as above), ``vae/`` (optional; without it latents are pixels in [-1, 1]),
``tokenizer/`` + ``text_encoder/`` (optional), and ``rehyat_pipeline.json`` (optional: ``{"text_encoder":
"minilm", "max_sequence_length": 32, "fps": 8, "negative_prompt": ""}``). A diffusers Wan2.1 folder
(``Wan2.1-T2V-1.3B-Diffusers``) loads as it is, and so does a Wan2.2 TI2V one (``Wan2.2-TI2V-5B-Diffusers``: 48
latent channels, 16x spatial compression) for text-to-video: its transformer takes one timestep per token
(``expand_timesteps``), all equal without an image, which is the one timestep per video given here. Its
image-to-video mode (the first latent frame replaced by an encoded image, held at timestep 0) is not supported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models.compile import check_compile, compile_blocks, should_compile
from ..models.runner import TransformerState, _forward_chunk, _recurrent_forward, check_recurrent
from ..models.wan import AbsoluteRotaryPosEmbed, load_transformer
from .folders import (  # noqa: F401  (the geometry readers are re-exported: part of this module's API)
    PIPELINE_CONFIG_NAME, WAN21_DEFAULTS, WAN_ROPE_MAX_SEQ_LEN, ModelFolder, PromptEncoder, check_rope_table,
    check_vae_channels, default_scheduler, folder_check_rope_table, folder_latent_shape, folder_vae_config, folder_vae_factors,
    latent_shape, load_scheduler, load_text_encoder_from_folder, load_vae, vae_factors, write_model_folder)
from .sampling import SamplingLoop, denoise, guidance_embeds, guidance_on, guided_velocity

__all__ = ["ReHyAtVideoPipeline", "GenerationOutput", "NonFiniteOutputError", "check_finite", "initial_noise", "MODES",
           "PIPELINE_CONFIG_NAME"]

MODES = ("parallel", "recurrent", "streaming")


def initial_noise(seed: int, shape: tuple[int, int, int, int, int], frame_start: int = 0, device="cpu") -> torch.Tensor:
    """Standard normal latents ``[B, C, F, H, W]`` float32 whose frame ``f`` depends only on ``(seed, frame_start + f)``.

    Frames are drawn one by one on the CPU from ``torch.Generator().manual_seed(seed * 1_000_003 + frame)`` and
    moved to ``device``, so any chunking of a video gets the same noise.
    """
    B, C, F, H, W = shape
    frames = []
    for f in range(frame_start, frame_start + F):
        g = torch.Generator().manual_seed(seed * 1_000_003 + f)
        frames.append(torch.randn(B, C, 1, H, W, generator=g))
    return torch.cat(frames, dim=2).to(device)


class NonFiniteOutputError(FloatingPointError):
    """Generation produced NaN or Inf (latents or decoded frames); raised by :func:`check_finite` before the bad
    frame is decoded, handed out or returned. A ``FloatingPointError``, which the CLI reports as a one-line error."""


def video_frames_of(latent_frame: int, temporal: int) -> tuple[int, int]:
    """First and last video frame decoded from ``latent_frame`` by a causal VAE of ``temporal`` compression (Wan:
    latent frame 0 gives frame 0, latent frame f >= 1 gives frames ``(f-1)*temporal+1 .. f*temporal``)."""
    if latent_frame == 0:
        return 0, 0
    return (latent_frame - 1) * temporal + 1, latent_frame * temporal


def latent_frame_of(video_frame: int, temporal: int) -> int:
    """The latent frame a video frame is decoded from (inverse of :func:`video_frames_of`)."""
    return 0 if video_frame == 0 else (video_frame - 1) // temporal + 1


def check_init_latents(init_shape, shape, chunk: int, temporal: int, *, arg: str = "init_latents") -> None:
    """Check the latents a continuation starts from against the video to generate, before any work.

    Args:
        init_shape: the given latents' shape ``[1, C, F0, h, w]``.
        shape: the whole video's latents ``[1, C, F, h, w]`` (:func:`latent_shape`).
        chunk: the runner chunk in latent frames; temporal: the VAE's temporal compression (1 in pixel space).
        arg: the argument's name in errors.

    Raises:
        ValueError: one line naming ``arg``: a shape that is not ``[1, C, F0, h, w]`` of the model's channels and
            the video's size, ``F0`` not a whole number of chunks (the allowed video-frame counts are named), or
            no frame left to generate (``F0 >= F``).
    """
    _, C, F, h, w = shape
    init_shape = tuple(init_shape)
    if len(init_shape) != 5 or init_shape[0] != 1 or init_shape[1] != C or init_shape[3:] != (h, w):
        raise ValueError(f"{arg} has shape {list(init_shape)}, expected [1, {C}, F, {h}, {w}]: the latents of one "
                         "video, of this model's channels, at the size to generate")
    F0 = init_shape[2]
    frames = video_frames_of(F0 - 1, temporal)[1] + 1 if F0 else 0
    if F0 == 0 or F0 % chunk:
        counts = ", ".join(str(video_frames_of(m * chunk - 1, temporal)[1] + 1) for m in (1, 2, 3))
        raise ValueError(f"{arg} holds {frames} video frames ({F0} latent frames): a continuation starts from whole "
                         f"chunks of {chunk} latent frames, i.e. {counts}, ... video frames")
    if F0 >= F:
        total = video_frames_of(F - 1, temporal)[1] + 1
        raise ValueError(f"{arg} holds {frames} video frames, the video to generate {total}: nothing is left to "
                         "generate (ask for more frames)")


def check_init_video(video_shape, dtype, temporal: int, height: int, width: int, *, arg: str = "init_video") -> None:
    """Check a video a continuation starts from, ``[F0, H, W, 3]`` uint8, before any work: ``ValueError`` (one line
    naming ``arg``) for another layout or dtype, a frame count the VAE cannot take (``temporal * k + 1``), or a
    size other than ``height`` x ``width`` (the chunk and length checks follow in :func:`check_init_latents`)."""
    video_shape = tuple(video_shape)
    if len(video_shape) != 4 or video_shape[3] != 3 or video_shape[0] < 1 or dtype != np.uint8:
        raise ValueError(f"{arg} must be uint8 frames [F, H, W, 3], got {dtype} {list(video_shape)}")
    n = video_shape[0]
    if (n - 1) % temporal:
        raise ValueError(f"{arg} has {n} frames; this model's VAE takes {temporal}k+1 frames (e.g. "
                         f"{n - (n - 1) % temporal} or {n - (n - 1) % temporal + temporal})")
    if video_shape[1:3] != (height, width):
        raise ValueError(f"{arg} is {video_shape[2]}x{video_shape[1]} (width x height), the video to generate "
                         f"{width}x{height}: continue at the input's size")


def check_finite(x: torch.Tensor, *, kind: str, frame_start: int, temporal: int, when: str = "",
                 dtype: torch.dtype | None = None) -> None:
    """Raise :class:`NonFiniteOutputError` when ``x`` holds NaN or Inf, naming the first bad frame.

    Args:
        x: ``[B, C, F, H, W]``: latents (``kind="latents"``) or decoded frames (``kind="frames"``).
        frame_start: absolute index of x's first frame (a latent frame for latents, a video frame for frames).
        temporal: the VAE's temporal compression (1 in pixel space), to name video and latent frame alike.
        when: where it happened, e.g. ``"after denoising step 3 of 50"``.
        dtype: the transformer's dtype; float16 adds a hint (its range ends at 65504).
    """
    if bool(torch.isfinite(x).all()):
        return
    bad = int((~torch.isfinite(x).transpose(0, 2).flatten(1).all(dim=1)).nonzero()[0]) + frame_start
    if kind == "latents":
        first, last = video_frames_of(bad, temporal)
        span = f", which decodes to video frames {first}-{last}" if last > first else ""
        where, what, stop = f"video frame {first} (latent frame {bad}{span})", "the latents hold", "decoding or "
    else:
        where, what, stop = f"video frame {bad} (latent frame {latent_frame_of(bad, temporal)})", "the VAE decoded", ""
    hint = "; the transformer runs in float16, whose range ends at 65504: use bfloat16 or float32" if (
        dtype == torch.float16) else ""
    when = f" {when}" if when else ""
    raise NonFiniteOutputError(f"{what} NaN or Inf{when}, first at {where}, counting from 0; generation stopped "
                               f"before {stop}handing out that frame{hint}")


@dataclass
class GenerationOutput:
    """Result of :meth:`ReHyAtVideoPipeline.__call__`.

    Attributes:
        video: ``[F, H, W, 3]`` uint8 frames of the first batch entry (``None`` with ``output_type="latent"``).
        latents: ``[B, C, F_lat, H_lat, W_lat]`` float32 final latents.
        seconds: wall time of the denoising and decoding.
    """

    video: np.ndarray | None
    latents: torch.Tensor
    seconds: float


class StreamingDecoder:
    """Decode latent frames incrementally with the causal Wan VAE, keeping its causal-convolution cache.

    Calling it on consecutive latent chunks gives the frames ``AutoencoderKLWan.decode`` gives on the whole
    latent video (the first latent frame decodes to 1 frame, every later one to 4). With ``vae=None`` the latents
    are pixels and pass through. ``__call__(latents [B, C, f, h, w] normalised) -> [B, 3, frames, H, W]`` in [-1, 1].
    """

    def __init__(self, vae) -> None:
        self.vae = vae
        self.first = True
        self.frames_out = 0  # video frames decoded so far: the absolute index of the next one
        if vae is not None:
            vae.clear_cache()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Raises :class:`NonFiniteOutputError` naming the first decoded frame with NaN or Inf (checked before the
        clamp to [-1, 1], which would turn Inf into a plain white or black frame)."""
        out = self._decode(latents)
        temporal = 1 if self.vae is None else vae_factors(self.vae.config)[0]
        check_finite(out, kind="frames", frame_start=self.frames_out, temporal=temporal)
        self.frames_out += out.shape[2]
        return out.clamp(-1, 1)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if vae is None:
            return latents
        z = _denormalize(vae, latents)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=self.first))
            self.first = False
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out

    def close(self) -> None:
        if self.vae is not None:
            self.vae.clear_cache()


def _denormalize(vae, latents):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return latents * std + mean


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[B, 3, F, H, W]`` in [-1, 1] -> first batch entry as ``[F, H, W, 3]`` uint8."""
    v = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class _Plan:
    """A checked generation request (:meth:`ReHyAtVideoPipeline._plan`): the mode, latents ``[B, C, F, H, W]``
    shape, runner chunk (latent frames; ``None`` in parallel mode), steps, guidance scale, prompt segments and their
    first runner chunks, and the continuation's latents or video (``None`` without one)."""

    mode: str
    shape: tuple[int, int, int, int, int]
    chunk: int | None
    steps: int
    guidance: float
    segments: list
    starts: list[int]
    init_latents: torch.Tensor | None
    init_video: np.ndarray | None


class _FrameSink:
    """Where decoded ``[f, H, W, 3]`` uint8 blocks go: ``on_frames`` as soon as each is ready, and kept for the
    returned video when ``keep_video``."""

    def __init__(self, keep_video: bool, on_frames: Callable[[np.ndarray], None] | None) -> None:
        self.keep_video, self.on_frames, self.blocks = keep_video, on_frames, []

    def emit(self, frames: np.ndarray) -> None:
        if self.keep_video:
            self.blocks.append(frames)
        if self.on_frames is not None:
            self.on_frames(frames)

    def video(self) -> np.ndarray | None:
        """The kept frames ``[F, H, W, 3]``, ``None`` when none were kept."""
        return np.concatenate(self.blocks, axis=0) if self.blocks else None


def _check_call_arguments(prompt, prompt_schedule, prompt_embeds, steps, mode, output_type) -> None:
    """``ValueError`` for a bad mode, output type or step count, no prompt, or a prompt schedule given with a
    prompt (:meth:`ReHyAtVideoPipeline.__call__`), before the frames and size are checked."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    if prompt_schedule is not None and (prompt is not None or prompt_embeds is not None):
        raise ValueError("pass prompt_schedule or prompt / prompt_embeds, not both")
    if prompt_schedule is None and prompt_embeds is None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")


class ReHyAtVideoPipeline:
    """Text-to-video on Wan components with a plain or ReHyAt transformer.

    Args:
        transformer: ``WanTransformer3DModel``, converted (:func:`rehyat.convert_wan`) or not.
        scheduler: a diffusers flow-matching scheduler (default: Wan's UniPC, flow shift 3.0).
        vae: ``AutoencoderKLWan`` or ``None`` (latents are pixels in [-1, 1], as in the project's embedded model).
        tokenizer, text_encoder: transformers models (UMT5 for Wan, MiniLM for the embedded model) or ``None``
            (then pass ``prompt_embeds``).
        max_sequence_length: text tokens (Wan: 512; the embedded model: 16).
        fps: frame rate written to video files.
        negative_prompt: default negative prompt for guidance.
        defaults: the model's default generation settings, saved in ``rehyat_pipeline.json`` (``frames``,
            ``height``, ``width``, ``steps``, ``guidance``; the CLI falls back on Wan2.1's 81 x 480 x 832, 50, 5.0).

    The geometry comes from the VAE's config (:func:`vae_factors`): Wan2.1's VAE (16 latent channels, 8x spatial,
    sizes multiples of 16) and Wan2.2-TI2V-5B's (48 channels, 16x, sizes multiples of 32) alike.

    Attributes:
        compiled: whether the transformer's blocks were compiled by :meth:`from_pretrained` (its ``compile``).
        compile_seconds: wall time in seconds of the first denoising forward after that compilation (the first
            call of the transformer, CUDA synchronised; it includes the compilation, so it is an upper bound on
            the compile time), ``None`` until that forward has run or when not compiled.

    Raises:
        ValueError: the VAE's latents (``z_dim``) are not the transformer's input (``in_channels``).
    """

    def __init__(self, transformer, scheduler=None, vae=None, tokenizer=None, text_encoder=None, *,
                 max_sequence_length: int = 512, fps: int = 16, negative_prompt: str = "",
                 defaults: dict | None = None) -> None:
        if vae is not None:
            check_vae_channels(vae.config, transformer.config.in_channels)
        self.transformer = transformer
        self.scheduler = scheduler if scheduler is not None else default_scheduler()
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_table = None  # optional caption -> embeddings table, used instead of a text encoder
        self._text_encoder_folder = None  # a folder whose text encoder loads on first use
        self.max_sequence_length = max_sequence_length
        self.fps = fps
        self.negative_prompt = negative_prompt
        self.defaults = dict(defaults or {})
        self.compiled = False
        self.compile_seconds: float | None = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder, *, torch_dtype: torch.dtype | None = None, device=None,
                        text_embeddings=None, compile: str = "auto") -> "ReHyAtVideoPipeline":
        """Load a model folder (see the module docstring).

        ``compile``: ``"auto"`` (default), ``"on"`` or ``"off"``: put every transformer block under
        ``torch.compile`` (:func:`rehyat.models.compile_blocks`, once, after the transformer is on its device and
        dtype). ``"auto"`` compiles on a CUDA device only, where it was measured to pay (an H200 forward of the
        30/30 Wan2.1-1.3B conversion at 81 frames: 599 -> 301 ms, the first forward 17-19 s with compilation; the
        chunk-by-chunk modes gain too), and stays eager on CPU and MPS, where it was never measured. The first
        denoising forward then compiles (one graph per video length); its wall time is kept in
        :attr:`compile_seconds`. ``ValueError`` for another value, before any weights load.

        ``text_embeddings``: a caption table (:class:`rehyat.text_encoder.TextEmbeddingTable` file) used instead
        of the folder's text encoder, for machines without its weights. The text encoder itself loads on first use.
        Raises ``FileNotFoundError``/``ValueError`` for a folder that is not a Wan or ReHyAt checkpoint, whose
        transformer weights do not match its ReHyAt settings (:func:`rehyat.load_transformer`) or whose VAE's latents
        are not its transformer's input (:func:`check_vae_channels`), before loading any weights. A folder written
        by diffusers' ``WanPipeline.save_pretrained`` with a converted transformer loads converted (the settings are
        in ``transformer/config.json``). ``folder``: a path or a :class:`~rehyat.pipelines.folders.ModelFolder`
        (whose configs, read already by a caller's checks, are not read again)."""
        check_compile(compile)
        mf = ModelFolder.of(folder)
        folder = mf.path
        if not folder.is_dir():
            raise FileNotFoundError(f"--model folder {folder} does not exist")
        if not (folder / "transformer" / "config.json").exists():
            raise ValueError(
                f"{folder} is not a Wan or ReHyAt checkpoint: expected transformer/config.json (a diffusers "
                "WanTransformer3DModel folder) inside it"
            )
        cfg = mf.pipeline_config
        mf.check_vae_channels()  # a VAE of another model: refused before any weights load
        table = None
        if text_embeddings is not None:  # read (and fail) before any weights load
            from ..text_encoder import TextEmbeddingTable

            table = TextEmbeddingTable.load(text_embeddings)
        transformer = load_transformer(folder / "transformer", torch_dtype=torch_dtype, device=device).eval()
        pipe = cls(
            transformer, load_scheduler(folder), load_vae(folder, device or "cpu"), None, None,
            max_sequence_length=cfg.get("max_sequence_length", 512), fps=cfg.get("fps", 16),
            negative_prompt=cfg.get("negative_prompt", ""), defaults=cfg.get("defaults"),
        )
        # The text encoder loads on first use (a GPU machine may hold only the caption table).
        if table is not None:
            pipe.text_table = table
            if pipe.text_table.text_dim != transformer.config.text_dim:
                raise ValueError(f"{text_embeddings} holds {pipe.text_table.text_dim}-dim embeddings, the model takes "
                                 f"text_dim={transformer.config.text_dim}")
        elif mf.has_text_encoder:
            pipe._text_encoder_folder = mf
        if should_compile(compile, pipe.device):
            compile_blocks(transformer)
            pipe.compiled = True
        return pipe

    def save_pretrained(self, folder, *, overwrite: bool = False, text_encoder: str | None = None) -> Path:
        """Write transformer, scheduler, VAE and ``rehyat_pipeline.json`` (text encoder by name, e.g. "minilm"),
        atomically (:func:`~rehyat.pipelines.folders.write_model_folder`: nothing half-written is left on an error).

        Raises:
            FileExistsError: ``folder`` exists and is not empty, without ``overwrite`` (then its entries of these
                names are replaced, the others kept); before anything is written.
        """
        cfg = {"max_sequence_length": self.max_sequence_length, "fps": self.fps, "negative_prompt": self.negative_prompt}
        if self.defaults:
            cfg["defaults"] = self.defaults
        if text_encoder is not None:
            cfg["text_encoder"] = text_encoder
        return write_model_folder(folder, self.transformer, cfg, scheduler=self.scheduler, vae=self.vae,
                                  overwrite=overwrite)

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def temporal_factor(self) -> int:
        """The VAE's temporal compression (:func:`vae_factors`; Wan: 4), 1 in pixel space."""
        return 1 if self.vae is None else vae_factors(self.vae.config)[0]

    @property
    def spatial_factor(self) -> int:
        """The VAE's spatial compression (:func:`vae_factors`; Wan2.1: 8, Wan2.2-TI2V-5B: 16), 1 in pixel space."""
        return 1 if self.vae is None else vae_factors(self.vae.config)[1]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def latent_shape(self, num_frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
        """Latent shape for a video; ``ValueError`` for a frame count or size the model cannot produce."""
        return latent_shape(self.temporal_factor, self.spatial_factor, self.transformer.config.patch_size[1],
                            self.transformer.config.in_channels, num_frames, height, width, batch)

    # ------------------------------------------------------------------------------------------------ text
    @property
    def has_text_encoder(self) -> bool:
        """Whether prompts can be encoded (a loaded or loadable text encoder, or a caption table)."""
        return self.text_table is not None or self._text_encoder_folder is not None or (
            self.tokenizer is not None and self.text_encoder is not None)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[B, max_sequence_length, text_dim]`` (zero-padded as diffusers' WanPipeline does)."""
        if not self.has_text_encoder:
            raise ValueError("this model folder has no text encoder: pass prompt_embeds instead of a prompt")
        if self.text_table is not None:
            return self.text_table.lookup(prompts).to(self.device, self.transformer.dtype)
        if self.text_encoder is None:
            self.tokenizer, self.text_encoder = load_text_encoder_from_folder(self._text_encoder_folder,
                                                                              device=self.device)
        emb = PromptEncoder(self.tokenizer, self.text_encoder, self.max_sequence_length)(prompts)
        return emb.to(self.device, self.transformer.dtype)

    # ------------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, on_frames: Callable[[np.ndarray], None] | None = None,
                       keep_video: bool = True, block_frames: int = 1) -> np.ndarray | None:
        """The video of final latents (:attr:`GenerationOutput.latents` of ``output_type="latent"``): ``[F, H, W, 3]``
        uint8 frames of the first batch entry, as ``__call__`` decodes them.

        Args:
            latents: ``[B, C, F_lat, H_lat, W_lat]`` float, on any device (moved block by block to the model's).
            on_frames: called with each decoded ``[f, H, W, 3]`` uint8 block as soon as it is ready.
            keep_video: also return the frames (``False``: returns ``None``, memory constant in the length).
            block_frames: latent frames decoded at a time (the causal VAE's cache carries the earlier ones).

        Raises:
            ValueError: ``latents`` is not 5-dimensional, or ``block_frames`` < 1.
        """
        if latents.dim() != 5 or block_frames < 1:
            raise ValueError(f"latents must be [B, C, F, H, W] and block_frames >= 1, got {tuple(latents.shape)} and "
                             f"{block_frames}")
        decoder = StreamingDecoder(self.vae)
        blocks = []
        try:
            for f0 in range(0, latents.shape[2], block_frames):
                frames = to_uint8_frames(decoder(latents[:, :, f0 : f0 + block_frames].to(self.device).float()))
                if keep_video:
                    blocks.append(frames)
                if on_frames is not None:
                    on_frames(frames)
        finally:
            decoder.close()
        return np.concatenate(blocks, axis=0) if blocks else None

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        *,
        prompt_schedule: list[tuple[int, str | torch.Tensor]] | None = None,
        negative_prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        mode: str = "parallel",
        output_type: str = "np",
        on_frames: Callable[[np.ndarray], None] | None = None,
        keep_video: bool = True,
        progress: bool = True,
        init_latents: torch.Tensor | None = None,
        init_video: np.ndarray | None = None,
    ) -> GenerationOutput:
        """Generate one video.

        Args:
            prompt / prompt_embeds: the text, or its embeddings ``[1, L, text_dim]``.
            prompt_schedule: instead of ``prompt``, a prompt per segment of the video (recurrent and streaming
                modes): ``[(0, "a red circle ..."), (8, "a blue circle ..."), ...]``, start frames in video frames,
                the first 0, increasing, below ``num_frames``; a prompt may also be embeddings ``[1, L, text_dim]``.
                Each prompt conditions the runner chunks from the one holding its start frame (a start frame
                inside a chunk takes effect from the chunk's first frame; one prompt per chunk) and the states
                carry over; the negative prompt stays the same (:mod:`rehyat.pipelines.schedule`).
            negative_prompt / negative_prompt_embeds: for classifier-free guidance (default: the folder's).
            num_frames: video frames (``4k+1`` with Wan's VAE; any count in pixel space).
            height, width: pixels, multiples of VAE stride x patch (16 for Wan2.1, 32 for Wan2.2-TI2V-5B).
            num_inference_steps, guidance_scale: sampler steps and CFG scale (guidance off at <= 1).
            Unset sizes and settings come from the folder's ``defaults`` (``rehyat_pipeline.json``), else
            Wan2.1's: 81 frames, 480 x 832, 50 steps, guidance 5.0.
            seed: noise seed. mode: ``"parallel"``, ``"recurrent"`` or ``"streaming"``.
            output_type: ``"np"`` (decode frames) or ``"latent"``.
            on_frames: called with each newly decoded ``[f, H, W, 3]`` uint8 block as soon as it is ready
                (per chunk in streaming mode, once at the end otherwise).
            keep_video: also return the frames (``False`` for long streamed videos written by ``on_frames``:
                memory then stays constant in the video length; latents are kept on the CPU).
            init_latents / init_video: continue a video (streaming mode): its latents ``[1, C, F0, h, w]`` float
                (as :attr:`GenerationOutput.latents`, normalised), or its frames ``[F0, H, W, 3]`` uint8 (as
                :attr:`GenerationOutput.video`; encoded with the VAE, :meth:`encode_video`). They are kept as they
                are: the output's first frames are their decoding (the VAE's round trip of ``init_video``) and the
                model streams on from them. ``F0`` must fill whole runner chunks (:func:`check_init_latents`: 5, 13,
                21, ... frames with Wan's VAE and chunks of 2 latent frames) and be shorter than ``num_frames``;
                ``height`` / ``width`` default to their size. The given chunks are run through the model at every
                denoising step as context (:meth:`_streaming`); continuing the model's own first frames (same seed
                and prompt) gives the one-run streaming video.

        Raises:
            ValueError: bad mode, frames, size, empty prompt, a bad ``prompt_schedule``
                (:func:`~rehyat.pipelines.schedule.plan_prompt_schedule`), one given with ``prompt`` /
                ``prompt_embeds`` or in parallel mode, missing text encoder, a video past a plain Wan transformer's
                RoPE table (:func:`check_rope_table`), or a model that is not causal for
                ``recurrent``/``streaming``; all before any compute.
            NonFiniteOutputError: the latents (after any denoising step) or the decoded frames hold NaN or Inf;
                raised before the first bad frame is decoded or handed to ``on_frames`` (in streaming mode the
                earlier chunks' frames have been handed out already, all finite), naming it as a video frame and
                a latent frame.
        """
        plan = self._plan(prompt, prompt_schedule, prompt_embeds, num_frames, height, width, num_inference_steps,
                          guidance_scale, mode, output_type, init_latents, init_video)
        t0 = time.perf_counter()
        embeds = self._chunk_conditioning(plan, negative_prompt, negative_prompt_embeds)
        sink = _FrameSink(keep_video, on_frames)
        decoder = StreamingDecoder(self.vae) if output_type == "np" else None
        try:
            latents = self._generate(plan, seed, embeds, decoder, sink.emit, progress)
        finally:
            if decoder is not None:
                decoder.close()
        return GenerationOutput(video=sink.video(), latents=latents, seconds=time.perf_counter() - t0)

    def _plan(self, prompt, prompt_schedule, prompt_embeds, num_frames, height, width, steps, guidance, mode,
              output_type, init_latents, init_video) -> "_Plan":
        """Check :meth:`__call__`'s arguments before any work (``ValueError`` as it documents) and resolve unset
        sizes and settings from the folder's ``defaults``, else Wan2.1's."""
        d = {**WAN21_DEFAULTS, **self.defaults}
        height, width = self._init_size(init_latents, init_video, height, width)
        num_frames = num_frames if num_frames is not None else d["frames"]
        height = height if height is not None else d["height"]
        width = width if width is not None else d["width"]
        steps = steps if steps is not None else d["steps"]
        guidance = guidance if guidance is not None else d["guidance"]
        _check_call_arguments(prompt, prompt_schedule, prompt_embeds, steps, mode, output_type)
        shape = self.latent_shape(num_frames, height, width)
        if prompt_schedule is not None and mode == "parallel":
            raise ValueError("prompt_schedule needs mode 'recurrent' or 'streaming': parallel mode denoises all "
                             "frames in one forward and cannot switch prompts per chunk")
        chunk = check_recurrent(self.transformer) if mode != "parallel" else None
        rope = self.transformer.rope
        check_rope_table(None if isinstance(rope, AbsoluteRotaryPosEmbed) else rope.max_seq_len,
                         self.transformer.config.patch_size, shape, self.temporal_factor, self.spatial_factor)
        if prompt_schedule is None:
            segments, starts = [prompt_embeds if prompt_embeds is not None else prompt], [0]
        else:
            from .schedule import plan_prompt_schedule

            starts = plan_prompt_schedule(prompt_schedule, num_frames, self.temporal_factor, chunk)
            segments = [p for _, p in prompt_schedule]
        if not self.has_text_encoder and any(isinstance(p, str) for p in segments):
            raise ValueError("this model folder has no text encoder: pass prompt_embeds instead of a prompt")
        if init_latents is not None or init_video is not None:
            self._check_init(init_latents, init_video, mode, shape, chunk, height, width)
        return _Plan(mode, shape, chunk, steps, guidance, segments, starts, init_latents, init_video)

    def _chunk_conditioning(self, plan: "_Plan", negative_prompt, negative_prompt_embeds):
        """The text input (:meth:`_conditioning`): one tensor in parallel mode, else one per runner chunk (the
        last prompt segment starting at or before the chunk)."""
        conds = self._conditioning(plan.segments, negative_prompt, negative_prompt_embeds, guidance_on(plan.guidance))
        if plan.mode == "parallel":
            return conds[0]
        n_chunks = -(-plan.shape[2] // plan.chunk)
        return [conds[sum(s <= k for s in plan.starts) - 1] for k in range(n_chunks)]

    def _generate(self, plan: "_Plan", seed, embeds, decoder, emit, progress) -> torch.Tensor:
        """Denoise in ``plan.mode`` from the noise of ``seed``, handing decoded frames to ``emit`` (per chunk when
        streaming, once at the end otherwise; none without ``decoder``). Returns the final latents."""
        if plan.mode == "streaming":
            init = plan.init_latents if plan.init_video is None else self.encode_video(plan.init_video)
            init = None if init is None else init.to(self.device, torch.float32)
            return self._streaming(plan.shape, seed, embeds, plan.steps, plan.guidance, plan.chunk, decoder, emit,
                                   progress, init)
        if plan.mode == "parallel":
            forward = lambda i, x, t, e: self.transformer(x, t, e, return_dict=False)[0]  # noqa: E731
        else:
            # the transformer was checked once, in _plan: not again per step and chunk
            forward = lambda i, x, t, e: _recurrent_forward(  # noqa: E731
                self.transformer, x, t, e, chunk_frames=plan.chunk, runner_chunk=plan.chunk)
        forward = self._timing_first_forward(forward)
        latents = self._denoise(initial_noise(seed, plan.shape, 0, self.device), embeds, plan.steps, plan.guidance,
                                forward, progress=progress)
        if decoder is not None:
            emit(to_uint8_frames(decoder(latents.float())))
        return latents

    def _init_size(self, init_latents, init_video, height, width) -> tuple[int | None, int | None]:
        """``height`` and ``width``, where not given, from the video a continuation starts from (``None`` without
        one). ``ValueError`` when both ``init_latents`` and ``init_video`` are given."""
        if init_latents is not None and init_video is not None:
            raise ValueError("pass init_latents or init_video, not both")
        size = None
        if init_video is not None and np.ndim(init_video) == 4:
            size = np.shape(init_video)[1:3]
        elif isinstance(init_latents, torch.Tensor) and init_latents.dim() == 5:
            size = tuple(n * self.spatial_factor for n in init_latents.shape[3:])
        if size is None:
            return height, width
        return (height if height is not None else int(size[0])), (width if width is not None else int(size[1]))

    def _check_init(self, init_latents, init_video, mode, shape, chunk, height, width) -> None:
        """Before any work: ``ValueError`` for a continuation outside streaming mode or given frames the model
        cannot take (:func:`check_init_video`, :func:`check_init_latents`; non-finite latents)."""
        arg = "init_latents" if init_video is None else "init_video"
        if mode != "streaming":
            raise ValueError(f"{arg} continues a video in mode 'streaming' (the given chunks are run through the "
                             f"model as context at every denoising step, chunk by chunk), got mode {mode!r}")
        if init_video is not None:
            check_init_video(np.shape(init_video), getattr(init_video, "dtype", None), self.temporal_factor, height,
                             width)
            init_shape = (1, shape[1], (len(init_video) - 1) // self.temporal_factor + 1, *shape[3:])
        else:
            if not isinstance(init_latents, torch.Tensor) or not init_latents.is_floating_point():
                raise ValueError(f"init_latents must be a float tensor [1, C, F, h, w], got {type(init_latents).__name__}"
                                 f"{'' if not isinstance(init_latents, torch.Tensor) else ' ' + str(init_latents.dtype)}")
            init_shape = init_latents.shape
        check_init_latents(init_shape, shape, chunk, self.temporal_factor, arg=arg)
        if init_latents is not None and not bool(torch.isfinite(init_latents).all()):
            raise ValueError("init_latents hold NaN or Inf")

    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """Latents ``[1, C, f, h, w]`` float32 of a video ``[F, H, W, 3]`` uint8, as :meth:`__call__` makes them
        (inverse of :meth:`decode_latents` up to the VAE's round-trip error): the posterior mode of the VAE,
        normalised with its ``latents_mean`` / ``latents_std`` as diffusers' Wan pipelines do; without a VAE
        (pixel space) the frames in [-1, 1]. ``F`` must be ``temporal * k + 1`` (:func:`check_init_video`)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(3, 0, 1, 2)[None].float()
        x = x / 127.5 - 1.0
        if self.vae is None:
            return x
        vae = self.vae
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device)
        return (z - mean) / std

    def _conditioning(self, prompts, negative_prompt, negative_prompt_embeds, cfg: bool) -> list[torch.Tensor]:
        """The transformer's text input for each prompt (a string, or embeddings ``[1, L, text_dim]``): the
        embeddings ``[1, L, text_dim]``, or with guidance (``cfg``) ``[negative; prompt]`` ``[2, L', text_dim]``,
        both zero-padded to the longer of the two (``L'``). The negative prompt is encoded once."""
        dev, dtype = self.device, self.transformer.dtype
        embeds = [(self.encode_prompt([p]) if isinstance(p, str) else p).to(dev, dtype) for p in prompts]
        if not cfg:
            return embeds
        if negative_prompt_embeds is None:
            neg = self.negative_prompt if negative_prompt is None else negative_prompt
            negative_prompt_embeds = self.encode_prompt([neg]) if self.has_text_encoder else torch.zeros_like(embeds[0])
        neg = negative_prompt_embeds.to(dev, dtype)
        return [guidance_embeds(neg, e) for e in embeds]

    def _denoise(self, latents, embeds, steps, guidance_scale, forward, *, progress=False, chunk_start=None,
                 path=None):
        """All steps (:func:`~rehyat.pipelines.sampling.denoise`) with the guided velocity of ``forward(i, x, ts,
        embeds)`` (``i``: the step) on latents ``[B, C, f, h, w]``, checked after every step (:meth:`_check_latents`).
        ``chunk_start``: for one chunk, the latent frame it starts at (named in errors); ``path``: a list that gets
        the input of every step."""
        dtype = self.transformer.dtype
        f0 = chunk_start or 0
        where = "" if chunk_start is None else f" of the chunk starting at latent frame {f0}"

        def velocity(x, t, i):
            if path is not None:
                path.append(x)
            return guided_velocity(partial(forward, i), x, t, embeds, guidance_scale, dtype)

        def check(i, x):
            self._check_latents(x, f0, f"after denoising step {i + 1} of {steps}{where}")

        return denoise(self.scheduler, latents, steps, velocity, after_step=check, progress=progress)

    def _chunk_forward(self, states, new_states):
        """``forward(i, x, ts, embeds)`` of one chunk at step ``i`` on ``states[i]`` (the earlier chunks' state at
        that step, not modified), keeping the state after the chunk in ``new_states[i]``."""
        def forward(i, x, ts, e):
            out, new_states[i] = _forward_chunk(self.transformer, x, ts, e, states[i])  # checked in _plan
            return out

        return self._timing_first_forward(forward)

    def _timing_first_forward(self, forward):
        """``forward`` itself, or, while the compiled transformer's first forward is still to come, ``forward``
        whose first call's wall time (CUDA synchronised: the compilation and the forward) goes to
        :attr:`compile_seconds`."""
        if not self.compiled or self.compile_seconds is not None:
            return forward

        def timed(*args):
            if self.compile_seconds is not None:
                return forward(*args)
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = forward(*args)
            sync()
            self.compile_seconds = time.perf_counter() - t0
            return out

        return timed

    def _denoise_chunk(self, latents, embeds, states, steps, guidance_scale, f0):
        """Denoise one chunk ``[B, C, n, h, w]`` starting at latent frame ``f0`` (all steps) on the per-step
        ``states`` of the earlier chunks (not modified). Returns ``(latents, states after the chunk, path)``:
        ``path[i]`` is the chunk's input to step ``i``."""
        new_states, path = list(states), []
        latents = self._denoise(latents, embeds, steps, guidance_scale, self._chunk_forward(states, new_states),
                                chunk_start=f0, path=path)
        return latents, new_states, path

    def _context_states(self, path, own, given, embeds, states, guidance_scale):
        """Per-step states after a given chunk (see :meth:`_streaming`): step ``i`` runs the model on
        ``path[i] + (1 - sigma_i) (given - own)`` over ``states[i]`` (not modified) and keeps the new state."""
        loop = SamplingLoop(self.scheduler, own, len(path))
        new_states = list(states)
        forward = self._chunk_forward(states, new_states)
        for i, t in enumerate(loop.timesteps):
            context = path[i] + (1.0 - float(loop.scheduler.sigmas[i])) * (given - own)
            guided_velocity(partial(forward, i), context, t, embeds, guidance_scale, self.transformer.dtype)
        return new_states

    def _check_latents(self, latents, frame_start: int, when: str) -> None:
        """:func:`check_finite` on latents ``[B, C, f, h, w]`` whose first frame is latent frame ``frame_start``."""
        check_finite(latents, kind="latents", frame_start=frame_start, temporal=self.temporal_factor, when=when,
                     dtype=self.transformer.dtype)

    def _streaming(self, shape, seed, embeds, steps, guidance_scale, chunk, decoder, emit, progress, init=None):
        """Each chunk fully denoised before the next; per-step transformer states kept (design section 5).

        ``embeds``: the text input of each chunk (:meth:`_conditioning`), a list of ceil(F / chunk). ``init``: the
        latents ``[1, C, F0, h, w]`` of whole chunks a continuation starts from, kept as they are. The state of a
        step must summarise the earlier chunks at that step's noise level, as in a one-run video; for a given
        chunk it is built (:meth:`_context_states`) from the model's own trajectory for the chunk (``x_i``, its
        end ``x_0``) moved to end at the given latents ``g``: ``x_i + (1 - sigma_i) (g - x_0)``. For the model's
        own latents that is its trajectory itself, so the continuation is the one-run video (and the second
        pass is skipped when ``g`` equals ``x_0`` bitwise); otherwise a given chunk costs twice a generated one.
        """
        from tqdm.auto import tqdm

        B, C, F, H, W = shape
        F0 = 0 if init is None else init.shape[2]
        states: list[TransformerState | None] = [None] * steps
        outs = []
        # closed on an error too, so the error message starts on a line of its own
        with tqdm(total=F, desc="streaming (latent frames)", disable=not progress) as bar:
            for k, f0 in enumerate(range(0, F, chunk)):
                n = min(chunk, F - f0)
                noise = initial_noise(seed, (B, C, n, H, W), f0, self.device)
                latents, new_states, path = self._denoise_chunk(noise, embeds[k], states, steps, guidance_scale, f0)
                if f0 < F0:  # a given chunk: its latents are kept, the states describe them
                    given = init[:, :, f0 : f0 + n]
                    if not torch.equal(given, latents):
                        new_states = self._context_states(path, latents, given, embeds[k], states, guidance_scale)
                    latents = given
                states = new_states
                outs.append(latents.cpu())
                if decoder is not None:
                    emit(to_uint8_frames(decoder(latents.float())))
                bar.update(n)
        return torch.cat(outs, dim=2)
