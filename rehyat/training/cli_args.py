"""argparse options shared by the training commands (``rehyat distill``, ``convert``, ``finetune``)."""

from __future__ import annotations

import json
from pathlib import Path


def add_prompt_args(p, *, required: bool = False) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", "--prompt-file", dest="prompts", type=Path, default=None,
                   help="prompt file, one prompt per line (encoded with the model's text encoder, or looked up in "
                        "--text-embeddings)")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset folder (rehyat prepare-data): use its text embeddings and latent shape")
    g.add_argument("--text-embeddings", type=Path, default=None,
                   help="caption table (.safetensors, 'embeds' [K, L, D] + captions in its metadata) instead of a "
                        "text encoder; alone, every caption in it is a prompt")


def add_geometry_args(p) -> None:
    g = p.add_argument_group("geometry (ignored with --data)")
    g.add_argument("--frames", type=int, default=None, help="video frames (4k+1 with Wan's VAE; default: the folder's)")
    g.add_argument("--height", type=int, default=None, help="pixels (default: the folder's, else 480)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the folder's, else 832)")


def add_conversion_args(p) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--chunk-frames", type=int, default=3, help="T_c, latent frames per chunk (default 3)")
    g.add_argument("--overlap-frames", type=int, default=1, help="T_o, earlier frames in each softmax window (default 1)")
    g.add_argument("--feature-map", choices=["polynomial", "hedgehog"], default="polynomial")
    g.add_argument("--feature-map-kwargs", type=json.loads, default=None,
                   help='JSON, e.g. \'{"feature_dim": 64}\' (passed to the feature map)')
    g.add_argument("--feature-map-input", choices=["rotated", "unrotated", "spatial"], default="rotated",
                   help="what the feature maps see of q, k: after RoPE (default), before it, or after its height "
                        "and width rotations only (spatial: the linear branch is the same at every frame position)")
    g.add_argument("--stabilizer", choices=["lse", "max"], default="lse")
    g.add_argument("--bidirectional", action="store_true", help="bidirectional linear keys (not recurrent)")
    g.add_argument("--softmax-blocks", choices=["bidirectional", "chunk_causal"], default="bidirectional",
                   help="what unconverted blocks become (default: the teacher's bidirectional softmax)")


def add_block_overlap_arg(p) -> None:
    """``--block-overlap-frames`` of ``rehyat distill`` and ``convert`` (read with :func:`parse_block_overlap_frames`;
    checked against the block choice by :func:`rehyat.training.common.block_overlap_settings`)."""
    p.add_argument("--block-overlap-frames", default=None, metavar="BLOCK=FRAMES,...",
                   help="per-block --overlap-frames, e.g. 0=12,2=12,5=12 (a wide softmax window in blocks 0, 2, 5; "
                        "the others keep --overlap-frames); saved in the student's rehyat_config.json. Needs --blocks "
                        "all or a list (not best:N or auto). With --softmax-blocks chunk_causal it may name "
                        "unconverted blocks: their softmax then sees their chunk and that many earlier frames only "
                        "(distillation runs the teacher's attention there, so their window acts in fine-tuning and "
                        "generation)")


def parse_block_overlap_frames(spec: str | None) -> dict[int, int] | None:
    """``--block-overlap-frames``: ``"0=12,2=12"`` -> ``{0: 12, 2: 12}`` (``None`` -> ``None``).

    Raises:
        ValueError: a malformed item (not ``BLOCK=FRAMES`` with two ints) or a block named twice, naming the flag
            and the expected form.
    """
    if spec is None:
        return None
    form = "BLOCK=FRAMES,... (e.g. 0=12,2=12,5=12)"
    out: dict[int, int] = {}
    for item in spec.split(","):
        block, sep, frames = item.partition("=")
        try:
            b, f = int(block), int(frames)
        except ValueError:
            b = f = None
        if not sep or b is None:
            raise ValueError(f"--block-overlap-frames must be {form}, got {spec!r}")
        if b in out:
            raise ValueError(f"--block-overlap-frames names block {b} twice in {spec!r}; expected {form}")
        out[b] = f
    return out


def conversion_kwargs(args) -> dict:
    """The eight conversion keyword arguments of ``rehyat distill`` / ``convert`` from parsed arguments (as given:
    :func:`~rehyat.training.distill` and :func:`~rehyat.training.convert_model` check them)."""
    from .conversion import ConversionSettings

    return ConversionSettings.from_cli(args).fields()


def add_run_args(p, *, checkpoint_every: int, log_every: int) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help=f"optimizer steps between checkpoints (default {checkpoint_every}; always at the end)")
    g.add_argument("--log-every", type=int, default=log_every, help=f"steps between log flushes (default {log_every})")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
