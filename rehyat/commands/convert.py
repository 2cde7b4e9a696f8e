"""``rehyat convert``: convert a teacher folder to ReHyAt, choosing blocks by rank (``best:N``) or by an exact
knapsack under an attention-FLOP budget (``auto``); see :func:`rehyat.training.convert_model`."""

from __future__ import annotations

from pathlib import Path

HELP = "convert a Wan teacher to ReHyAt: all/listed blocks, the N best, or a FLOP-budgeted per-block choice"


def add_parser(sub) -> None:
    from ..training.cli_args import add_block_overlap_arg, add_conversion_args, add_geometry_args, add_prompt_args

    p = sub.add_parser("convert", help=HELP, description=HELP)
    p.add_argument("--model", "--teacher", dest="model", type=Path, required=True, help="teacher model folder")
    p.add_argument("--out", type=Path, required=True, help="output model folder (+ selection.json/.md)")
    p.add_argument("--blocks", default="all", help="all | a list like 0,3,5 | best:N | auto (with --budget)")
    p.add_argument("--budget", type=float, default=None,
                   help="--blocks auto: attention FLOPs as a fraction of the teacher's (e.g. 0.5)")
    p.add_argument("--candidates", default=None,
                   help='--blocks auto: (chunk_frames,overlap_frames) options, e.g. "3,1;5,1;2,0" (the default)')
    add_block_overlap_arg(p)
    add_conversion_args(p)
    add_prompt_args(p)
    add_geometry_args(p)
    g = p.add_argument_group("short distillation (best:N and auto)")
    g.add_argument("--rank-steps", type=int, default=20, help="distillation steps before measuring (default 20)")
    g.add_argument("--sampling-steps", type=int, default=20, help="scheduler steps per trajectory (default 20)")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training import convert_model
    from ..training.cli_args import conversion_kwargs, parse_block_overlap_frames
    from ..training.selection import selection_table

    out, sel = convert_model(
        args.model, args.out, blocks=args.blocks, budget=args.budget, candidates=args.candidates,
        block_overlap_frames=parse_block_overlap_frames(args.block_overlap_frames),
        **conversion_kwargs(args), prompts=args.prompts, data=args.data, text_embeddings=args.text_embeddings,
        frames=args.frames, height=args.height, width=args.width, rank_steps=args.rank_steps,
        sampling_steps=args.sampling_steps, guidance=args.guidance, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, device=args.device, precision=args.precision, overwrite=args.overwrite, progress=args.progress,
    )
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        if sel is not None:
            print(selection_table(sel))
        print(f"wrote {out}")
        from ._notes import recurrence_note

        note = recurrence_note(out)
        if note:
            print(note)
    return 0
