"""``rehyat distill``: stage 1, attention distillation of a teacher into ReHyAt feature maps (see
:func:`rehyat.training.distill`). Runs under ``torchrun`` for several GPUs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP = "distil a teacher's attention into ReHyAt feature maps along its own sampling trajectories"


def add_parser(sub) -> None:
    from ..training.cli_args import (add_block_overlap_arg, add_conversion_args, add_geometry_args,
                                     add_prompt_args, add_run_args)

    p = sub.add_parser("distill", help=HELP, description=HELP)
    p.add_argument("--model", "--teacher", dest="model", type=Path, required=True,
                   help="teacher model folder (a converted folder from `rehyat convert` keeps its blocks and settings)")
    p.add_argument("--out", type=Path, required=True, help="output: the student model folder, reports and train/")
    p.add_argument("--blocks", default="all", help="all | a list like 0,3,5 | best:N (default all)")
    add_block_overlap_arg(p)
    add_prompt_args(p)
    add_conversion_args(p)
    add_geometry_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps = teacher forwards (default 1000)")
    g.add_argument("--sampling-steps", type=int, default=50, help="scheduler steps per trajectory (default 50)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the folder's, else 5.0)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per trajectory, global over processes")
    g.add_argument("--rank-steps", type=int, default=20, help="short-distillation steps that rank blocks for best:N")
    g.add_argument("--eval-trajectories", type=int, default=1,
                   help="held-out trajectories measured before and after (default 1; 0 skips)")
    g.add_argument("--mass-every", type=int, default=50,
                   help="steps between measurements of the linear branch's share of the attention mass in the log "
                        "(default 50; 0: none)")
    g.add_argument("--mass-weight", type=float, default=0.0,
                   help="weight of the gap between the linear branch's share of the attention mass and softmax's "
                        "share of the same keys in the loss (default 0: the output loss alone)")
    add_run_args(p, checkpoint_every=100, log_every=1)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training import TrainingInterrupted, distill
    from ..training.cli_args import conversion_kwargs, parse_block_overlap_frames

    block_overlap_frames = parse_block_overlap_frames(args.block_overlap_frames)
    try:
        res = distill(
            args.model, args.out, prompts=args.prompts, data=args.data, text_embeddings=args.text_embeddings,
            blocks=args.blocks, block_overlap_frames=block_overlap_frames, **conversion_kwargs(args),
            frames=args.frames, height=args.height, width=args.width,
            sampling_steps=args.sampling_steps, guidance=args.guidance, steps=args.steps, lr=args.lr,
            warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm or None, batch_size=args.batch_size,
            rank_steps=args.rank_steps, eval_trajectories=args.eval_trajectories, seed=args.seed,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, mass_every=args.mass_every,
            mass_weight=args.mass_weight,
            device=args.device,
            precision=args.precision, overwrite=args.overwrite, resume=args.resume, progress=args.progress,
        )
    except TrainingInterrupted as e:  # Ctrl-C: the message says where the checkpoint is and how to resume
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"rehyat distill: {e}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(res.report)
        print(f"wrote {res.out} (student model folder), {res.out / 'distill_report.json'}")
        from ._notes import recurrence_note

        note = recurrence_note(res.out)
        if note:
            print(note)
    return 0
