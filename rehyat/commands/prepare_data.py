"""``rehyat prepare-data``: encode a videofolder into a latent dataset (see :mod:`rehyat.training.dataset`), or write
a caption-embedding table with ``--write-text-embeddings``."""

from __future__ import annotations

from pathlib import Path

HELP = "encode videos + captions into a training dataset (latents, text embeddings), or write a caption table"


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help=HELP, description=HELP)
    p.add_argument("--model", type=Path, required=True, help="model folder whose VAE and text encoder are used")
    p.add_argument("--videos", type=Path, default=None,
                   help="videofolder: videos + metadata.jsonl with file_name and text (rehyat world writes one)")
    p.add_argument("--out", type=Path, default=None, help="dataset folder to write")
    p.add_argument("--text-embeddings", type=Path, default=None,
                   help="look captions up in this table instead of running the text encoder")
    p.add_argument("--write-text-embeddings", type=Path, default=None, metavar="FILE",
                   help="instead: write a caption table (.safetensors) for the captions of --captions or --videos")
    p.add_argument("--captions", type=Path, default=None, help="with --write-text-embeddings: one caption per line")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: all of the first video's)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per VAE call")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..training.dataset import read_metadata
    from ..training.prepare import prepare_dataset
    from ..training.text_tables import encode_text_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.write_text_embeddings is not None:
        if args.out is not None or args.text_embeddings is not None:
            raise ValueError("--write-text-embeddings writes a table only: drop --out and --text-embeddings")
        if (args.captions is None) == (args.videos is None):
            raise ValueError("--write-text-embeddings needs exactly one of --captions FILE and --videos FOLDER")
        if args.captions is not None:
            if not args.captions.is_file():
                raise FileNotFoundError(f"--captions file {args.captions} does not exist")
            captions = [c.strip() for c in args.captions.read_text(encoding="utf-8").splitlines() if c.strip()]
        else:
            captions = [r["text"] for r in read_metadata(args.videos)]
        if not captions:
            raise ValueError("no captions to encode")
        table = encode_text_table(args.model, captions, args.write_text_embeddings, device=device,
                                  overwrite=args.overwrite)
        print(f"wrote {args.write_text_embeddings} ({len(table)} captions, embeds {tuple(table.embeds.shape)})")
        return 0
    if args.videos is None or args.out is None:
        raise ValueError("pass --videos FOLDER and --out DATASET (or --write-text-embeddings FILE)")
    info = prepare_dataset(args.model, args.videos, args.out, text_embeddings=args.text_embeddings,
                           num_frames=args.frames, batch_size=args.batch_size, device=device,
                           overwrite=args.overwrite, progress=args.progress)
    print(f"wrote {args.out}: {info.num_samples} samples, latents {list(info.latent_shape)} ({info.latent_space} "
          f"space), text embeddings [{info.max_sequence_length}, {info.text_dim}]")
    return 0
