"""``rehyat world``: the project's procedural video world: export videos or a training dataset, list captions."""

from __future__ import annotations

import itertools
from pathlib import Path

HELP = "the procedural video world: export videos or a pixel-space training dataset, list its captions"


def add_parser(sub) -> None:
    p = sub.add_parser("world", help=HELP, description=HELP)
    wsub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    e = wsub.add_parser("export", help="render N videos with captions")
    e.add_argument("--out", type=Path, required=True, help="output folder (created)")
    e.add_argument("--num-videos", type=int, required=True)
    e.add_argument("--frames", type=int, default=16)
    e.add_argument("--height", type=int, default=40)
    e.add_argument("--width", type=int, default=40)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--fps", type=int, default=8)
    e.add_argument("--format", choices=["videos", "dataset"], default="videos",
                   help="'videos': NNNNNN.mp4 + metadata.jsonl (a videofolder for `rehyat prepare-data`); 'dataset': "
                        "the training format directly, in pixel space (latents = video in [-1, 1])")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text-embeddings", type=Path, help="with --format dataset: caption-embedding table")
    src.add_argument("--model", type=Path, help="with --format dataset: model folder whose text encoder to use")
    e.add_argument("--workers", type=int, default=None, help="rendering processes (default: all CPU cores)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out: its files (NNNNNN.mp4, NNNNNN.safetensors, "
                        "metadata.jsonl, dataset.json, null_embeds.safetensors) are deleted first; refused if --out "
                        "holds any other file")
    # "command" names the action in error messages ("rehyat world export: error: ..."); argparse copies a
    # subparser's defaults over the parent's, so it replaces the "world" the top-level parser set
    e.set_defaults(run=run_export, command="world export")
    c = wsub.add_parser("captions", help="write every caption the world can produce, one per line")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.set_defaults(run=run_captions, command="world captions")


# every file `rehyat world export` writes into --out, in either --format (what --overwrite deletes)
EXPORT_OUTPUTS = r"\d{6}\.(mp4|safetensors)|metadata\.jsonl|dataset\.json|null_embeds\.safetensors"


def all_captions() -> list[str]:
    """Every caption of the world: shape x colour x background (different from the colour) x direction."""
    from ..world import DIRECTIONS, PALETTE, SHAPES, Scene, caption

    out = []
    for shape, colour, background, direction in itertools.product(SHAPES, PALETTE, PALETTE, DIRECTIONS):
        if colour == background:
            continue
        try:
            out.append(caption(Scene(shape, colour, background, direction, speed=1.0, size=0.3, x0=0.5, y0=0.5)))
        except ValueError:  # colours too close to tell apart are not a valid scene
            continue
    return out


def run_captions(args) -> int:
    from ..io import check_output_file

    check_output_file(args.out, overwrite=args.overwrite)
    caps = all_captions()
    args.out.write_text("\n".join(caps) + "\n")
    print(f"wrote {len(caps)} captions to {args.out}")
    return 0


def _render(job):
    from ..world import caption, render_video, sample_scene, scene_seed

    seed, i, frames, height, width = job
    scene = sample_scene(scene_seed(seed, i))
    return caption(scene), render_video(scene, frames, height, width)


def export_pixel_dataset(out, *, num_videos: int, frames: int, height: int, width: int, seed: int, fps: int,
                         embed, text_dim: int, max_sequence_length: int, null_embeds, text_encoder: str | None,
                         overwrite: bool = False, workers: int | None = None):
    """Render ``num_videos`` world videos straight into the training format (pixel space, ``[3, F, H, W]``).

    ``embed(captions) -> [B, L, D]`` gives text embeddings; ``null_embeds`` ``[L, D]`` is the negative prompt's.
    Videos render in ``workers`` processes (default: all cores); the result does not depend on ``workers``.
    """
    import multiprocessing
    import os

    from tqdm.auto import tqdm

    from ..training.dataset import DatasetInfo, DatasetWriter
    from ..training.videos import video_tensor

    info = DatasetInfo(latent_channels=3, latent_frames=frames, latent_height=height, latent_width=width,
                       text_dim=text_dim, max_sequence_length=max_sequence_length, latent_space="pixel",
                       num_frames=frames, height=height, width=width, num_samples=0, fps=fps,
                       text_encoder=text_encoder, latents_dtype="bfloat16")
    writer = DatasetWriter(out, info, overwrite=overwrite)
    jobs = [(seed, i, frames, height, width) for i in range(num_videos)]
    workers = workers or os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
        for cap, video in tqdm(pool.imap(_render, jobs, chunksize=8), total=num_videos, desc="rendering"):
            writer.add(video_tensor(video), embed([cap])[0], cap)
    if null_embeds is not None:
        writer.set_null_embeds(null_embeds)
    return writer.close()


class _Serial:
    """In-process stand-in for a multiprocessing pool (``workers=1``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


def _prepare_out(out: Path, stale: list[Path]) -> None:
    """Create ``--out`` and delete an earlier export's files (``--overwrite``), once every check has passed."""
    out.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.unlink()


def run_export(args) -> int:
    """Raises ``ValueError`` / ``FileExistsError`` naming the argument before anything is written: bad sizes or
    counts, a text source that does not fit ``--format``, ``--out`` a file, a non-empty ``--out`` without
    ``--overwrite``, or (with it) an ``--out`` holding files an export does not write."""
    from ._checks import check_output_folder

    for name, low in (("num_videos", 1), ("frames", 1), ("height", 8), ("width", 8), ("fps", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.format == "videos" and (args.height % 2 or args.width % 2):
        raise ValueError(f"--height and --width must be even for --format videos, got {args.height}x{args.width}")
    out = Path(args.out)
    stale = check_output_folder(out, overwrite=args.overwrite, command="world export", outputs=EXPORT_OUTPUTS)
    if not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier export "
                              "there, or choose another --out")
    if args.format == "videos":
        if args.text_embeddings or args.model:
            raise ValueError("--text-embeddings and --model go with --format dataset")
        from ..world import export_video_dataset

        _prepare_out(out, stale)
        export_video_dataset(out, args.num_videos, args.frames, args.height, args.width, args.seed,
                             fps=args.fps, overwrite=args.overwrite)
        print(f"wrote {args.num_videos} videos and metadata.jsonl to {out}")
        return 0
    from ..text_encoder import TextEmbeddingTable

    if args.text_embeddings is not None:
        table = TextEmbeddingTable.load(args.text_embeddings)
        missing = table.missing(all_captions())
        if missing:
            raise ValueError(f"{args.text_embeddings} lacks {len(missing)} world captions, e.g. {missing[:2]}")
        embed, L, D = table.lookup, table.max_sequence_length, table.text_dim
        null = table.lookup([""])[0] if "" in table else None
        te_name = table.text_encoder
    elif args.model is not None:
        from ..pipelines import ReHyAtVideoPipeline

        pipe = ReHyAtVideoPipeline.from_pretrained(args.model)
        if not pipe.has_text_encoder:
            raise ValueError(f"--model {args.model} has no text encoder")
        embed = lambda caps: pipe.encode_prompt(caps).float().cpu()  # noqa: E731
        L, D = pipe.max_sequence_length, pipe.transformer.config.text_dim
        null, te_name = embed([pipe.negative_prompt])[0], None
    else:
        raise ValueError("--format dataset needs --text-embeddings FILE or --model DIR for the captions' embeddings")
    _prepare_out(out, stale)
    info = export_pixel_dataset(out, num_videos=args.num_videos, frames=args.frames, height=args.height,
                                width=args.width, seed=args.seed, fps=args.fps, embed=embed, text_dim=D,
                                max_sequence_length=L, null_embeds=null, text_encoder=te_name,
                                overwrite=args.overwrite, workers=args.workers)
    print(f"wrote a pixel-space dataset of {info.num_samples} samples to {args.out}")
    return 0
