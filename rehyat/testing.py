"""Tiny Wan components built in code, for tests, examples and CPU smoke runs (no download needed).

The tiny transformer runs in a few hundredths of a second on a CPU. :func:`assert_outputs_close` compares the
outputs of two code paths or two model objects with a tolerance tied to their dtype.
"""

from __future__ import annotations

import torch

#: ``(rtol, atol)`` per dtype for :func:`assert_outputs_close`; ``atol`` is relative to the largest ``|expected|``.
#: In units in the last place (ulp): float64 and float32 about 90 and 9 (a deep model's accumulated rounding);
#: float16 and bfloat16, whose outputs are rounded to few bits, 2 and 1.
OUTPUT_TOLERANCES = {
    torch.float64: (2e-14, 2e-15),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Assert two outputs agree up to the rounding their dtype allows, not bit for bit.

    For outputs of two code paths, or of two model objects (even with bit-identical weights: kernels may round
    differently with the tensors' memory alignment, which differs between CPUs, e.g. Intel and AMD). Weights, files
    and reruns of one computation on one object are compared bitwise instead (``torch.equal``).

    Args:
        actual, expected: tensors of one shape, floating dtype and device (``torch.testing.assert_close`` checks).
        msg: optional text added to the failure message.

    Tolerance: ``|actual - expected| <= atol * max|expected| + rtol * |expected|`` elementwise, with ``(rtol, atol)``
    from :data:`OUTPUT_TOLERANCES` for ``expected.dtype`` (the max over finite entries; NaN never matches).

    Raises:
        ValueError: ``expected`` has a dtype without a tolerance here (not float64/32/16 or bfloat16).
        AssertionError: the outputs differ by more (or in shape, dtype or device).
    """
    if expected.dtype not in OUTPUT_TOLERANCES:
        raise ValueError(f"expected must have a floating dtype in {sorted(map(str, OUTPUT_TOLERANCES))}, "
                         f"got {expected.dtype}")
    rtol, atol = OUTPUT_TOLERANCES[expected.dtype]
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale,
                               msg=None if msg is None else (lambda m: f"{m}\n{msg}"))


def tiny_wan_transformer(num_layers: int = 2, in_channels: int = 16, text_dim: int = 64, seed: int = 0, **overrides):
    """A random ``WanTransformer3DModel`` with 2 heads x 32, FFN 128, patch (1, 2, 2), RoPE table of 32 positions."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=in_channels,
               out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=128, num_layers=num_layers,
               rope_max_seq_len=32)
    cfg.update(overrides)
    return WanTransformer3DModel(**cfg).eval()


def tiny_wan_vae(seed: int = 0):
    """A random causal ``AutoencoderKLWan``: video ``[B, 3, 4k+1, H, W]`` <-> latents ``[B, 16, k+1, H/8, W/8]``."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_wan22_vae(seed: int = 0, z_dim: int = 48):
    """A random causal ``AutoencoderKLWan`` with Wan2.2's structure (the VAE of Wan2.2-TI2V-5B, scaled down): residual
    up/down blocks (``is_residual=True``), a 2x2 pixel patch folded into 12 channels (``patch_size=2``), so 16x spatial
    compression (8x from the convolutions x the patch), 4x temporal, ``z_dim`` latent channels (48 as in Wan2.2), a
    wider decoder than encoder (Wan2.2: 160 / 256; here 4 / 8) and per-channel ``latents_mean`` / ``latents_std`` of
    ``z_dim`` entries (seeded, not Wan2.2's values).

    Video ``[B, 3, 4k+1, H, W]`` <-> latents ``[B, z_dim, k+1, H/16, W/16]`` (H, W multiples of 16).
    """
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed + 1)
    mean, std = (0.5 * torch.randn(z_dim, generator=g)).tolist(), (0.5 + torch.rand(z_dim, generator=g)).tolist()
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                            latents_mean=mean, latents_std=std).eval()


#: The tiny geometries of :func:`tiny_vae` and :func:`tiny_pipeline_folder`, name -> latent ``channels`` and
#: ``spatial`` compression: ``"wan2.1"`` (16 channels, 8x: with the transformer's 2x2 patch, sizes are multiples of
#: 16) and ``"wan2.2"`` (Wan2.2-TI2V-5B's VAE: 48 channels, 16x: sizes multiples of 32). Both compress time 4x.
GEOMETRIES = {"wan2.1": dict(channels=16, spatial=8), "wan2.2": dict(channels=48, spatial=16)}


def tiny_vae(geometry: str = "wan2.1", seed: int = 0):
    """:func:`tiny_wan_vae` (``"wan2.1"``) or :func:`tiny_wan22_vae` (``"wan2.2"``); ``ValueError`` for another
    name. The transformer that goes with it takes ``vae.config.z_dim`` channels."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {sorted(GEOMETRIES)}, got {geometry!r}")
    return tiny_wan_vae(seed) if geometry == "wan2.1" else tiny_wan22_vae(seed)


def tiny_text_encoder(text_dim: int = 64, seed: int = 0):
    """A word-level tokenizer and a tiny ``UMT5EncoderModel`` (hidden ``text_dim``), both built in code.

    Returns ``(tokenizer, text_encoder)`` usable by :class:`rehyat.pipelines.ReHyAtVideoPipeline`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "green", "blue", "circle", "square", "triangle", "moving",
             "left", "right", "up", "down", "on", "grey", "black", "white", "background", "cat", "dog", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(words), d_model=text_dim, d_kv=16, d_ff=128, num_layers=1, num_heads=2)
    return tokenizer, UMT5EncoderModel(cfg).eval()


def tiny_pipeline_folder(folder, *, converted: bool = True, vae: bool = True, chunk_frames: int = 2,
                         overlap_frames: int = 1, num_layers: int = 2, geometry: str = "wan2.1"):
    """Write a complete tiny model folder (transformer, scheduler, optional VAE, tokenizer, text encoder).

    With ``converted=True`` every block is converted to ReHyAt (a fully causal model); with ``vae=False`` the model
    works in pixel space (3 channels), like the project's embedded model. ``geometry`` (with ``vae=True``): the VAE
    of :func:`tiny_vae`, the transformer taking its ``z_dim`` channels. Default size 9 frames of 32 x 32 pixels.
    Returns the folder.
    """
    from pathlib import Path

    from .models import convert_wan
    from .pipelines import ReHyAtVideoPipeline

    folder = Path(folder)
    tokenizer, text_encoder = tiny_text_encoder()
    autoencoder = tiny_vae(geometry) if vae else None
    transformer = tiny_wan_transformer(num_layers=num_layers, in_channels=autoencoder.config.z_dim if vae else 3)
    if converted:
        convert_wan(transformer, blocks="all", chunk_frames=chunk_frames, overlap_frames=overlap_frames)
    pipe = ReHyAtVideoPipeline(transformer, vae=autoencoder, tokenizer=tokenizer,
                               text_encoder=text_encoder, max_sequence_length=16, fps=8,
                               defaults=dict(frames=9 if vae else 8, height=32, width=32, steps=2, guidance=2.0))
    pipe.save_pretrained(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder


#: Fields of a training log line that measure time or memory, so differ between two identical runs.
TIMING_LOG_KEYS = ("samples_per_s", "step_s", "peak_mem_gib")


def folder_weights(folder) -> dict[str, torch.Tensor]:
    """The transformer weights of a model folder (``transformer/diffusion_pytorch_model.safetensors``), by name,
    for bitwise comparison of two runs' outputs."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")


def train_log(folder) -> list[dict]:
    """The lines of a training run's ``train/log.jsonl`` under ``folder``, without :data:`TIMING_LOG_KEYS`, so that
    two runs' logs compare equal when they trained identically."""
    import json
    from pathlib import Path

    lines = (Path(folder) / "train" / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_LOG_KEYS} for x in lines]
